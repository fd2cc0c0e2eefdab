"""Prompt samplers: which task samples the next rollout starts from.

Consumes a pool of `Sample`s (distinct uids), a seed, and for the adaptive samplers per-prompt
outcomes (`update(uid, successes, trials)`, called once a group is scored); produces
`sample(n)`: n distinct samples per call. `state_dict()` / `load_state_dict()` hold everything
that decides future draws (RNG, epoch, success counts, iteration), as plain JSON-able data, so a
restored sampler draws exactly what the original would have.

- `uniform`: shuffled epochs without replacement: each prompt once per epoch. A call that spans
  two epochs takes the rest of the old one, then fresh prompts from the new one (the new epoch
  still holds every prompt once; only the order of its head is adjusted).
- `curriculum`: the pool ordered easy to hard, by `Sample.difficulty` (ascending) or by measured
  pass rate (descending; unseen prompts count as `unseen_pass_rate`, 1.0 by default so they get
  tried early); ties are broken by a fixed seeded order. At iteration t the easiest
  max(n, ceil(f(t) * N)) prompts are available, f(t) = start_fraction + (1 - start_fraction) *
  min(1, t / ramp_iterations); a call draws uniformly from them (no repeat within a call).
- `prioritized`: P(prompt) proportional to max(1 - s, epsilon), s its success rate
  (`initial_success_rate` until measured). Exact for n = 1; a call of n > 1 draws without
  replacement (successive proportional draws, as torch.multinomial does), which flattens the
  distribution a little when n is a large share of the pool.

Success rates (curriculum by pass rate, prioritized) come from counts: each update first
multiplies the prompt's old counts by `decay` (0: only the latest update counts; 1: all history).
All samplers have the same methods, so the controller never branches on the kind: `update` and
`set_iteration` check their arguments and do nothing where they do not apply.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal, Protocol

import numpy as np
from pydantic import Field

from checkpoint_engine.contracts.config import Section
from engine.tasks.base import Sample

STATE_FORMAT = 1
CurriculumKey = Literal["difficulty", "pass_rate"]


class PromptSampler(Protocol):
    kind: str

    def sample(self, n: int) -> list[Sample]: ...

    def update(self, uid: str, successes: float, trials: float) -> None: ...

    def set_iteration(self, iteration: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class CurriculumOptions(Section):
    KEY = "sampler.curriculum"
    by: CurriculumKey = "difficulty"
    start_fraction: float = Field(0.2, gt=0, le=1)  # share of the pool (easiest first) available at iteration 0
    ramp_iterations: int = Field(100, ge=0)  # the whole pool is available from this iteration on (0: from the start)
    unseen_pass_rate: float = Field(1.0, ge=0, le=1)  # pass_rate ordering: where unmeasured prompts sit (1 = easiest)
    decay: float = Field(0.0, ge=0, le=1)

    def fraction(self, iteration: int) -> float:
        """Share of the ordered pool available at `iteration`."""
        if self.ramp_iterations == 0:
            return 1.0
        return self.start_fraction + (1 - self.start_fraction) * min(1.0, iteration / self.ramp_iterations)


class PrioritizedOptions(Section):
    KEY = "sampler.prioritized"
    epsilon: float = Field(0.05, gt=0, le=1)  # floor on 1 - s, so solved prompts still come up now and then
    initial_success_rate: float = Field(0.0, ge=0, le=1)  # s of a prompt never measured
    decay: float = Field(0.0, ge=0, le=1)


class _PoolSampler(ABC):
    """What every sampler shares: the pool, the RNG, argument checks and the state envelope."""

    kind: ClassVar[str]

    def __init__(self, pool: Sequence[Sample], seed: int) -> None:
        self.pool: tuple[Sample, ...] = tuple(pool)
        if not self.pool:
            raise ValueError(f"{self.kind} sampler needs a non-empty pool")
        self._index = {s.uid: i for i, s in enumerate(self.pool)}
        if len(self._index) != len(self.pool):
            dupes = sorted(uid for uid, count in Counter(s.uid for s in self.pool).items() if count > 1)[:5]
            raise ValueError(f"{self.kind} sampler pool has duplicate uids, e.g. {dupes}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"sampler seed must be an integer, got {seed!r}")
        self.seed = seed
        self.iteration = 0
        self._rng = np.random.default_rng(seed)
        # Order-sensitive: stored indices only mean the same prompts in the same pool order.
        self._digest = hashlib.sha256("\n".join(self._index).encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.pool)

    def sample(self, n: int) -> list[Sample]:
        """`n` distinct samples of the pool."""
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= len(self.pool):
            raise ValueError(f"{self.kind} sampler: n must be an integer in 0..{len(self.pool)} (pool size), got {n!r}")
        return [self.pool[i] for i in self._draw(n)]

    def set_iteration(self, iteration: int) -> None:
        if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
            raise ValueError(f"iteration must be an integer >= 0, got {iteration!r}")
        self.iteration = iteration

    def update(self, uid: str, successes: float, trials: float) -> None:
        """Record `successes` out of `trials` samples of prompt `uid` (no effect on this sampler)."""
        self._check_update(uid, successes, trials)

    def _check_update(self, uid: str, successes: float, trials: float) -> int:
        if uid not in self._index:
            raise ValueError(f"{self.kind} sampler: prompt {uid!r} is not in the pool")
        for name, value in (("successes", successes), ("trials", trials)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{self.kind} sampler: {name} must be a finite number, got {value!r}")
        if not 0 <= successes <= trials or trials <= 0:
            raise ValueError(
                f"{self.kind} sampler: need 0 <= successes <= trials and trials > 0, got {successes}/{trials}"
            )
        return self._index[uid]

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "kind": self.kind,
            "pool_digest": self._digest,
            "seed": self.seed,
            "iteration": self.iteration,
            "rng": self._rng.bit_generator.state,
            **self._own_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        expected = {"format": STATE_FORMAT, "kind": self.kind, "pool_digest": self._digest, "seed": self.seed}
        for key, want in expected.items():
            if state.get(key) != want:
                raise ValueError(
                    f"{self.kind} sampler state has {key}={state.get(key)!r}, this sampler has {want!r}; "
                    "a state only restores onto the same kind, seed and pool (same task, split, size and order)"
                )
        self.iteration = int(state["iteration"])
        self._rng.bit_generator.state = dict(state["rng"])
        self._load_own_state(state)

    @abstractmethod
    def _draw(self, n: int) -> list[int]:
        """Pool indices of `n` distinct prompts, advancing the sampler's state."""

    @abstractmethod
    def _own_state(self) -> dict[str, Any]:
        """What, besides the RNG and the iteration, decides this sampler's future draws."""

    @abstractmethod
    def _load_own_state(self, state: Mapping[str, Any]) -> None: ...


