"""The controller's logic with a fake engine and a fake vLLM: batches, rounds, checkpoints, phase times.

The real path (engine, vLLM, trainer ranks) is covered by tests/integration/test_train_e2e.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import pytest
import requests as requests_lib

from checkpoint_engine.contracts.acks import (
    ExportAck,
    MetricsAck,
    MoveAck,
    RestartVllmAck,
    StartVllmAck,
    TerminateVllmAck,
    UpdateWeightsAck,
)
from checkpoint_engine.contracts.engine_api import NodeAck, NodeAddress, PhaseAcks
from checkpoint_engine.contracts.engine_client import JobFailedError
from checkpoint_engine.contracts.phases import CYCLE, Phase, PhaseState
from checkpoint_engine.contracts.run_dir import RunPaths
from checkpoint_engine.contracts.vllm_client import SidecarError, SpreadVllmClient
from checkpoint_engine.contracts.vllm_protocol import Completion, GenerateResponse, GenerationRequest, GenerationResult
from engine.batch import load_batch
from engine.config import RepeatDetection, RolloutConfig, RunConfig
from engine.controller import Controller
from engine.replay_buffer import PartialRolloutBuffer
from engine.rewards import RewardConfig, RewardScorer
from engine.sampling import UniformSampler
from engine.tasks import AdditionTask
from engine.tokenizer import Tokens

NEWLINE, EOS = 10, 0
TOKENS = Tokens(
    encode=lambda text: [1, *(ord(c) for c in text)],
    encode_response=lambda text: [ord(c) for c in text],
    decode=lambda ids: "".join(chr(i) for i in ids if i > 1),
    stop_ids=(NEWLINE, EOS),
    pad_id=EOS,
)


class FakeVllm:
    """Answers `a+b=` with the right sum for even a, a wrong one for odd a; `chunk` tokens per call at most."""

    def __init__(self, version: int, chunk: int = 99) -> None:
        self.version, self.chunk, self.calls = version, chunk, 0

    def generate(self, requests: list[GenerationRequest]) -> GenerateResponse:
        self.calls += 1
        return GenerateResponse(
            results=[GenerationResult(samples=[self._answer(r) for _ in range(r.n)]) for r in requests], seconds=0.0
        )

    def _answer(self, r: GenerationRequest) -> Completion:
        text = TOKENS.decode(r.prompt_ids)
        prompt, _, done = text.partition("=")
        a, b = (int(x) for x in prompt.split("+"))
        full = [ord(c) for c in str(a + b + a % 2)] + [NEWLINE]
        new = full[len(done) :][: min(r.max_tokens, self.chunk)]
        reason = "stop" if new and new[-1] == NEWLINE else "length"
        return Completion(token_ids=new, logprobs=[-0.5] * len(new), finish_reason=reason, weight_version=self.version)

    def close(self) -> None:
        pass


class FakeEngine:
    """The head's engine as the controller sees it: each phase ends `seconds[phase]` after the one before it
    (on `clock`), with `payloads[phase]` as node0's ack."""

    def __init__(self, payloads: dict | None = None, seconds: dict | None = None) -> None:
        self.payloads, self.seconds = payloads or {}, seconds or {}
        self.completed, self.awaited, self.time = [], [], 100.0

    def clock(self) -> float:
        return self.time

    def wait_done(self, iteration: int, phase: Phase, timeout: float, **_: object) -> PhaseAcks:
        self.awaited.append((iteration, phase))
        self.time += self.seconds.get(phase, 0.0)
        payload = self.payloads.get(phase)
        acks = {} if payload is None else {"node0": NodeAck(node="node0", payload=payload.to_dict(), acked_at=0.0)}
        return PhaseAcks(iteration=iteration, phase=phase, acks=acks)

    def wait_phase(self, iteration: int, phase: Phase, timeout: float, **_: object) -> PhaseState:
        return PhaseState(iteration=iteration, phase=phase, weight_version=iteration)

    def complete(self, iteration: int, phase: Phase, payload: dict) -> None:
        self.awaited.append((iteration, phase))
        self.time += self.seconds.get(phase, 0.0)
        self.completed.append((iteration, phase, payload))


