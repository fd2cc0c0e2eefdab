"""Partial-rollout buffer: budgets, continuation order, version stamps, group release, loss masks,
and save/restore, step by step and over many iterations of a seeded long-tailed fake generator."""

from __future__ import annotations

import json
import random
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest

from engine.replay_buffer import (
    Group,
    PartialRolloutBuffer,
    PartialRolloutConfig,
    PromptTokens,
    RolloutRequest,
    RolloutResult,
    loss_mask,
)
from engine.trajectory import Trajectory

Key = tuple[str, int]


def prompt(uid: str, n: int = 3) -> PromptTokens:
    return PromptTokens(uid, tuple(range(100, 100 + n)))


def result(req: RolloutRequest, n: int, reason: str, version: int | None = None) -> RolloutResult:
    """`n` tokens for `req`: token i of the response so far + i, so continuations are recognisable."""
    start = len(req.token_ids)
    return RolloutResult(
        req.prompt_uid,
        req.sample_index,
        tuple(range(start, start + n)),
        tuple(-0.5 for _ in range(n)),
        reason,  # type: ignore[arg-type]
        req.version if version is None else version,
    )


def by_key(requests: list[RolloutRequest]) -> dict[Key, RolloutRequest]:
    return {r.key: r for r in requests}


def buffer_slice(
    max_response_tokens: int = 64,
    iteration_token_budget: int = 16,
    group_size: int = 4,
    staleness: str = "exclude",
    max_staleness: int | None = None,
) -> PartialRolloutConfig:
    return PartialRolloutConfig(max_response_tokens, iteration_token_budget, group_size, staleness, max_staleness)


# ---- one step at a time --------------------------------------------------------------------------


def test_new_prompts_get_group_size_requests_capped_by_the_budget() -> None:
    buf = PartialRolloutBuffer(buffer_slice(max_response_tokens=40, iteration_token_budget=16, group_size=3))
    reqs = buf.plan_round([prompt("a"), prompt("b", 5)], version=1)
    assert [r.key for r in reqs] == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("b", 2)]
    assert all(r.max_tokens == 16 and r.version == 1 and not r.continued for r in reqs)
    assert reqs[3].token_ids == (100, 101, 102, 103, 104)
    assert buf.in_flight_uids == {"a", "b"}
    small = PartialRolloutBuffer(buffer_slice(max_response_tokens=10, iteration_token_budget=10, group_size=1))
    assert small.plan_round([prompt("a")], version=0)[0].max_tokens == 10


def test_budget_hit_continues_first_and_total_is_capped_at_max_response() -> None:
    buf = PartialRolloutBuffer(buffer_slice(max_response_tokens=40, iteration_token_budget=16, group_size=1))
    (req,) = buf.plan_round([prompt("a")], version=1)
    buf.record([result(req, 16, "length")])
    (traj,) = buf.trajectories()
    assert traj.finish_reason == "length_budget"
    assert not traj.finished
    assert buf.ready_groups() == []

    reqs = buf.plan_round([prompt("b")], version=2)
    assert [(r.key, r.continued) for r in reqs] == [(("a", 0), True), (("b", 0), False)]
    assert reqs[0].token_ids == (100, 101, 102, *range(3, 19))  # prompt + the 16 tokens so far
    assert reqs[0].max_tokens == 16
    buf.record([result(reqs[0], 16, "length"), result(reqs[1], 5, "stop")])

    reqs = buf.plan_round([], version=3)
    assert [(r.key, r.max_tokens) for r in reqs] == [(("a", 0), 8)]  # 40 - 32 left, not the budget of 16
    buf.record([result(reqs[0], 8, "length")])
    groups = buf.take_ready_groups()
    assert [g.prompt_uid for g in groups] == ["a", "b"]  # admission order, though b was ready first
    a = groups[0].trajectories[0]
    assert a.finish_reason == "length"
    assert len(a.response_ids) == 40
    assert a.versions == [1] * 16 + [2] * 16 + [3] * 8
    assert a.response_ids == list(range(3, 43))


def test_ready_groups_keep_admission_order() -> None:
    buf = PartialRolloutBuffer(buffer_slice(max_response_tokens=8, iteration_token_budget=8, group_size=1))
    reqs = buf.plan_round([prompt("z"), prompt("a")], version=0)
    buf.record([result(r, 1, "stop") for r in reversed(reqs)])
    assert [g.prompt_uid for g in buf.take_ready_groups()] == ["z", "a"]


