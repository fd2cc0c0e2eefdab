"""The iteration controller: owns ROLLOUT, evaluation, the replay buffer and the per-iteration record.

Consumes the job's phase (through the node's checkpoint engine), a live vLLM sidecar during
ROLLOUT, a task, a prompt sampler and the reward scorer. Produces, per iteration: the training
batch the next TRAIN reads (`RunPaths.batch`), the controller half of each checkpoint (sampler,
replay buffer), held-out evaluation, and one metrics record with the time of every phase.

    for each iteration i:   wait for ROLLOUT i  ->  evaluate (every N)  ->  roll out, score, batch
                            ->  ROLLOUT done  ->  wait for ONLOAD i to finish  ->  log iteration i
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass

from checkpoint_engine.contracts.acks import (
    AckPayload,
    ExportAck,
    MetricsAck,
    MoveAck,
    RestartVllmAck,
    StartVllmAck,
    TerminateVllmAck,
    UpdateWeightsAck,
    parse_ack,
)
from checkpoint_engine.contracts.engine_client import EngineClient, EngineError, JobFailedError
from checkpoint_engine.contracts.phases import CYCLE, Phase, PhaseState
from checkpoint_engine.contracts.run_dir import RunPaths
from checkpoint_engine.contracts.vllm_client import SpreadVllmClient, VllmLostError
from checkpoint_engine.contracts.vllm_protocol import GenerateResponse, GenerationRequest
from engine.batch import collate, save_batch
from engine.config import RolloutConfig, RunConfig
from engine.evaluation import mean_cons_at_n, mean_pass_at_k, percentile
from engine.replay_buffer import Group, PartialRolloutBuffer, PromptTokens, RolloutRequest, RolloutResult
from engine.rewards import RewardScorer
from engine.sampling import PromptSampler
from engine.tasks import Sample, Task

log = logging.getLogger("timeshare.controller")


@dataclass(frozen=True)
class Tokens:
    """The tokenizer's part the controller needs (plain callables: tests pass their own)."""

    encode: Callable[[str], list[int]]  # prompt text -> ids, special tokens included
    decode: Callable[[Sequence[int]], str]  # response ids -> text, special tokens dropped
    stop_ids: tuple[int, ...]  # a response ends at any of these (end of line, eos)
    pad_id: int


