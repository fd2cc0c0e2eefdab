"""The iteration controller: the job's iteration, phase by phase, on the head; owns ROLLOUT.

Consumes the job's phase (through the node's checkpoint engine, the shim), the live vLLM sidecars of
every node during ROLLOUT, a task, a prompt sampler and the reward scorer. Produces, per iteration:
the training batch the next TRAIN reads (`RunPaths.batch`), the controller half of each checkpoint
(sampler, replay buffer), held-out evaluation, and one metrics record with the time of every phase
(`Controller.run` awaits each phase in `contracts.phases.TABLE` order and times it itself).
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import closing
from pathlib import Path

from checkpoint_engine.contracts.acks import MetricsAck, RestartVllmAck
from checkpoint_engine.contracts.engine_client import EngineClient, EngineError, JobFailedError
from checkpoint_engine.contracts.phases import Phase, PhaseState
from checkpoint_engine.contracts.run_dir import RunPaths
from checkpoint_engine.contracts.vllm_client import SpreadVllmClient, VllmLostError
from checkpoint_engine.contracts.vllm_protocol import GenerateResponse, GenerationRequest
from engine.batch import collate, load_batch, save_batch
from engine.config import RolloutConfig, RunConfig
from engine.evaluation import mean_cons_at_n, mean_pass_at_k, percentile
from engine.iteration_record import IterationRecord, PhaseClock, train_metrics
from engine.replay_buffer import Group, PartialRolloutBuffer, PromptTokens, RolloutRequest, RolloutResult
from engine.rewards import GroupInput, RewardScorer
from engine.sampling import PromptSampler
from engine.tasks import Sample, Task
from engine.tasks.base import take_task_metrics
from engine.tokenizer import Tokens

log = logging.getLogger("timeshare.controller")


class Controller:
    def __init__(
        self,
        run: RunConfig,
        rollout: RolloutConfig,
        paths: RunPaths,
        *,
        phase_timeout: float,
        node: str,
        shim: EngineClient,
        vllms: Callable[[], SpreadVllmClient],
        task: Task,
        tokens: Tokens,
        sampler: PromptSampler,
        buffer: PartialRolloutBuffer,
        scorer: RewardScorer,
        pool: Sequence[Sample],
        heldout: Sequence[Sample],
        log_metrics: Callable[[int, dict[str, float]], None],
        check_alive: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.run_cfg, self.rollout_cfg, self.phase_timeout = run, rollout, phase_timeout
        self.paths, self.shim, self.vllms = paths, shim, vllms
        self.node = node  # the head, whose engine is `shim`; other nodes' engines are found through it
        self.task, self.tokens, self.sampler, self.buffer, self.scorer = task, tokens, sampler, buffer, scorer
        self.samples = {s.uid: s for s in pool}
        self.heldout = list(heldout)
        self.log_metrics, self.check_alive, self.clock = log_metrics, check_alive, clock
        self._serving = 0  # the weight version of the ROLLOUT in progress
        self._restarts: list[float] = []  # seconds of each vLLM restart in that ROLLOUT

    # ------------------------------------------------------------------------- the iteration
    def run(self, start: int) -> None:
        """Iterations `start`..`run.iterations`, every phase in table order. The job begins at EXPORT of
        `start` (the cold start's checkpoint, or the resumed one); a phase lasts until its last ack."""
        clock = PhaseClock(self.clock)
        for i in range(start, self.run_cfg.iterations + 1):
            it = IterationRecord(i, clock, first=i == start)
            if i == start:
                it.metrics.update(self.trained_before(i))  # a resumed run's TRAIN i ran before the restart
            else:
                self.done(it, Phase.TRAIN)  # the trainer ranks learn from the last rollout and checkpoint
                self.done(it, Phase.OFFLOAD)  # their state leaves the accelerator
            self.done(it, Phase.EXPORT)  # HF tensors into each node's region; vLLM starts meanwhile
            self.done(it, Phase.START_VLLM)  # every node's vLLM up, with dummy weights
            self.done(it, Phase.UPDATE_WEIGHTS)  # ... and serving the new version, checked
            self.roll_out(it)  # ROLLOUT, here: evaluate, generate, score, write the next batch
            self.done(it, Phase.TERMINATE_VLLM)  # vLLM killed on every node, its memory back
            self.done(it, Phase.ONLOAD)  # the trainer's state back on the accelerator
            self.log_metrics(i, it.metrics)

    def done(self, it: IterationRecord, phase: Phase) -> None:
        """Wait until `phase` of the iteration is done, checking every few seconds that the node's processes
        live (a dead trainer would otherwise cost a whole phase timeout to notice); record it."""
        acks = self.shim.wait_done(it.iteration, phase, self.phase_timeout, poll=5.0, before_poll=self.check_alive)
        it.done(phase, acks.payloads())

    def roll_out(self, it: IterationRecord) -> None:
        state = self.shim.wait_phase(
            it.iteration, Phase.ROLLOUT, self.phase_timeout, poll=5.0, before_poll=self.check_alive
        )
        last = it.iteration == self.run_cfg.iterations
        metrics = self.rollout_phase(state, evaluate=it.first or self._eval_due(it.iteration), last=last)
        rewards = {k: v for k, v in metrics.items() if k.startswith("reward/")}
        self.shim.complete(it.iteration, Phase.ROLLOUT, MetricsAck(metrics=rewards))
        it.done(Phase.ROLLOUT, {})
        it.metrics.update(metrics)

    def trained_before(self, iteration: int) -> dict[str, float]:
        """TRAIN's report of `iteration`, kept with its checkpoint (none at the start of a new run)."""
        saved = self.paths.train_metrics(iteration)
        return train_metrics(MetricsAck(metrics=json.loads(saved.read_text()))) if saved.exists() else {}

    def _eval_due(self, i: int) -> bool:
        return i % self.run_cfg.eval_every == 0 or i == self.run_cfg.iterations

    def rollout_phase(self, state: PhaseState, evaluate: bool, last: bool) -> dict[str, float]:
        """Evaluate and roll out with the version the ROLLOUT phase names."""
        vllm = self.vllms()
        self._serving, self._restarts = state.weight_version, []
        try:
            metrics = self.evaluate(vllm) if evaluate else {}
            # The last iteration's rollout would only feed a TRAIN that never comes.
            if not last and self.run_cfg.mode == "train_only":
                metrics.update(self.saved_rollout(state.weight_version))
            elif not last:
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
            log.warning(
                "vLLM of %s lost in ROLLOUT of version %d (%s); starting it again", lost.node, self._serving, lost.cause
            )
            began = time.perf_counter()
            try:
                ack = self._restart_vllm(lost.node)
            except EngineError as e:
                raise JobFailedError(
                    f"vLLM of {lost.node} died during ROLLOUT and could not be started again: {e}"
                ) from e
            self._restarts.append(time.perf_counter() - began)
            log.info(
                "vLLM of %s (pid %s) serves version %d again after %.1f s",
                lost.node,
                ack.pid,
                ack.weight_version,
                self._restarts[-1],
            )

    def _restart_vllm(self, node: str) -> RestartVllmAck:
        """Have `node`'s engine start its vLLM again with the version served: the controller's own engine for
        the head; another node's at the address it registered in etcd, with the token of its engine config in
        the run directory (which every node shares)."""
        if node == self.node:
            return self.shim.restart_vllm(self._serving, timeout=self.phase_timeout)
        where = self.shim.nodes().get(node)
        if where is None:
            raise EngineError(f"{node} has no live lease, so its engine cannot be asked")
        try:
            token = self.paths.engine_token(node)
        except OSError as e:
            raise EngineError(
                f"{self.paths.engine_config(node)} cannot be read ({e.strerror}): every node must share the run "
                "directory"
            ) from e
        with closing(EngineClient(where.engine, token=token)) as other:
            try:
                return other.restart_vllm(self._serving, timeout=self.phase_timeout)
            except OSError as e:  # requests' errors: the other engine did not answer
                raise EngineError(f"{node}'s engine at {where.engine} did not answer: {e}") from e

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
            requests = self.buffer.plan_round(prompts, version)
            asked = time.perf_counter()
            response = self._generate(
                vllm, self._requests(requests, seed=self.run_cfg.seed + 7919 * version + 131 * rounds)
            )
            generating += time.perf_counter() - asked
            in_vllm += response.seconds
            results = response.results
            generated += sum(len(s.token_ids) for res in results for s in res.samples)
            self.buffer.record(
                RolloutResult(
                    prompt_uid=r.prompt_uid,
                    sample_index=r.sample_index,
                    token_ids=tuple(s.token_ids),
                    logprobs=tuple(s.logprobs),
                    finish_reason=s.finish_reason,
                    version=s.weight_version,
                )
                for r, res in zip(requests, results, strict=True)
                for s in res.samples
            )
            groups = self.buffer.take_ready_groups()
            rounds += 1
        served = {t.versions[-1] for g in groups for t in g.trajectories if t.versions}
        rewards, correct, terms = self._score(groups, version)
        cfg = self.buffer.config
        batch = collate(groups, version, cfg.staleness, self.tokens.pad_id, cfg.max_staleness)
        save_batch(batch, self.paths.batch(version))
        self._save_state(version + 1)
        n = len(rewards)
        return {
            **take_task_metrics(self.task),
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

    def saved_rollout(self, version: int) -> dict[str, float]:
        """run.mode=train_only: the batch run.batches_from rolled out with `version` becomes this run's."""
        batch = load_batch(RunPaths(Path(self.run_cfg.batches_from or "")).batch(version))
        save_batch(batch, self.paths.batch(version))
        self._save_state(version + 1)
        return {"reward/mean": float(batch.rewards.mean()), "rollout/groups": float(batch.size // batch.group_size)}

    def _score(self, groups: Sequence[Group], iteration: int) -> tuple[list[float], list[bool], dict[str, list[float]]]:
        """Each trajectory's total reward and correctness, and each reward term's contributions."""
        rewards, correct, terms = [], [], defaultdict(list)
        inputs = [
            GroupInput(
                [self.tokens.decode(t.response_ids) for t in g.trajectories],
                self.samples[g.prompt_uid],
                [t.finish_reason for t in g.trajectories],
                [len(t.response_ids) for t in g.trajectories],
            )
            for g in groups
        ]
        for group, scores in zip(groups, self.scorer.score_groups(inputs, iteration), strict=True):
            trajs = group.trajectories
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
        sampled = self._generate(
            vllm,
            [
                GenerationRequest(prompt_ids=p, n=k, temperature=temperature, seed=self.run_cfg.seed + j, **common)
                for j, p in enumerate(prompts)
            ],
        ).results

        def right(text: str, sample: Sample) -> bool:
            return self.task.reward(text, sample) >= self.scorer.cfg.correct_threshold

        def vote_right(vote: str, prompt: tuple[list[str | None], list[bool]]) -> bool:
            answers, ok = prompt  # the majority answer is right when a response stating it is
            return ok[answers.index(vote)]

        greedy_texts = [self.tokens.decode(r.samples[0].token_ids) for r in greedy]
        greedy_ok = self.scorer.map(right, list(zip(greedy_texts, self.heldout, strict=True)))
        texts = [[self.tokens.decode(x.token_ids) for x in r.samples] for r in sampled]
        answers = [[self.task.answer(t) for t in ts] for ts in texts]
        flat_ok = iter(self.scorer.map(right, [(t, s) for s, ts in zip(self.heldout, texts, strict=True) for t in ts]))
        sampled_ok = [[next(flat_ok) for _ in ts] for ts in texts]
        task_counts = {key.replace("reward/", "eval/", 1): v for key, v in take_task_metrics(self.task).items()}
        return {
            "eval/accuracy": sum(greedy_ok) / len(greedy_ok),
            "eval/pass@1": mean_pass_at_k(sampled_ok, 1),
            f"eval/pass@{k}": mean_pass_at_k(sampled_ok, k),
            f"eval/cons@{k}": mean_cons_at_n(answers, list(zip(answers, sampled_ok, strict=True)), vote_right),
            **task_counts,
        }

    # ---------------------------------------------------------------------------- bookkeeping
    def _save_state(self, checkpoint_iteration: int) -> None:
        """The controller half of checkpoint `checkpoint_iteration` (its TRAIN writes the other half)."""
        if not self.run_cfg.checkpoints_at(checkpoint_iteration):
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
