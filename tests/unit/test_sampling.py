"""Prompt samplers: epoch coverage, curriculum order, prioritized frequencies, exact resume."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from engine.sampling import (
    SAMPLERS,
    CurriculumOptions,
    CurriculumSampler,
    PrioritizedOptions,
    PrioritizedSampler,
    UniformSampler,
)
from engine.tasks.base import Sample


def make_pool(n: int, difficulties: list[float] | None = None) -> list[Sample]:
    diffs = difficulties or [float(i % 5) for i in range(n)]
    return [Sample(uid=f"p{i}", prompt=f"q{i}", answer=str(i), difficulty=diffs[i]) for i in range(n)]


def uids(samples: list[Sample]) -> list[str]:
    return [s.uid for s in samples]


# ---- uniform -------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3, 7, 10])
def test_uniform_covers_the_pool_once_per_epoch(n: int) -> None:
    pool = make_pool(10)
    sampler = UniformSampler(pool, seed=0)
    stream: list[str] = []
    calls = 35 // n + 1
    for _ in range(calls):
        batch = uids(sampler.sample(n))
        assert len(set(batch)) == n  # distinct within a call, also when the call spans two epochs
        stream += batch
    epochs = len(stream) // 10
    assert epochs >= 3
    for e in range(epochs):
        assert sorted(stream[10 * e : 10 * e + 10]) == sorted(uids(pool)), f"epoch {e}"
    assert sampler.epoch == (calls * n - 1) // 10  # epochs count from 0


def test_uniform_is_seeded() -> None:
    pool = make_pool(50)
    a, b, c = UniformSampler(pool, seed=1), UniformSampler(pool, seed=1), UniformSampler(pool, seed=2)
    first = uids(a.sample(20))
    assert first == uids(b.sample(20))
    assert first != uids(c.sample(20))
    assert first != uids(pool[:20])  # shuffled, not the pool order


# ---- curriculum ----------------------------------------------------------------------------------


def test_curriculum_by_difficulty_grows_from_easy_to_hard() -> None:
    difficulties = [float(d) for d in np.random.default_rng(3).permutation(20)]  # 0..19, shuffled
    pool = make_pool(20, difficulties)
    sampler = CurriculumSampler(pool, seed=0, options=CurriculumOptions(start_fraction=0.2, ramp_iterations=10))
    assert [pool[i].difficulty for i in sampler.order()] == sorted(difficulties)
    seen_at: dict[int, set[float]] = {}
    for iteration, expected_window in ((0, 4), (5, 12), (10, 20), (50, 20)):
        sampler.set_iteration(iteration)
        assert sampler.available() == expected_window
        seen_at[iteration] = {s.difficulty for _ in range(200) for s in sampler.sample(2)}
        assert seen_at[iteration] == {float(d) for d in range(expected_window)}, iteration
    # A call for more than the window widens it rather than repeating or failing.
    sampler.set_iteration(0)
    assert sorted(s.difficulty for s in sampler.sample(6)) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_curriculum_by_pass_rate_puts_unsolved_prompts_last() -> None:
    pool = make_pool(6)
    sampler = CurriculumSampler(
        pool, seed=0, options=CurriculumOptions(by="pass_rate", start_fraction=0.5, ramp_iterations=100)
    )
    sampler.update("p0", successes=0, trials=8)
    sampler.update("p1", successes=2, trials=8)
    sampler.update("p2", successes=8, trials=8)
    sampler.update("p3", successes=6, trials=8)
    order = [pool[i].uid for i in sampler.order()]
    # Unseen (p4, p5) count as pass rate 1.0, tied with p2; then p3, p1, p0.
    assert set(order[:3]) == {"p2", "p4", "p5"}
    assert order[3:] == ["p3", "p1", "p0"]
    drawn = {s.uid for _ in range(100) for s in sampler.sample(1)}
    assert drawn == {"p2", "p4", "p5"}  # the window is the easiest half


def test_curriculum_decay_weighs_recent_outcomes() -> None:
    pool = make_pool(2)
    latest = CurriculumSampler(pool, 0, CurriculumOptions(by="pass_rate", decay=0.0))
    history = CurriculumSampler(pool, 0, CurriculumOptions(by="pass_rate", decay=1.0))
    for s in (latest, history):
        s.update("p0", 8, 8)
        s.update("p0", 0, 8)
        s.update("p1", 3, 8)
    assert [pool[i].uid for i in latest.order()] == ["p1", "p0"]  # p0 at 0/8 now
    assert [pool[i].uid for i in history.order()] == ["p0", "p1"]  # p0 at 8/16 overall


# ---- prioritized ---------------------------------------------------------------------------------


def test_prioritized_frequencies_match_one_minus_success_rate() -> None:
    pool = make_pool(6)
    sampler = PrioritizedSampler(pool, seed=0, options=PrioritizedOptions(epsilon=0.05))
    rates = [0.0, 0.25, 0.5, 0.75, 1.0]  # p5 is never measured: initial success rate 0
    for uid, s in zip(["p0", "p1", "p2", "p3", "p4"], rates, strict=True):
        sampler.update(uid, successes=s * 8, trials=8)
    weights = np.array([1.0, 0.75, 0.5, 0.25, 0.05, 1.0])  # max(1 - s, epsilon)
    target = weights / weights.sum()
    assert sampler.probabilities() == pytest.approx(target)
    draws = 20_000
    counts = Counter(s.uid for _ in range(draws) for s in sampler.sample(1))
    freq = np.array([counts[f"p{i}"] for i in range(6)]) / draws
    assert np.abs(freq - target).max() < 0.015, (freq, target)
    assert counts["p4"] > 0  # solved, yet still drawn now and then


def test_prioritized_draws_distinct_prompts_and_follows_updates() -> None:
    pool = make_pool(30)
    sampler = PrioritizedSampler(pool, seed=5, options=PrioritizedOptions(epsilon=0.01))
    for _ in range(20):
        batch = uids(sampler.sample(12))
        assert len(set(batch)) == 12
    assert sorted(uids(sampler.sample(30))) == sorted(uids(pool))
    for i in range(29):
        sampler.update(f"p{i}", successes=4, trials=4)  # all solved but p29
    hits = Counter(s.uid for _ in range(500) for s in sampler.sample(1))
    assert hits["p29"] / 500 == pytest.approx(1 / (1 + 29 * 0.01), abs=0.06)


# ---- shared behaviour ----------------------------------------------------------------------------

OPTIONS = {
    "uniform": {},
    "curriculum": {"by": "pass_rate", "start_fraction": 0.3, "ramp_iterations": 6},
    "prioritized": {"epsilon": 0.1, "decay": 0.5},
}


def drive(sampler: object, steps: range, rng: np.random.Generator) -> list[list[str]]:
    """Draw and feed back outcomes like a controller would, recording the draws."""
    out = []
    for it in steps:
        sampler.set_iteration(it)  # type: ignore[attr-defined]
        batch = sampler.sample(7)  # type: ignore[attr-defined]
        out.append(uids(batch))
        for s in batch:
            sampler.update(s.uid, successes=int(rng.integers(0, 5)), trials=4)  # type: ignore[attr-defined]
    return out


def make_sampler(name: str, pool: list[Sample], seed: int, **options: object) -> object:
    cls, options_cls = SAMPLERS[name]
    return cls(pool, seed, options_cls(**options)) if options_cls else cls(pool, seed)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_restore_continues_with_identical_draws(name: str) -> None:
    pool = make_pool(25)
    original = make_sampler(name, pool, seed=11, **OPTIONS[name])
    drive(original, range(5), np.random.default_rng(0))
    state = json.loads(json.dumps(original.state_dict()))  # a checkpoint is plain data
    restored = make_sampler(name, pool, seed=11, **OPTIONS[name])
    restored.load_state_dict(state)
    fresh = make_sampler(name, pool, seed=11, **OPTIONS[name])
    future = drive(original, range(5, 12), np.random.default_rng(1))
    assert drive(restored, range(5, 12), np.random.default_rng(1)) == future
    assert drive(fresh, range(5, 12), np.random.default_rng(1)) != future  # the state mattered


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_restore_refuses_a_different_pool_seed_or_kind(name: str) -> None:
    pool = make_pool(10)
    state = make_sampler(name, pool, seed=1, **OPTIONS[name]).state_dict()
    with pytest.raises(ValueError, match="pool_digest"):
        make_sampler(name, pool[::-1], seed=1, **OPTIONS[name]).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        make_sampler(name, pool, seed=2, **OPTIONS[name]).load_state_dict(state)
    other = "uniform" if name != "uniform" else "prioritized"
    with pytest.raises(ValueError, match="kind"):
        make_sampler(other, pool, seed=1).load_state_dict(state)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_argument_checks(name: str) -> None:
    sampler = make_sampler(name, make_pool(5), seed=0)
    assert sampler.sample(0) == []
    with pytest.raises(ValueError, match=r"n must be an integer in 0\.\.5"):
        sampler.sample(6)
    with pytest.raises(ValueError, match="'nope' is not in the pool"):
        sampler.update("nope", 1, 2)
    with pytest.raises(ValueError, match="0 <= successes <= trials"):
        sampler.update("p0", 3, 2)
    with pytest.raises(ValueError, match="iteration must be"):
        sampler.set_iteration(-1)


def test_pool_checks() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        UniformSampler([], seed=0)
    pool = make_pool(3)
    with pytest.raises(ValueError, match=r"duplicate uids, e\.g\. \['p1'\]"):
        UniformSampler([*pool, pool[1]], seed=0)


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (CurriculumOptions, {"by": "length"}, r"sampler\.curriculum\.by must be one of \['difficulty', 'pass_rate'\]"),
        (CurriculumOptions, {"start_fraction": 0.0}, r"sampler\.curriculum\.start_fraction must be > 0"),
        (CurriculumOptions, {"ramp_iterations": -1}, r"sampler\.curriculum\.ramp_iterations"),
        (CurriculumOptions, {"decay": 1.5}, r"sampler\.curriculum\.decay must be <= 1"),
        (PrioritizedOptions, {"epsilon": 0.0}, r"sampler\.prioritized\.epsilon"),
        (PrioritizedOptions, {"initial_success_rate": -0.1}, r"sampler\.prioritized\.initial_success_rate"),
    ],
)
def test_options_name_the_bad_key(cls: type, kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)