class Controller:
    def __init__(
        self,
        run: RunConfig,
        rollout: RolloutConfig,
        paths: RunPaths,
        *,
        phase_timeout: float,
        node: str,
        engine: EngineClient,
        rollout_engine: Callable[[], SpreadVllmClient],
        task: Task,
        tokens: Tokens,
        sampler: PromptSampler,
        buffer: PartialRolloutBuffer,
        scorer: RewardScorer,
        pool: Sequence[Sample],
        heldout: Sequence[Sample],
        log_metrics: Callable[[int, dict[str, float]], None],
        check_alive: Callable[[], None] = lambda: None,
    ) -> None:
        self.run_cfg, self.rollout_cfg, self.phase_timeout = run, rollout, phase_timeout
        self.paths, self.engine, self.rollout_engine = paths, engine, rollout_engine
        self.node = node  # the head, whose engine is `engine`; other nodes' engines are found through it
        self.task, self.tokens, self.sampler, self.buffer, self.scorer = task, tokens, sampler, buffer, scorer
        self.samples = {s.uid: s for s in pool}
        self.heldout = list(heldout)
        self.log_metrics, self.check_alive = log_metrics, check_alive
        self._last_phase_end: float | None = None
        self._first_iteration = 0
        self._serving = 0  # the weight version of the ROLLOUT in progress
        self._restarts: list[float] = []  # seconds of each vLLM restart in that ROLLOUT

    # ---------------------------------------------------------------------------------- loop
    def run(self, start: int) -> None:
        """Iterations `start`..`iterations`; the job's first phase (EXPORT of `start`) is already on."""
        self._last_phase_end, self._first_iteration = time.time(), start
        for i in range(start, self.run_cfg.iterations + 1):
            state = self._wait(i, Phase.ROLLOUT)
            metrics = self.rollout_phase(state, evaluate=self._eval_due(i, start), last=i == self.run_cfg.iterations)
            rewards = {k: v for k, v in metrics.items() if k.startswith("reward/")}
            self.engine.complete(i, Phase.ROLLOUT, MetricsAck(metrics=rewards))
            self._wait(i + 1, Phase.TRAIN)  # ONLOAD of i is done
            metrics.update(self.phase_metrics(i))
            self.log_metrics(i, metrics)

    def _wait(self, iteration: int, phase: Phase) -> PhaseState:
        """Wait for the job to reach `phase`, checking every few seconds that the node's processes live
        (a dead trainer would otherwise cost a whole phase timeout to notice)."""
        return self.engine.wait_phase(iteration, phase, self.phase_timeout, poll=5.0, before_poll=self.check_alive)

    def _eval_due(self, i: int, start: int) -> bool:
        return i == start or i % self.run_cfg.eval_every == 0 or i == self.run_cfg.iterations

    def rollout_phase(self, state: PhaseState, evaluate: bool, last: bool) -> dict[str, float]:
        """Evaluate and roll out with the version the ROLLOUT phase names."""
        vllm = self.rollout_engine()
        self._serving, self._restarts = state.weight_version, []
        try:
            metrics = self.evaluate(vllm) if evaluate else {}
            if not last:  # the last iteration's rollout would only feed a TRAIN that never comes
                metrics.update(self.rollout(vllm, state.weight_version))
        finally:
            vllm.close()
        metrics.update({f"rollout/requests/{node}": float(n) for node, n in vllm.served.items()})
        metrics["vllm/restarts"] = float(len(self._restarts))
        if self._restarts:
            metrics["vllm/restart_seconds"] = sum(self._restarts)
        return metrics

    def _generate(self, vllm: SpreadVllmClient, requests: list[GenerationRequest]) -> GenerateResponse:
        """`vllm.generate`; when a node's vLLM died meanwhile (no answer, or a server error), that node's engine
        starts it again with the same weights and the same requests go again, seeds included, so the batch is
        the one an uninterrupted rollout makes. At most rollout.vllm_restarts restarts per ROLLOUT."""
        while True:
            try:
                return vllm.generate(requests)
            except VllmLostError as e:
                lost = e
            if len(self._restarts) >= self.rollout_cfg.vllm_restarts:
                raise JobFailedError(
                    f"vLLM died {len(self._restarts) + 1} times during ROLLOUT of version {self._serving} "
                    f"(rollout.vllm_restarts={self.rollout_cfg.vllm_restarts}), the last time {lost.node}'s: "
                    f"{lost.cause}"
                ) from lost
            log.warning("vLLM of %s lost in ROLLOUT of version %d (%s); starting it again", lost.node,
                        self._serving, lost.cause)  # fmt: skip
            began = time.perf_counter()
            try:
                ack = self._restart_vllm(lost.node)
            except EngineError as e:
                raise JobFailedError(
                    f"vLLM of {lost.node} died during ROLLOUT and could not be started again: {e}"
                ) from e
            self._restarts.append(time.perf_counter() - began)
            log.info("vLLM of %s (pid %s) serves version %d again after %.1f s", lost.node, ack.pid,
                     ack.weight_version, self._restarts[-1])  # fmt: skip

    def _restart_vllm(self, node: str) -> RestartVllmAck:
        """Have `node`'s engine start its vLLM again with the version served: the controller's own engine for
        the head; another node's at the address it registered in etcd, with the token of its engine config in
        the run directory (which every node shares)."""
        if node == self.node:
            return self.engine.restart_vllm(self._serving, timeout=self.phase_timeout)
        where = self.engine.nodes().get(node)
        if where is None:
            raise EngineError(f"{node} has no live lease, so its engine cannot be asked")
        doc = self.paths.engine_config(node)
        try:
            token = json.loads(doc.read_text()).get("token")
        except OSError as e:
            raise EngineError(f"{doc} cannot be read ({e.strerror}): every node must share the run directory") from e
        with closing(EngineClient(where["engine"], token=token)) as other:
            try:
                return other.restart_vllm(self._serving, timeout=self.phase_timeout)
            except OSError as e:  # requests' errors: the other engine did not answer
                raise EngineError(f"{node}'s engine at {where['engine']} did not answer: {e}") from e

    # ------------------------------------------------------------------------------- rollout
    def _requests(self, requests: Sequence[RolloutRequest], seed: int) -> list[GenerationRequest]:
        repeat = self.rollout_cfg.repeat
        return [
            GenerationRequest(
                prompt_ids=list(r.token_ids),
                max_tokens=r.max_tokens,
                n=1,
                temperature=self.rollout_cfg.temperature,
                top_p=self.rollout_cfg.top_p,
                seed=seed + k,
                stop_token_ids=list(self.tokens.stop_ids),
                repeat_max_ngram=repeat.max_ngram if repeat.enabled else 0,
                repeat_min_repeats=repeat.min_repeats if repeat.enabled else 0,
            )
            for k, r in enumerate(requests)
        ]

    def rollout(self, vllm: SpreadVllmClient, version: int) -> dict[str, float]:
        """Continue buffered trajectories, start new prompts, score the finished groups, write the batch."""
        start, groups, rounds = time.perf_counter(), [], 0
        # Tokens out of vLLM, seconds of its generate requests, and of these the seconds inside vLLM.
        generated, generating, in_vllm = 0, 0.0, 0.0
        while not groups:
            if rounds == self.rollout_cfg.max_rounds:
                raise RuntimeError(
                    f"no group finished within {rounds} generation rounds of iteration {version}: raise "
                    "rollout.iteration_token_budget or rollout.max_rounds, or lower rollout.max_response_tokens"
                )
            self.sampler.set_iteration(version)
            in_flight = self.buffer.in_flight_uids
            new = [s for s in self.sampler.sample(self.rollout_cfg.prompts_per_iteration) if s.uid not in in_flight]
            prompts = [PromptTokens(s.uid, tuple(self.tokens.encode(s.prompt))) for s in new]
            requests = self.buffer.plan_iteration(prompts, version)
            asked = time.perf_counter()
            response = self._generate(
                vllm, self._requests(requests, seed=self.run_cfg.seed + 7919 * version + 131 * rounds)
            )
            generating += time.perf_counter() - asked
            in_vllm += response.seconds
            results = response.results
            generated += sum(len(s.token_ids) for res in results for s in res.samples)
            self.buffer.record(
                RolloutResult(prompt_uid=r.prompt_uid, sample_index=r.sample_index, token_ids=tuple(s.token_ids),
                              logprobs=tuple(s.logprobs), finish_reason=s.finish_reason, version=s.weight_version)
                for r, res in zip(requests, results, strict=True) for s in res.samples
            )  # fmt: skip
            groups = self.buffer.take_ready_groups()
            rounds += 1
        served = {t.versions[-1] for g in groups for t in g.trajectories if t.versions}
        rewards, correct, terms = self._score(groups, version)
        batch = collate(groups, version, self.buffer.config.staleness, self.tokens.pad_id)
        save_batch(batch, self.paths.batch(version))
        self._save_state(version + 1)
        n = len(rewards)
        return {
            "reward/mean": sum(rewards) / n,
            **{f"reward/term/{key}": sum(values) / n for key, values in terms.items()},
            "reward/correct": sum(correct) / n,
            **length_metrics(groups, version, correct),
            "rollout/groups": float(len(groups)),
            "rollout/rounds": float(rounds),
            "rollout/unfinished": float(len(self.buffer.unfinished())),
            # Of the batch's trajectories, the share vLLM stopped for repeating themselves (rollout.repeat).
            "rollout/repeat_share": sum(t.finish_reason == "repeat" for g in groups for t in g.trajectories) / n,
            "rollout/generate_seconds": time.perf_counter() - start,
            "rollout/tokens_per_second": generated / max(generating, 1e-9),  # over the sidecar's generate requests
            "rollout/serving_share": 1.0 - in_vllm / max(generating, 1e-9),  # of those requests, outside vLLM
            "rollout/weight_version": float(max(served)),  # what vLLM reported (the buffer refuses a mismatch)
        }

    def _score(self, groups: Sequence[Group], iteration: int) -> tuple[list[float], list[bool], dict[str, list[float]]]:
        """Each trajectory's total reward and correctness, and each reward term's contributions."""
        rewards, correct, terms = [], [], defaultdict(list)
        for group in groups:
            sample = self.samples[group.prompt_uid]
            trajs = group.trajectories
            scores = self.scorer.score_group(
                [self.tokens.decode(t.response_ids) for t in trajs], sample, [t.finish_reason for t in trajs],
                [len(t.response_ids) for t in trajs], iteration,
            )  # fmt: skip
            for t, total in zip(trajs, scores.totals, strict=True):
                t.reward = total
            self.sampler.update(group.prompt_uid, successes=float(sum(scores.correct)), trials=float(len(trajs)))
            rewards += scores.totals
            correct += scores.correct
            for key, values in scores.terms.items():
                terms[key] += values
        return rewards, correct, terms

    # ---------------------------------------------------------------------------- evaluation
    def evaluate(self, vllm: SpreadVllmClient) -> dict[str, float]:
        """Held-out accuracy: greedy (the headline number), and pass@1 / pass@k over k samples."""
        prompts = [self.tokens.encode(s.prompt) for s in self.heldout]
        stop, k = list(self.tokens.stop_ids), self.rollout_cfg.eval_samples
        common = {"max_tokens": self.rollout_cfg.max_response_tokens, "stop_token_ids": stop}
        greedy = self._generate(
            vllm, [GenerationRequest(prompt_ids=p, n=1, temperature=0.0, **common) for p in prompts]
        ).results
        temperature = self.rollout_cfg.temperature
        sampled = self._generate(vllm, [
            GenerationRequest(prompt_ids=p, n=k, temperature=temperature, seed=self.run_cfg.seed + j, **common)
            for j, p in enumerate(prompts)
        ]).results  # fmt: skip

        def right(sample: Sample, text: str) -> bool:
            return self.task.reward(text, sample) >= self.scorer.cfg.correct_threshold

        def vote_right(vote: str, prompt: tuple[Sample, list[str], list[str | None]]) -> bool:
            sample, texts, answers = prompt  # the majority answer is right when a response stating it is
            return right(sample, texts[answers.index(vote)])

        greedy_texts = [self.tokens.decode(r.samples[0].token_ids) for r in greedy]
        greedy_ok = [right(s, t) for s, t in zip(self.heldout, greedy_texts, strict=True)]
        texts = [[self.tokens.decode(x.token_ids) for x in r.samples] for r in sampled]
        answers = [[self.task.answer(t) for t in ts] for ts in texts]
        sampled_ok = [[right(s, t) for t in ts] for s, ts in zip(self.heldout, texts, strict=True)]
        return {
            "eval/accuracy": sum(greedy_ok) / len(greedy_ok),
            "eval/pass@1": mean_pass_at_k(sampled_ok, 1),
            f"eval/pass@{k}": mean_pass_at_k(sampled_ok, k),
            f"eval/cons@{k}": mean_cons_at_n(answers, list(zip(self.heldout, texts, answers, strict=True)), vote_right),
        }

    # ---------------------------------------------------------------------------- bookkeeping
    def _save_state(self, checkpoint_iteration: int) -> None:
        """The controller half of checkpoint `checkpoint_iteration` (its TRAIN writes the other half)."""
        if checkpoint_iteration % self.run_cfg.checkpoint_every:
            return
        path = self.paths.controller_state(checkpoint_iteration)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"sampler": self.sampler.state_dict(), "buffer": self.buffer.state_dict()}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(path)

    def load_state(self, checkpoint_iteration: int) -> None:
        state = json.loads(self.paths.controller_state(checkpoint_iteration).read_text())
        self.sampler.load_state_dict(state["sampler"])
        self.buffer.load_state_dict(state["buffer"])

    def phase_metrics(self, iteration: int) -> dict[str, float]:
        """Seconds per phase of `iteration` (from the nodes' ack times) and the trainer's reports."""
        acks = self.engine.iteration_acks(iteration)
        metrics: dict[str, float] = {}
        for phase in CYCLE:
            by_node = acks.get(phase.value)
            if not by_node:
                continue
            end = max(a["acked_at"] for a in by_node.values())
            if self._last_phase_end is not None:
                metrics[f"time/{phase.value.lower()}"] = max(end - self._last_phase_end, 0.0)
            self._last_phase_end = end
            payload = parse_ack(phase, next(iter(sorted(by_node.items())))[1]["payload"])
            metrics.update(_phase_payload(phase, payload))
            if phase is Phase.UPDATE_WEIGHTS:  # every node's vLLM: the version it loaded
                for node, ack in by_node.items():
                    loaded = parse_ack(phase, ack["payload"])
                    if isinstance(loaded, UpdateWeightsAck):
                        metrics[f"vllm/weight_version/{node}"] = float(loaded.weight_version)
        saved = self.paths.train_metrics(iteration)
        if Phase.TRAIN.value not in acks and saved.exists():  # a resumed run: TRAIN ran before the restart
            metrics.update(_phase_payload(Phase.TRAIN, MetricsAck(metrics=json.loads(saved.read_text()))))
        export = [parse_ack(Phase.EXPORT, a["payload"]) for _, a in sorted(acks.get(Phase.EXPORT.value, {}).items())]
        if export and isinstance(export[0], ExportAck) and iteration == self._first_iteration:
            # The launch's first EXPORT also waited for the trainer to start (and to do the cold start):
            # report that apart, so time/export means the same thing in every iteration.
            work = export[0].convert_seconds + export[0].push_seconds
            waited = metrics.get("time/export", work) - work - metrics.get("time/cold_start", 0.0)
            metrics["time/startup"], metrics["time/export"] = max(waited, 0.0), work
        return metrics


