"""The partial-rollout buffer (Kimi k1.5): unfinished trajectories wait here between iterations.

Consumes tokenized prompts (admitted by the caller's sampler) and generation results (what vLLM
returned for each request); produces generation requests for the next round and complete groups
(all G samples of a prompt finished) for the trainer. Pure Python: no processes, no I/O.

One iteration is one weight version. `plan_round` lists continuing trajectories first (oldest
first), then G new samples per new prompt; each request feeds prompt + response so far and may
generate `min(iteration budget left this version, max_response_tokens - response so far)` tokens,
so no trajectory passes `max_response_tokens`. `record` stamps every new token with the version
that sampled it. Planning again with the same version is another round of the same iteration:
each trajectory only gets what is left of its iteration budget (counted from its version stamps).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from checkpoint_engine.contracts.vllm_protocol import GENERATOR_FINISH_REASONS
from engine.trajectory import FinishReason, Trajectory

StalenessMode = Literal["exclude", "keep"]
STALENESS_MODES: tuple[StalenessMode, ...] = ("exclude", "keep")
STATE_FORMAT = 1

Key = tuple[str, int]


@dataclass(frozen=True)
class PartialRolloutConfig:
    """The buffer's slice of the `rollout` section (`RolloutConfig.buffer()`, which checks it)."""

    max_response_tokens: int  # hard cap on a trajectory's total response length
    iteration_token_budget: int  # max new tokens one trajectory may generate in one iteration
    group_size: int  # G samples per prompt; a group trains only when all G are finished
    staleness: StalenessMode  # exclude: tokens from older versions leave the loss (Kimi)
    max_staleness: int | None  # keep mode only: mask tokens more than N versions old


class TokenizedPrompt(Protocol):
    """What the buffer needs of a new prompt: the task sample's uid and its prompt token ids."""

    @property
    def uid(self) -> str: ...

    @property
    def prompt_ids(self) -> Sequence[int]: ...


@dataclass(frozen=True)
class PromptTokens:
    """A plain `TokenizedPrompt`."""

    uid: str
    prompt_ids: tuple[int, ...]


@dataclass(frozen=True)
class RolloutRequest:
    """Generate at most `max_tokens` tokens after `token_ids` (prompt + response so far) with weights `version`."""

    prompt_uid: str
    sample_index: int
    token_ids: tuple[int, ...]
    max_tokens: int
    version: int
    continued: bool  # the trajectory was already in the buffer before this round

    @property
    def key(self) -> Key:
        return (self.prompt_uid, self.sample_index)


@dataclass(frozen=True)
class RolloutResult:
    """What the generator returned for one request."""

    prompt_uid: str
    sample_index: int
    token_ids: tuple[int, ...]  # new tokens only
    logprobs: tuple[float, ...]  # sampling logprob of each new token
    finish_reason: FinishReason  # as the generator reported it
    version: int  # weight version that sampled them: must be the request's

    @property
    def key(self) -> Key:
        return (self.prompt_uid, self.sample_index)


@dataclass(frozen=True)
class Group:
    """All G finished samples of one prompt, ordered by sample index."""

    prompt_uid: str
    trajectories: tuple[Trajectory, ...]


def loss_mask(
    trajectory: Trajectory, current_version: int, staleness: StalenessMode, max_staleness: int | None = None
) -> list[bool]:
    """Per response token: does it enter the loss when training the policy of `current_version`?

    `exclude`: only tokens sampled by `current_version` (Kimi k1.5; older tokens still serve as context).
    `keep`: every token (the trainer corrects with importance weights), except tokens more than
    `max_staleness` versions old when that is set.
    """
    if staleness not in STALENESS_MODES:
        raise ValueError(f"staleness must be one of {STALENESS_MODES}, got {staleness!r}")
    newest = max(trajectory.versions, default=current_version)
    if newest > current_version:
        raise ValueError(
            f"trajectory {trajectory.key} has tokens from version {newest}, newer than the current {current_version}"
        )
    if staleness == "exclude":
        return [v == current_version for v in trajectory.versions]
    if max_staleness is None:
        return [True] * len(trajectory.versions)
    return [current_version - v <= max_staleness for v in trajectory.versions]