class _SuccessCounts:
    """Per-prompt (discounted) success and trial counts, indexed like the pool."""

    def __init__(self, size: int, decay: float) -> None:
        self.decay = decay
        self.successes = np.zeros(size)
        self.trials = np.zeros(size)

    def add(self, i: int, successes: float, trials: float) -> None:
        self.successes[i] = self.decay * self.successes[i] + successes
        self.trials[i] = self.decay * self.trials[i] + trials

    def rates(self, unseen: float) -> np.ndarray:
        seen = self.trials > 0
        out = np.full(len(self.trials), unseen, dtype=np.float64)
        out[seen] = self.successes[seen] / self.trials[seen]
        return out

    def state(self) -> dict[str, list[float]]:
        return {"successes": self.successes.tolist(), "trials": self.trials.tolist()}

    def load(self, state: Mapping[str, Any]) -> None:
        self.successes = np.asarray(state["successes"], dtype=np.float64)
        self.trials = np.asarray(state["trials"], dtype=np.float64)


class UniformSampler(_PoolSampler):
    kind = "uniform"

    def __init__(self, pool: Sequence[Sample], seed: int) -> None:
        super().__init__(pool, seed)
        self.epoch = 0
        self._order: list[int] = self._rng.permutation(len(self.pool)).tolist()
        self._cursor = 0

    def _draw(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            if self._cursor == len(self._order):
                self._next_epoch(taken=set(out), need=n - len(out))
            out.append(self._order[self._cursor])
            self._cursor += 1
        return out

    def _next_epoch(self, taken: set[int], need: int) -> None:
        order: list[int] = self._rng.permutation(len(self.pool)).tolist()
        if taken:
            # This call already took `taken` from the old epoch: bring `need` others to the front.
            head = [i for i in order if i not in taken][:need]
            in_head = set(head)
            order = head + [i for i in order if i not in in_head]
        self._order, self._cursor, self.epoch = order, 0, self.epoch + 1

    def _own_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "order": list(self._order), "cursor": self._cursor}

    def _load_own_state(self, state: Mapping[str, Any]) -> None:
        self.epoch, self._order, self._cursor = int(state["epoch"]), list(state["order"]), int(state["cursor"])