def test_second_round_of_an_iteration_gets_only_the_budget_left() -> None:
    buf = PartialRolloutBuffer(buffer_slice(max_response_tokens=100, iteration_token_budget=16, group_size=1))
    (req,) = buf.plan_round([prompt("a")], version=5)
    buf.record([result(req, 10, "aborted")])
    assert buf.trajectories()[0].finish_reason == "aborted"
    (req,) = buf.plan_round([], version=5)
    assert (req.max_tokens, req.continued) == (6, True)
    buf.record([result(req, 6, "length")])
    assert buf.trajectories()[0].finish_reason == "length_budget"
    assert buf.plan_round([], version=5) == []  # budget of version 5 used up
    (req,) = buf.plan_round([], version=6)
    assert req.max_tokens == 16


def test_engine_length_short_of_max_tokens_finishes_the_trajectory() -> None:
    # vLLM says "length" before max_tokens when the context (max_model_len) is full: continuing cannot help.
    buf = PartialRolloutBuffer(buffer_slice(max_response_tokens=100, iteration_token_budget=16, group_size=1))
    (req,) = buf.plan_round([prompt("a")], version=0)
    buf.record([result(req, 7, "length")])
    assert buf.trajectories()[0].finish_reason == "length"
    assert len(buf.take_ready_groups()) == 1


def test_repeat_finishes_and_abort_at_the_cap_is_length() -> None:
    buf = PartialRolloutBuffer(buffer_slice(max_response_tokens=8, iteration_token_budget=8, group_size=2))
    reqs = buf.plan_round([prompt("a")], version=0)
    buf.record([result(reqs[0], 3, "repeat"), result(reqs[1], 8, "aborted")])
    assert [t.finish_reason for t in buf.trajectories()] == ["repeat", "length"]


def test_group_released_only_when_all_samples_finished_and_exactly_once() -> None:
    buf = PartialRolloutBuffer(buffer_slice(max_response_tokens=64, iteration_token_budget=8, group_size=3))
    reqs = buf.plan_round([prompt("a")], version=0)
    buf.record([result(reqs[0], 2, "stop"), result(reqs[1], 8, "length"), result(reqs[2], 4, "stop")])
    assert buf.ready_groups() == []
    assert buf.take_ready_groups() == []
    (req,) = buf.plan_round([], version=1)
    assert req.key == ("a", 1)
    buf.record([result(req, 3, "stop")])
    assert [g.prompt_uid for g in buf.ready_groups()] == ["a"]
    groups = buf.take_ready_groups()
    assert len(groups) == 1
    assert [t.sample_index for t in groups[0].trajectories] == [0, 1, 2]
    assert buf.take_ready_groups() == []
    assert len(buf) == 0
    assert buf.in_flight_uids == frozenset()
    buf.plan_round([prompt("a")], version=2)  # a taken prompt may be issued again (next epoch)


def test_take_ready_groups_limit_leaves_the_rest_ready() -> None:
    buf = PartialRolloutBuffer(buffer_slice(max_response_tokens=8, iteration_token_budget=8, group_size=1))
    reqs = buf.plan_round([prompt("a"), prompt("b"), prompt("c")], version=0)
    buf.record([result(r, 1, "stop") for r in reqs])
    assert [g.prompt_uid for g in buf.take_ready_groups(max_groups=2)] == ["a", "b"]
    assert [g.prompt_uid for g in buf.take_ready_groups(max_groups=2)] == ["c"]