def _controller(
    tmp_path: Path,
    vllm: FakeVllm,
    budget: int = 8,
    engine: FakeEngine | None = None,
    reward: RewardConfig | None = None,
    repeat: RepeatDetection | None = None,
    vllm_node: str = "node0",
    log_metrics: Callable[[int, dict[str, float]], None] = lambda i, m: None,
) -> Controller:
    engine = engine or FakeEngine()
    task = AdditionTask(max_digits=2)
    pool = task.samples("train", 40, 0)
    rollout = RolloutConfig(
        prompts_per_iteration=4,
        max_response_tokens=8,
        iteration_token_budget=budget,
        group_size=2,
        repeat=repeat or RepeatDetection(),
    )
    return Controller(
        RunConfig(iterations=3),
        rollout,
        RunPaths(tmp_path).make(),
        phase_timeout=900.0,
        node="node0",
        shim=engine,
        vllms=lambda: SpreadVllmClient({vllm_node: vllm}),
        task=task,
        tokens=TOKENS,
        sampler=UniformSampler(pool, 0),
        buffer=PartialRolloutBuffer(rollout.buffer()),
        scorer=RewardScorer(reward or RewardConfig(), task),
        pool=pool,
        heldout=task.samples("heldout", 6, 0),
        log_metrics=log_metrics,
        clock=engine.clock,
    )


def test_rollout_writes_the_batch_and_the_checkpoint_half(tmp_path: Path) -> None:
    controller = _controller(tmp_path, FakeVllm(version=2))
    metrics = controller.rollout(FakeVllm(version=2), version=2)
    batch = load_batch(controller.paths.batch(2))
    uids = list(dict.fromkeys(batch.prompt_uids))
    assert len(uids) == 4
    assert batch.size == 8
    expected = [1.0 if int(uid.removeprefix("add:").split("+")[0]) % 2 == 0 else 0.0 for uid in batch.prompt_uids]
    assert batch.rewards.tolist() == expected
    assert metrics["reward/mean"] == pytest.approx(sum(expected) / 8)
    sums = [sum(map(int, uid.removeprefix("add:").split("+"))) for uid in batch.prompt_uids]
    right = [len(str(s)) + 1 for s, r in zip(sums, expected, strict=True) if r]
    assert metrics["rollout/correct_length"] == pytest.approx(sum(right) / len(right))  # the sum and a newline
    assert metrics["rollout/weight_version"] == 2
    state = json.loads(controller.paths.controller_state(3).read_text())
    assert set(state) == {"sampler", "buffer"}


class RepeatingVllm(FakeVllm):
    """Reports "repeat" for odd a (where the fake's answer is wrong) when a request asks for detection."""

    def __init__(self, version: int) -> None:
        super().__init__(version)
        self.requests: list[GenerationRequest] = []

    def _answer(self, r: GenerationRequest) -> Completion:
        self.requests.append(r)
        completion = super()._answer(r)
        odd = int(TOKENS.decode(r.prompt_ids).split("+")[0]) % 2
        return completion.model_copy(update={"finish_reason": "repeat"}) if odd and r.repeat_max_ngram else completion


def test_repeat_detection_reaches_vllm_and_the_penalty_the_reward(tmp_path: Path) -> None:
    vllm = RepeatingVllm(version=0)
    controller = _controller(
        tmp_path,
        vllm,
        reward=RewardConfig(repeat_penalty=2.0),
        repeat=RepeatDetection(enabled=True, max_ngram=3, min_repeats=4),
    )
    metrics = controller.rollout(vllm, version=0)
    assert {(r.repeat_max_ngram, r.repeat_min_repeats) for r in vllm.requests} == {(3, 4)}
    batch = load_batch(controller.paths.batch(0))
    odd = [int(uid.removeprefix("add:").split("+")[0]) % 2 for uid in batch.prompt_uids]
    assert batch.rewards.tolist() == [-2.0 if o else 1.0 for o in odd]  # wrong and repeating: 0 - 2
    assert metrics["rollout/repeat_share"] == pytest.approx(sum(odd) / len(odd))
    assert metrics["reward/term/repeat"] == pytest.approx(-2.0 * sum(odd) / len(odd))