class PartialRolloutBuffer:
    """Trajectories in flight, keyed by (prompt_uid, sample_index), in admission order."""

    def __init__(self, config: PartialRolloutConfig) -> None:
        self.config = config
        self._trajectories: dict[Key, Trajectory] = {}
        self._pending: dict[Key, RolloutRequest] = {}
        self._version: int | None = None  # last planned version

    # ---- queries -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._trajectories)

    @property
    def version(self) -> int | None:
        return self._version

    @property
    def in_flight_uids(self) -> frozenset[str]:
        """Prompts admitted and not yet taken as a group: the sampler must not issue these again."""
        return frozenset(uid for uid, _ in self._trajectories)

    @property
    def pending(self) -> tuple[RolloutRequest, ...]:
        """Requests planned and not yet recorded."""
        return tuple(self._pending.values())

    def trajectories(self) -> list[Trajectory]:
        return list(self._trajectories.values())

    def unfinished(self) -> list[Trajectory]:
        return [t for t in self._trajectories.values() if not t.finished]

    def ready_groups(self) -> list[Group]:
        """Groups whose G samples are all finished, in admission order (not removed; see take_ready_groups)."""
        by_uid: dict[str, list[Trajectory]] = {}
        for (uid, _), traj in self._trajectories.items():
            by_uid.setdefault(uid, []).append(traj)
        return [
            Group(uid, tuple(sorted(trajs, key=lambda t: t.sample_index)))
            for uid, trajs in by_uid.items()
            if all(t.finished for t in trajs)
        ]

    def loss_mask(self, trajectory: Trajectory, current_version: int) -> list[bool]:
        return loss_mask(trajectory, current_version, self.config.staleness, self.config.max_staleness)

    # ---- planning ------------------------------------------------------------------------------
    def plan_round(self, new_prompts: Sequence[TokenizedPrompt], version: int) -> list[RolloutRequest]:
        """Requests for one round: continuing trajectories first (admission order), then G per new prompt."""
        if self._pending:
            raise RuntimeError(
                f"{len(self._pending)} requests of version {self._version} are not recorded; "
                "record their results or abort_pending() before planning again"
            )
        if self._version is not None and version < self._version:
            raise ValueError(f"weight version went backwards: planned {self._version} before, now {version}")
        self._check_new_prompts(new_prompts)
        self._version = version

        cfg = self.config
        requests: list[RolloutRequest] = []
        for traj in self._trajectories.values():
            if traj.finished:
                continue
            max_tokens = self._tokens_allowed(traj, version)
            if max_tokens > 0:
                requests.append(self._request(traj, max_tokens, version, continued=True))
        for prompt in new_prompts:
            for index in range(cfg.group_size):
                traj = Trajectory(prompt_uid=prompt.uid, sample_index=index, prompt_ids=list(prompt.prompt_ids))
                self._trajectories[traj.key] = traj
                requests.append(self._request(traj, self._tokens_allowed(traj, version), version, continued=False))

        self._pending = {r.key: r for r in requests}
        return requests

    def _check_new_prompts(self, new_prompts: Sequence[TokenizedPrompt]) -> None:
        in_flight = self.in_flight_uids
        seen: set[str] = set()
        for prompt in new_prompts:
            if prompt.uid in in_flight:
                raise ValueError(f"prompt {prompt.uid!r} is already in flight; the sampler must not issue it again")
            if prompt.uid in seen:
                raise ValueError(f"prompt {prompt.uid!r} appears twice among the new prompts")
            if not prompt.prompt_ids:
                raise ValueError(f"prompt {prompt.uid!r} has no token ids")
            seen.add(prompt.uid)

    def _tokens_allowed(self, traj: Trajectory, version: int) -> int:
        used_this_iteration = sum(v == version for v in traj.versions)
        return min(
            self.config.iteration_token_budget - used_this_iteration,
            self.config.max_response_tokens - len(traj.response_ids),
        )

    @staticmethod
    def _request(traj: Trajectory, max_tokens: int, version: int, continued: bool) -> RolloutRequest:
        return RolloutRequest(
            prompt_uid=traj.prompt_uid,
            sample_index=traj.sample_index,
            token_ids=tuple(traj.prompt_ids) + tuple(traj.response_ids),
            max_tokens=max_tokens,
            version=version,
            continued=continued,
        )

    # ---- recording -----------------------------------------------------------------------------
    def record(self, results: Iterable[RolloutResult]) -> None:
        """Append each result to its trajectory. All results are checked before any is applied."""
        results = list(results)
        seen: set[Key] = set()
        for res in results:
            request = self._pending.get(res.key)
            if request is None or res.key in seen:
                raise ValueError(f"no pending request for {res.key} (unknown, or its result was already recorded)")
            seen.add(res.key)
            self._check_result(res, request)
        for res in results:
            request = self._pending.pop(res.key)
            traj = self._trajectories[res.key]
            reason = self._finish_reason(traj, res, request)
            traj.extend(list(res.token_ids), list(res.logprobs), res.version, reason)

    @staticmethod
    def _check_result(res: RolloutResult, request: RolloutRequest) -> None:
        if res.finish_reason not in GENERATOR_FINISH_REASONS:
            raise ValueError(
                f"result {res.key}: finish_reason must be one of {GENERATOR_FINISH_REASONS}, got {res.finish_reason!r}"
            )
        if res.version != request.version:
            raise ValueError(f"result {res.key} is stamped version {res.version}, its request had {request.version}")
        if len(res.token_ids) != len(res.logprobs):
            raise ValueError(f"result {res.key}: {len(res.token_ids)} tokens but {len(res.logprobs)} logprobs")
        if len(res.token_ids) > request.max_tokens:
            raise ValueError(f"result {res.key}: {len(res.token_ids)} tokens, over max_tokens={request.max_tokens}")

    def _finish_reason(self, traj: Trajectory, res: RolloutResult, request: RolloutRequest) -> FinishReason:
        if res.finish_reason in ("stop", "repeat"):
            return res.finish_reason
        if len(traj.response_ids) + len(res.token_ids) >= self.config.max_response_tokens:
            return "length"  # no room left, whatever stopped it
        if res.finish_reason == "aborted":
            return "aborted"  # cut off (e.g. the rollout phase ended): continue next round
        if len(res.token_ids) < request.max_tokens:
            # "length" before max_tokens: the engine's context (max_model_len) is full; continuing
            # would stop at once again, so the trajectory ends here, truncated.
            return "length"
        return "length_budget"

    def abort_pending(self) -> int:
        """Give up the requests not recorded (the generator was stopped): their trajectories stay, unchanged
        but marked `aborted`, and continue next round. Returns how many were pending."""
        for key in self._pending:
            self._trajectories[key].finish_reason = "aborted"
        n = len(self._pending)
        self._pending = {}
        return n

    # ---- releasing -----------------------------------------------------------------------------
    def take_ready_groups(self, max_groups: int | None = None) -> list[Group]:
        """Remove and return up to `max_groups` ready groups (all, when None), oldest first; each exactly once."""
        if max_groups is not None and max_groups < 0:
            raise ValueError(f"max_groups must be >= 0 or None, got {max_groups}")
        groups = self.ready_groups()
        if max_groups is not None:
            groups = groups[:max_groups]
        for group in groups:
            for traj in group.trajectories:
                del self._trajectories[traj.key]
        return groups

    # ---- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: every trajectory in flight and the pending requests (a checkpoint's
        older "stats" entry is ignored)."""
        return {
            "format": STATE_FORMAT,
            "group_size": self.config.group_size,
            "version": self._version,
            "trajectories": [t.to_dict() for t in self._trajectories.values()],
            "pending": [
                {"key": list(r.key), "max_tokens": r.max_tokens, "version": r.version, "continued": r.continued}
                for r in self._pending.values()
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace this buffer's contents with `state` (from `state_dict`, possibly through JSON)."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"buffer state format must be {STATE_FORMAT}, got {state.get('format')!r}")
        if state["group_size"] != self.config.group_size:
            raise ValueError(
                f"buffer state has group_size {state['group_size']}, the config says {self.config.group_size}; "
                "its groups could never complete"
            )
        trajectories: dict[Key, Trajectory] = {}
        for d in state["trajectories"]:
            traj = Trajectory.from_dict(d)
            if traj.key in trajectories:
                raise ValueError(f"buffer state holds trajectory {traj.key} twice")
            if len(traj.response_ids) > self.config.max_response_tokens:
                raise ValueError(
                    f"trajectory {traj.key} has {len(traj.response_ids)} response tokens, more than "
                    f"rollout.max_response_tokens={self.config.max_response_tokens}"
                )
            trajectories[traj.key] = traj
        self._check_complete_groups(trajectories)
        pending: dict[Key, RolloutRequest] = {}
        for p in state["pending"]:
            key = (p["key"][0], p["key"][1])
            if key not in trajectories:
                raise ValueError(f"buffer state has a pending request for {key} but no such trajectory")
            pending[key] = self._request(trajectories[key], p["max_tokens"], p["version"], p["continued"])
        self._trajectories = trajectories
        self._pending = pending
        self._version = state["version"]

    def _check_complete_groups(self, trajectories: dict[Key, Trajectory]) -> None:
        indices: dict[str, list[int]] = {}
        for uid, index in trajectories:
            indices.setdefault(uid, []).append(index)
        expected = list(range(self.config.group_size))
        for uid, got in indices.items():
            if sorted(got) != expected:
                raise ValueError(f"buffer state: prompt {uid!r} has samples {sorted(got)}, expected {expected}")