def test_plan_rejects_in_flight_duplicate_and_backwards() -> None:
    buf = PartialRolloutBuffer(buffer_slice(max_response_tokens=8, iteration_token_budget=8, group_size=2))
    with pytest.raises(ValueError, match="appears twice"):
        buf.plan_round([prompt("a"), prompt("a")], version=3)
    assert len(buf) == 0  # nothing admitted by the failed call
    reqs = buf.plan_round([prompt("a")], version=3)
    with pytest.raises(RuntimeError, match="2 requests of version 3 are not recorded"):
        buf.plan_round([], version=4)
    buf.record([result(reqs[0], 8, "length"), result(reqs[1], 1, "stop")])
    with pytest.raises(ValueError, match="'a' is already in flight"):
        buf.plan_round([prompt("a")], version=4)
    with pytest.raises(ValueError, match="went backwards: planned 3 before, now 2"):
        buf.plan_round([], version=2)
    with pytest.raises(ValueError, match="no token ids"):
        buf.plan_round([PromptTokens("e", ())], version=4)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda r: RolloutResult("x", 0, (), (), "stop", 1), r"no pending request for \('x', 0\)"),
        (lambda r: result(r, 2, "stop", version=0), "stamped version 0, its request had 1"),
        (lambda r: result(r, 5, "length"), "5 tokens, over max_tokens=4"),
        (lambda r: RolloutResult(*r.key, (1, 2), (0.0,), "stop", 1), "2 tokens but 1 logprobs"),
        (lambda r: result(r, 1, "eos"), "finish_reason must be one of"),
    ],
)
def test_record_rejects_bad_results_and_applies_none(make: Any, match: str) -> None:
    buf = PartialRolloutBuffer(buffer_slice(max_response_tokens=4, iteration_token_budget=4, group_size=2))
    reqs = buf.plan_round([prompt("a")], version=1)
    before = buf.state_dict()
    with pytest.raises(ValueError, match=match):
        buf.record([result(reqs[1], 1, "stop"), make(reqs[0])])  # the good first result is not applied either
    assert buf.state_dict() == before


def test_record_rejects_a_result_twice() -> None:
    buf = PartialRolloutBuffer(buffer_slice(max_response_tokens=4, iteration_token_budget=4, group_size=1))
    (req,) = buf.plan_round([prompt("a")], version=1)
    with pytest.raises(ValueError, match="already recorded"):
        buf.record([result(req, 1, "stop"), result(req, 1, "stop")])
    buf.record([result(req, 1, "stop")])
    with pytest.raises(ValueError, match="already recorded"):
        buf.record([result(req, 1, "stop")])


def test_abort_pending_keeps_the_trajectories_for_the_next_round() -> None:
    buf = PartialRolloutBuffer(buffer_slice(max_response_tokens=32, iteration_token_budget=8, group_size=2))
    reqs = buf.plan_round([prompt("a")], version=0)
    buf.record([result(reqs[0], 8, "length")])
    assert buf.abort_pending() == 1
    assert [t.finish_reason for t in buf.trajectories()] == ["length_budget", "aborted"]
    reqs = buf.plan_round([], version=1)
    assert [(r.key, r.continued, r.max_tokens) for r in reqs] == [(("a", 0), True, 8), (("a", 1), True, 8)]
    assert reqs[1].token_ids == (100, 101, 102)


# ---- loss masks ----------------------------------------------------------------------------------


def test_loss_mask_by_staleness_mode() -> None:
    traj = Trajectory("a", 0, [1], [5, 6, 7, 8, 9], [0.0] * 5, [1, 1, 2, 2, 3], "stop")
    assert loss_mask(traj, 3, "exclude") == [False, False, False, False, True]
    assert loss_mask(traj, 3, "keep") == [True] * 5
    assert loss_mask(traj, 3, "keep", max_staleness=1) == [False, False, True, True, True]
    assert loss_mask(traj, 4, "exclude") == [False] * 5
    with pytest.raises(ValueError, match="version 3, newer than the current 2"):
        loss_mask(traj, 2, "keep")
    buf = PartialRolloutBuffer(buffer_slice(staleness="keep", max_staleness=0))
    assert buf.loss_mask(traj, 3) == [False, False, False, False, True]


# ---- many iterations of a long-tailed generator ---------------------------------------------------

CFG = buffer_slice(max_response_tokens=64, iteration_token_budget=16, group_size=4)
PROMPTS = [PromptTokens(f"p{i:03d}", tuple(range(1000 * i, 1000 * i + 2 + i % 5))) for i in range(60)]
PROMPT_IDS = {p.uid: p.prompt_ids for p in PROMPTS}
PROMPTS_PER_ITERATION = 6


def token_at(key: Key, position: int) -> int:
    return zlib.crc32(f"{key[0]}/{key[1]}/{position}".encode()) % 50_000