def test_a_rollout_with_no_finished_group_generates_more_rounds(tmp_path: Path) -> None:
    vllm = FakeVllm(version=0, chunk=2)  # answers are 3-4 tokens: nothing finishes within one 2-token budget
    controller = _controller(tmp_path, vllm, budget=2)
    with pytest.raises(RuntimeError, match="no group finished within 4 generation rounds"):
        controller.rollout(vllm, version=0)
    controller = _controller(tmp_path / "b", FakeVllm(version=0, chunk=99), budget=8)
    assert controller.rollout(FakeVllm(version=0), version=0)["rollout/rounds"] == 1


def test_partial_rollouts_are_measured_in_the_batch_they_finish_in(tmp_path: Path) -> None:
    # A 3-token budget: two-digit sums and the newline finish at once, three-digit ones continue next version.
    controller = _controller(tmp_path, FakeVllm(version=0), budget=3)
    controller.rollout(FakeVllm(version=0), version=0)
    metrics = controller.rollout(FakeVllm(version=1), version=1)
    batch = load_batch(controller.paths.batch(1))
    sampled = batch.versions[batch.versions >= 0]
    assert metrics["rollout/stale_token_share"] == pytest.approx(float((sampled == 0).float().mean()))
    partial = float((batch.versions == 0).any(dim=1).float().mean())
    assert 0 < metrics["rollout/partial_share"] == pytest.approx(partial)
    lengths = sorted((batch.versions >= 0).sum(dim=1).tolist())
    assert metrics["rollout/length_max"] == lengths[-1]
    assert metrics["rollout/length_p50"] <= metrics["rollout/length_p90"] <= metrics["rollout/length_max"]
    assert metrics["rollout/mean_length"] == pytest.approx(sum(lengths) / len(lengths))


def test_state_round_trip_resumes_the_same_prompt_order(tmp_path: Path) -> None:
    first = _controller(tmp_path, FakeVllm(version=0))
    first.rollout(FakeVllm(version=0), version=0)
    expected = [s.uid for s in first.sampler.sample(4)]
    resumed = _controller(tmp_path, FakeVllm(version=1))
    resumed.load_state(1)
    assert [s.uid for s in resumed.sampler.sample(4)] == expected


def test_evaluation_counts_greedy_and_sampled_answers(tmp_path: Path) -> None:
    controller = _controller(tmp_path, FakeVllm(version=0))
    metrics = controller.evaluate(FakeVllm(version=0))
    even = sum(int(s.uid.removeprefix("add:").split("+")[0]) % 2 == 0 for s in controller.heldout) / 6
    assert metrics["eval/accuracy"] == pytest.approx(even)
    assert metrics["eval/pass@4"] == pytest.approx(even)
    assert metrics["eval/cons@4"] == pytest.approx(even)  # every sample states the same sum