class CurriculumSampler(_PoolSampler):
    kind = "curriculum"

    def __init__(self, pool: Sequence[Sample], seed: int, options: CurriculumOptions | None = None) -> None:
        super().__init__(pool, seed)
        self.options = options or CurriculumOptions()
        # A fixed tie-break from its own stream, so it never shifts the draws and needs no saving.
        self._tiebreak = np.random.default_rng([seed, 1]).permutation(len(self.pool))
        self._difficulty = np.array([s.difficulty for s in self.pool], dtype=np.float64)
        self._counts = _SuccessCounts(len(self.pool), self.options.decay)

    def update(self, uid: str, successes: float, trials: float) -> None:
        self._counts.add(self._check_update(uid, successes, trials), successes, trials)

    def order(self) -> list[int]:
        """Pool indices from easiest to hardest, as of now."""
        if self.options.by == "difficulty":
            primary = self._difficulty
        else:
            primary = -self._counts.rates(self.options.unseen_pass_rate)
        return np.lexsort((self._tiebreak, primary)).tolist()

    def available(self, n: int = 0) -> int:
        """How many of the easiest prompts a call for `n` draws from at the current iteration."""
        # The epsilon keeps float error (0.1 * 30 = 3.0000000000000004) from adding a prompt.
        size = math.ceil(self.options.fraction(self.iteration) * len(self.pool) - 1e-9)
        return min(len(self.pool), max(n, size, 1))

    def _draw(self, n: int) -> list[int]:
        window = self.order()[: self.available(n)]
        return [window[j] for j in self._rng.choice(len(window), size=n, replace=False).tolist()]

    def _own_state(self) -> dict[str, Any]:
        return self._counts.state()

    def _load_own_state(self, state: Mapping[str, Any]) -> None:
        self._counts.load(state)


class PrioritizedSampler(_PoolSampler):
    kind = "prioritized"

    def __init__(self, pool: Sequence[Sample], seed: int, options: PrioritizedOptions | None = None) -> None:
        super().__init__(pool, seed)
        self.options = options or PrioritizedOptions()
        self._counts = _SuccessCounts(len(self.pool), self.options.decay)

    def update(self, uid: str, successes: float, trials: float) -> None:
        self._counts.add(self._check_update(uid, successes, trials), successes, trials)

    def weights(self) -> np.ndarray:
        return np.maximum(1.0 - self._counts.rates(self.options.initial_success_rate), self.options.epsilon)

    def probabilities(self) -> np.ndarray:
        """The chance of each pool index being drawn by `sample(1)`."""
        w = self.weights()
        return w / w.sum()

    def _draw(self, n: int) -> list[int]:
        if n == 0:
            return []
        # Exponential race: the n smallest Exp(1) / w_i are n successive proportional draws.
        keys = self._rng.exponential(size=len(self.pool)) / self.weights()
        chosen = np.argpartition(keys, n - 1)[:n]
        return chosen[np.argsort(keys[chosen], kind="stable")].tolist()

    def _own_state(self) -> dict[str, Any]:
        return self._counts.state()

    def _load_own_state(self, state: Mapping[str, Any]) -> None:
        self._counts.load(state)


SAMPLERS: dict[str, tuple[type[_PoolSampler], type | None]] = {
    "uniform": (UniformSampler, None),
    "curriculum": (CurriculumSampler, CurriculumOptions),
    "prioritized": (PrioritizedSampler, PrioritizedOptions),
}


SamplerKind = Literal["uniform", "curriculum", "prioritized"]


class SamplerConfig(Section):
    """The `sampler` section: which prompts each rollout starts from (see the module docstring)."""

    KEY = "sampler"
    kind: SamplerKind = "uniform"
    curriculum: CurriculumOptions = CurriculumOptions()  # read when kind=curriculum
    prioritized: PrioritizedOptions = PrioritizedOptions()  # read when kind=prioritized

    def make(self, pool: Sequence[Sample], seed: int) -> PromptSampler:
        if self.kind == "curriculum":
            return CurriculumSampler(pool, seed, self.curriculum)
        if self.kind == "prioritized":
            return PrioritizedSampler(pool, seed, self.prioritized)
        return UniformSampler(pool, seed)