class LongTailGenerator:
    """Seeded fake vLLM. Each trajectory wants a Pareto-distributed total length, fixed by the seed and its
    key; a request emits it up to max_tokens ("stop" when the end is reached, "length" otherwise), and a
    few requests are aborted part-way. Every draw is seeded by (seed, key, version, position), so the
    output does not depend on call order or on the process that asks."""

    def __init__(self, seed: int, abort_rate: float = 0.05) -> None:
        self.seed = seed
        self.abort_rate = abort_rate

    def _rng(self, *parts: object) -> random.Random:
        return random.Random("/".join(map(str, (self.seed, *parts))))

    def target_length(self, key: Key) -> int:
        return int(6 * self._rng("len", *key).paretovariate(1.0))

    def generate(self, req: RolloutRequest) -> RolloutResult:
        done = len(req.token_ids) - len(PROMPT_IDS[req.prompt_uid])
        want = self.target_length(req.key) - done
        rng = self._rng("req", *req.key, req.version, done)
        if rng.random() < self.abort_rate:
            n, reason = min(rng.randrange(req.max_tokens + 1), want), "aborted"
        elif want <= req.max_tokens:
            n, reason = want, "stop"
        else:
            n, reason = req.max_tokens, "length"
        ids = tuple(token_at(req.key, done + i) for i in range(n))
        return RolloutResult(*req.key, ids, tuple(-rng.random() for _ in range(n)), reason, req.version)  # type: ignore[arg-type]


@dataclass
class RunLog:
    requests: list[list[RolloutRequest]] = field(default_factory=list)
    groups: list[Group] = field(default_factory=list)
    versions: dict[Key, list[int]] = field(default_factory=dict)  # the driver's own record of who sampled what
    finish_reasons: Counter[str] = field(default_factory=Counter)


def run_iterations(buf: PartialRolloutBuffer, gen: LongTailGenerator, start: int, stop: int, log: RunLog) -> None:
    """Iterations [start, stop): iteration i runs weight version 10 + i and admits the next prompts."""
    cfg = buf.config
    for it in range(start, stop):
        version = 10 + it
        new = PROMPTS[it * PROMPTS_PER_ITERATION : (it + 1) * PROMPTS_PER_ITERATION]
        unfinished = {t.key: len(t.response_ids) for t in buf.unfinished()}
        reqs = buf.plan_round(new, version)
        log.requests.append(reqs)

        flags = [r.continued for r in reqs]
        assert flags == sorted(flags, reverse=True), "continued trajectories must come before new prompts"
        assert {r.key for r in reqs if r.continued} == set(unfinished), "every unfinished trajectory is continued"
        assert [r.key for r in reqs if not r.continued] == [(p.uid, i) for p in new for i in range(cfg.group_size)]
        for r in reqs:
            done = unfinished.get(r.key, 0)
            assert 1 <= r.max_tokens <= cfg.iteration_token_budget
            assert done + r.max_tokens <= cfg.max_response_tokens
            assert r.token_ids == PROMPT_IDS[r.prompt_uid] + tuple(token_at(r.key, p) for p in range(done))
            assert r.version == version

        results = [gen.generate(r) for r in reqs]
        for res in results:
            log.versions.setdefault(res.key, []).extend([version] * len(res.token_ids))
        buf.record(results)
        assert all(len(t.response_ids) <= cfg.max_response_tokens for t in buf.trajectories())

        taken = buf.take_ready_groups()
        for group in taken:
            assert [t.sample_index for t in group.trajectories] == list(range(cfg.group_size))
            assert all(t.finished for t in group.trajectories)
            log.finish_reasons.update(t.finish_reason for t in group.trajectories)
        log.groups.extend(taken)
        for uid in buf.in_flight_uids:  # nothing left behind that was ready
            assert not all(t.finished for t in buf.trajectories() if t.prompt_uid == uid)


ITERATIONS = 40  # prompts run out after 10; the rest drains the buffer (each trajectory needs <= 4 + aborts)


def test_long_tailed_rollouts_respect_budgets_and_lose_nothing() -> None:
    gen = LongTailGenerator(seed=7)
    buf = PartialRolloutBuffer(CFG)
    log = RunLog()
    run_iterations(buf, gen, 0, ITERATIONS, log)

    assert len(buf) == 0
    assert buf.in_flight_uids == frozenset()
    taken = Counter(t.key for g in log.groups for t in g.trajectories)
    started = {(p.uid, i) for p in PROMPTS for i in range(CFG.group_size)}
    assert set(taken) == started
    assert max(taken.values()) == 1, "a trajectory came out twice"

    for group in log.groups:
        for t in group.trajectories:
            assert t.versions == log.versions[t.key], f"{t.key}: wrong version stamps"
            target = gen.target_length(t.key)
            length = min(target, CFG.max_response_tokens)
            assert t.response_ids == [token_at(t.key, p) for p in range(length)]
            assert t.finish_reason == ("stop" if target <= CFG.max_response_tokens else "length")
            assert len(t.logprobs) == len(t.response_ids)

    # The run exercised what it claims to: continuations over several versions, truncation, aborts.
    assert sum(r.continued for reqs in log.requests for r in reqs) > 100
    assert log.finish_reasons["length"] >= 5
    assert log.finish_reasons["stop"] >= 100
    assert any(len(set(t.versions)) >= 3 for g in log.groups for t in g.trajectories)
    assert sum(r.max_tokens < CFG.iteration_token_budget for reqs in log.requests for r in reqs) > 0
    assert any(r.prompt_uid == "p000" for r in log.requests[3]), "a long trajectory outlives its prompt's iteration"