def test_the_iteration_awaits_every_phase_in_table_order_and_times_each_itself(tmp_path: Path) -> None:
    seconds = dict(zip(CYCLE, [10.0, 1.0, 9.0, 25.0, 1.0, 4.0, 4.0, 1.0], strict=True))
    payloads = {
        Phase.TRAIN: MetricsAck(metrics={"train/loss": 0.5, "other": 1.0}),
        Phase.OFFLOAD: MoveAck(seconds=0.1, bytes_moved=64),
        Phase.EXPORT: ExportAck(
            convert_seconds=0.5, push_seconds=0.5, push_gb_per_s=1.0, bytes=8, weight_version=0, cold_start_seconds=3.0
        ),
        Phase.START_VLLM: StartVllmAck(pid=1, seconds=25.0),
        Phase.UPDATE_WEIGHTS: UpdateWeightsAck(weight_version=0, load_seconds=0.5),
        Phase.TERMINATE_VLLM: TerminateVllmAck(pids=[2], rss_freed_bytes=10, killed=False),
        Phase.ONLOAD: MoveAck(seconds=1.0),
    }
    engine, logged = FakeEngine(payloads, seconds), {}
    controller = _controller(tmp_path, FakeVllm(version=0), engine=engine, log_metrics=logged.__setitem__)
    controller.run_cfg = RunConfig(iterations=1)
    controller.run(0)
    # Iteration 0 begins at EXPORT of the cold start's weights; ROLLOUT is the controller's own, between them.
    assert engine.awaited == [(0, p) for p in CYCLE[2:]] + [(1, p) for p in CYCLE]
    assert [(i, p) for i, p, _ in engine.completed] == [(0, Phase.ROLLOUT), (1, Phase.ROLLOUT)]
    first, second = logged[0], logged[1]
    assert first["time/export"] == pytest.approx(1.0)  # the export's own work: the first one is split
    assert first["time/cold_start"] == pytest.approx(3.0)
    assert first["time/startup"] == pytest.approx(9.0 - 1.0 - 3.0)
    assert first["time/start_vllm"] == pytest.approx(25.0)
    assert first["time/onload"] == pytest.approx(1.0)
    assert first["vllm/weight_version/node0"] == 0
    assert "time/train" not in first
    assert second["time/train"] == pytest.approx(10.0)
    assert second["train/loss"] == 0.5
    assert "other" not in second
    assert second["offload/bytes_moved"] == 64
    assert second["time/export"] == pytest.approx(9.0)  # later exports are timed whole
    assert "time/startup" not in second


class DyingVllm(FakeVllm):
    """Loses the connection on the calls numbered in `dies` (1-based), as a killed sidecar does."""

    def __init__(self, version: int, dies: set[int], error: Exception | None = None) -> None:
        super().__init__(version)
        self.dies, self.error, self.asked = dies, error, []

    def generate(self, requests: list[GenerationRequest]) -> GenerateResponse:
        self.asked.append([(r.prompt_ids, r.seed) for r in requests])
        if len(self.asked) in self.dies:
            raise self.error or requests_lib.ConnectionError("Remote end closed connection without response")
        return super().generate(requests)


class RestartingEngine(FakeEngine):
    def __init__(self) -> None:
        super().__init__()
        self.restarted: list[int] = []

    def restart_vllm(self, version: int, timeout: float) -> RestartVllmAck:
        self.restarted.append(version)
        return RestartVllmAck(pid=4321, start_seconds=0.1, load_seconds=0.01, weight_version=version)


def _rollout_state(version: int) -> PhaseState:
    return PhaseState(iteration=version, phase=Phase.ROLLOUT, weight_version=version)


def test_a_vllm_lost_mid_rollout_is_restarted_and_gets_the_same_requests(tmp_path: Path) -> None:
    engine = RestartingEngine()
    vllm = DyingVllm(version=1, dies={3})  # evaluation takes calls 1 and 2; the rollout's first round dies
    controller = _controller(tmp_path, vllm, engine=engine)
    metrics = controller.rollout_phase(_rollout_state(1), evaluate=True, last=False)
    assert engine.restarted == [1]
    assert vllm.asked[3] == vllm.asked[2]  # the same prompts and seeds went again
    assert metrics["vllm/restarts"] == 1
    assert metrics["rollout/requests/node0"] == 6 + 6 + 8  # greedy and sampled held-out requests, the rollout
    assert metrics["vllm/restart_seconds"] >= 0
    assert load_batch(controller.paths.batch(1)).size == 8

    clean = DyingVllm(version=1, dies=set())
    reference = _controller(tmp_path / "clean", clean, engine=RestartingEngine())
    assert reference.rollout_phase(_rollout_state(1), evaluate=True, last=False)["vllm/restarts"] == 0
    assert clean.asked == [vllm.asked[i] for i in (0, 1, 3)]  # the batch an uninterrupted rollout makes