def length_metrics(groups: Sequence[Group], version: int, correct: Sequence[bool]) -> dict[str, float]:
    """The batch's response lengths, of the right answers among them (the length reward's target; absent
    when none is right), and how much of the batch partial rollouts carried over from older versions."""
    trajs = [t for g in groups for t in g.trajectories]
    lengths = sorted(len(t.response_ids) for t in trajs)
    right = [len(t.response_ids) for t, ok in zip(trajs, correct, strict=True) if ok]
    tokens = max(sum(lengths), 1)
    return {
        **({"rollout/correct_length": sum(right) / len(right)} if right else {}),
        "rollout/mean_length": sum(lengths) / len(lengths),
        "rollout/length_p50": percentile(lengths, 50),
        "rollout/length_p90": percentile(lengths, 90),
        "rollout/length_max": float(lengths[-1]),
        # Trajectories begun by an older version and continued from the replay buffer.
        "rollout/partial_share": sum(any(v != version for v in t.versions) for t in trajs) / len(trajs),
        "rollout/stale_token_share": sum(v != version for t in trajs for v in t.versions) / tokens,
    }


def _phase_payload(phase: Phase, payload: AckPayload) -> dict[str, float]:
    """The numbers worth logging from one node's ack of `phase`."""
    if phase is Phase.TRAIN and isinstance(payload, MetricsAck):
        return {k: v for k, v in payload.metrics.items() if k.startswith(("train/", "logprob_gap/"))}
    if isinstance(payload, ExportAck):
        cold = {"time/cold_start": payload.cold_start_seconds} if payload.cold_start_seconds else {}
        return {
            "push/gb_per_s": payload.push_gb_per_s,
            "push/bytes": float(payload.bytes),
            "push/weight_version": float(payload.weight_version),
            **cold,
        }
    if phase is Phase.OFFLOAD and isinstance(payload, MoveAck):
        return {"offload/bytes_moved": float(payload.bytes_moved)}
    if isinstance(payload, StartVllmAck):  # the start-up's parts: the zygote's imports and compiles, fork, build
        return {"vllm/import_seconds": payload.import_seconds, "vllm/compile_seconds": payload.compile_seconds,
                "vllm/fork_seconds": payload.fork_seconds, "vllm/build_seconds": payload.build_seconds,
                "vllm/start_seconds": payload.seconds, "vllm/start_retries": float(payload.retries)}  # fmt: skip
    if isinstance(payload, TerminateVllmAck):
        return {"vllm/kill_seconds": payload.seconds, "vllm/rss_freed_bytes": float(payload.rss_freed_bytes)}
    return {}