def test_exclude_mode_masks_every_token_of_an_older_version() -> None:
    buf = PartialRolloutBuffer(CFG)
    log = RunLog()
    run_iterations(buf, LongTailGenerator(seed=3), 0, ITERATIONS, log)
    mixed = 0
    for group in log.groups:
        for t in group.trajectories:
            current = max(t.versions, default=0)
            mask = buf.loss_mask(t, current)
            assert mask == [v == current for v in t.versions]
            mixed += 0 < sum(mask) < len(mask)
    assert mixed > 10


@pytest.mark.parametrize("cut", [1, 4, 11])
def test_save_restore_mid_run_equals_an_uninterrupted_run(cut: int) -> None:
    full = RunLog()
    run_iterations(PartialRolloutBuffer(CFG), LongTailGenerator(seed=11), 0, ITERATIONS, full)

    resumed = RunLog()
    first = PartialRolloutBuffer(CFG)
    run_iterations(first, LongTailGenerator(seed=11), 0, cut, resumed)
    state = first.state_dict()
    assert len(state["trajectories"]) > 0, "the cut must fall while trajectories are in flight"
    restored_state = json.loads(json.dumps(state))
    second = PartialRolloutBuffer(CFG)
    second.load_state_dict(restored_state)
    assert second.state_dict() == restored_state
    assert second.in_flight_uids == first.in_flight_uids
    assert second.unfinished() == first.unfinished()
    run_iterations(second, LongTailGenerator(seed=11), cut, ITERATIONS, resumed)

    assert resumed.requests == full.requests
    assert [g.prompt_uid for g in resumed.groups] == [g.prompt_uid for g in full.groups]
    assert [[t.to_dict() for t in g.trajectories] for g in resumed.groups] == [
        [t.to_dict() for t in g.trajectories] for g in full.groups
    ]


def test_save_restore_with_requests_pending() -> None:
    gen = LongTailGenerator(seed=5)
    buf = PartialRolloutBuffer(CFG)
    run_iterations(buf, gen, 0, 2, RunLog())
    reqs = buf.plan_round(PROMPTS[12:14], version=12)
    restored = PartialRolloutBuffer(CFG)
    restored.load_state_dict(json.loads(json.dumps(buf.state_dict())))
    assert restored.pending == tuple(reqs)
    results = [gen.generate(r) for r in reqs]
    buf.record(results)
    restored.record(results)
    assert restored.state_dict() == buf.state_dict()


def test_load_state_rejects_a_mismatched_or_broken_state() -> None:
    buf = PartialRolloutBuffer(CFG)
    run_iterations(buf, LongTailGenerator(seed=5), 0, 1, RunLog())
    state = json.loads(json.dumps(buf.state_dict()))
    other = PartialRolloutBuffer(buffer_slice(max_response_tokens=64, iteration_token_budget=16, group_size=2))
    with pytest.raises(ValueError, match="group_size 4, the config says 2"):
        other.load_state_dict(state)
    lost = dict(state, trajectories=state["trajectories"][1:])
    with pytest.raises(ValueError, match=r"has samples \[1, 2, 3\], expected \[0, 1, 2, 3\]"):
        PartialRolloutBuffer(CFG).load_state_dict(lost)
    doubled = dict(state, trajectories=state["trajectories"] + state["trajectories"][:1])
    with pytest.raises(ValueError, match="twice"):
        PartialRolloutBuffer(CFG).load_state_dict(doubled)
    assert max(len(t["response_ids"]) for t in state["trajectories"]) > 8
    short = buffer_slice(max_response_tokens=8, iteration_token_budget=8, group_size=4)
    with pytest.raises(ValueError, match=r"more than rollout\.max_response_tokens=8"):
        PartialRolloutBuffer(short).load_state_dict(state)