def test_restarts_are_bounded_and_a_refused_request_is_not_retried(tmp_path: Path) -> None:
    engine = RestartingEngine()
    controller = _controller(tmp_path, DyingVllm(version=1, dies={1, 2, 3}), engine=engine)
    with pytest.raises(
        JobFailedError,
        match=r"vLLM died 3 times during ROLLOUT of version 1 \(rollout.vllm_restarts=2\), the last time node0's",
    ):
        controller.rollout_phase(_rollout_state(1), evaluate=True, last=False)
    assert engine.restarted == [1, 1]
    refused = DyingVllm(version=1, dies={1}, error=SidecarError("POST /generate -> 422: bad request", 422))
    controller = _controller(tmp_path / "refused", refused, engine=engine)
    with pytest.raises(SidecarError, match="422"):
        controller.rollout_phase(_rollout_state(1), evaluate=True, last=False)
    assert engine.restarted == [1, 1]


class NodesEngine(FakeEngine):
    """The head's engine, knowing other nodes' engines only through `nodes()` (their etcd registrations)."""

    def __init__(self, nodes: dict[str, NodeAddress]) -> None:
        super().__init__()
        self.registered = nodes

    def nodes(self) -> dict[str, NodeAddress]:
        return self.registered

    def restart_vllm(self, version: int, timeout: float) -> RestartVllmAck:
        raise AssertionError("the head's engine was asked to restart another node's vLLM")


class OtherEngine:
    """Stands in for node1's engine client: records where it was asked and with which token."""

    asked: ClassVar[list[tuple[str, str | None, int]]] = []

    def __init__(self, base_url: str, token: str | None = None) -> None:
        self.base_url, self.token = base_url, token

    def restart_vllm(self, version: int, timeout: float) -> RestartVllmAck:
        OtherEngine.asked.append((self.base_url, self.token, version))
        return RestartVllmAck(pid=99, start_seconds=0.1, load_seconds=0.01, weight_version=version)

    def close(self) -> None:
        pass


NODE1 = {"node1": NodeAddress(engine="http://127.0.0.1:9", vllm="http://127.0.0.1:8")}


def test_another_nodes_lost_vllm_is_restarted_by_that_nodes_engine_with_its_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("engine.controller.EngineClient", OtherEngine)
    monkeypatch.setattr(OtherEngine, "asked", [])
    vllm = DyingVllm(version=1, dies={3})
    controller = _controller(tmp_path, vllm, engine=NodesEngine(NODE1), vllm_node="node1")
    controller.paths.engine_config("node1").write_text(json.dumps({"host": "127.0.0.1", "port": 9, "token": "t"}))
    metrics = controller.rollout_phase(_rollout_state(1), evaluate=True, last=False)
    assert OtherEngine.asked == [("http://127.0.0.1:9", "t", 1)]
    assert vllm.asked[3] == vllm.asked[2]  # the same prompts and seeds went again
    assert metrics["vllm/restarts"] == 1


@pytest.mark.parametrize(
    ("nodes", "token", "why"),
    [
        ({}, "t", "node1 has no live lease, so its engine cannot be asked"),
        (NODE1, "t", r"node1's engine at http://127\.0\.0\.1:9 did not answer: .*Connection refused"),
        (NODE1, None, r"/engine-node1\.json cannot be read .*: every node must share the run directory"),
    ],
)
def test_another_nodes_engine_that_cannot_restart_its_vllm_fails_the_job_saying_why(
    tmp_path: Path, nodes: dict, token: str | None, why: str
) -> None:
    controller = _controller(tmp_path, DyingVllm(version=1, dies={1}), engine=NodesEngine(nodes), vllm_node="node1")
    if token:
        controller.paths.engine_config("node1").write_text(json.dumps({"token": token}))
    with pytest.raises(
        JobFailedError, match="vLLM of node1 died during ROLLOUT and could not be started again: .*" + why
    ):
        controller.rollout_phase(_rollout_state(1), evaluate=True, last=False)
