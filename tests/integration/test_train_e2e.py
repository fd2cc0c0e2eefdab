"""`timeshare train` end to end on a small configuration: real etcd, checkpoint engine, torchrun
trainer ranks (Megatron) and a vLLM started with dummy weights and killed every iteration.

One run (grpo with a KL term) is stopped with SIGTERM once checkpoint 1 is complete (mid-iteration
1: TRAIN of iteration 2 has not checkpointed) and resumed from its newest complete checkpoint. Then:
- every iteration's rollout was sampled by the weight version the trainer exported for it;
- the trainer-vs-vLLM logprob gap stays below 1e-3 in every trained iteration;
- the prompts trained on are exactly those an uninterrupted sampler issues, none lost or repeated;
- metrics, TensorBoard events, the progress plot and checkpoints are in the run directory;
- the resumed trainer keeps the reference policy of the KL term that the first one took.
A second run keeps vLLM alive across iterations (`rollout.lifecycle=keep_alive`): one vLLM, built
once, serves every iteration's exported version.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from checkpoint_engine.contracts.run_dir import RunPaths
from checkpoint_engine.process_group import ProcessGroup
from engine.batch import load_batch
from engine.sampling import UniformSampler
from engine.tasks import make_task
from tests.integration.train_job import (
    ITERATIONS,
    OVERRIDES,
    PARTIAL,
    POOL,
    PROMPTS,
    REPO,
    SEED,
    await_exit,
    export_reproduces_rollout,
    launch,
    rows,
    wait_for,
    whole_run,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
# The length reward from iteration 0 separates a group's samples even when no answer is right yet.
LENGTH = ["reward=kimi", "reward.length.warmup_iterations=0", "reward.length.ramp_iterations=0"]
KL = ["algo=grpo", "algo.kl_coef=0.05", *LENGTH]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> RunPaths:
    root = tmp_path_factory.mktemp("runs")
    log = root / "launcher.log"
    first = launch([*OVERRIDES, f"run.root={root}", *KL], log)
    try:
        run_dir = wait_for(root / "addition-grpo-*", first, 60)
        # Checkpoint 1 is complete: the stop lands in iteration 1 (EXPORT, START_VLLM or ROLLOUT),
        # a whole rollout before TRAIN of iteration 2 could write checkpoint 2.
        wait_for(RunPaths(run_dir).complete_marker(1), first, 420)
        first.send_signal(signal.SIGTERM)
        assert first.wait(120) == 130, log.read_text()[-4000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    paths = RunPaths(run_dir)
    assert paths.latest_checkpoint() == 1, "the stop came before TRAIN of iteration 2 could checkpoint"
    await_exit(launch([f"resume={run_dir}"], log), log)
    return paths


def test_the_resumed_trainer_keeps_the_reference_policy(run: RunPaths) -> None:
    import torch

    def reference(i: int) -> dict:
        return torch.load(run.trainer_state(i, 0), weights_only=False)["reference"]

    first, last = reference(1), reference(ITERATIONS)  # taken before the stop; saved after the resume
    assert first.keys() == last.keys()
    assert all(torch.equal(first[k], last[k]) for k in first)
    kl = [r["train/kl_to_reference"] for r in rows(run) if "train/kl_to_reference" in r]
    assert kl[0] == pytest.approx(0.0, abs=1e-6)
    assert abs(kl[-1]) > 1e-6


def test_each_rollout_used_the_exported_version_and_logprobs_agree(run: RunPaths) -> None:
    logged = rows(run)
    history = {int(r["iteration"]): r for r in logged}
    assert len(logged) == len(history), "the resumed run logged an iteration twice"
    assert sorted(history) == list(range(ITERATIONS + 1))
    for i in range(ITERATIONS):  # the last iteration only evaluates
        assert history[i]["rollout/weight_version"] == i
        assert history[i]["push/weight_version"] == i
    # TRAIN of iteration 1 ran before the stop; the resumed run logs its numbers from the checkpoint.
    gaps = {int(r["iteration"]): r["logprob_gap/mean_abs"] for r in logged if "logprob_gap/mean_abs" in r}
    assert sorted(gaps) == list(range(1, ITERATIONS + 1))
    assert max(gaps.values()) < 1e-3, gaps
    for i in range(2, ITERATIONS + 1):
        assert history[i]["time/train"] > 0
        assert history[i]["time/start_vllm"] > 0
    assert {"eval/accuracy", "eval/pass@1", "eval/pass@2"} <= set(history[0]) & set(history[ITERATIONS])


def test_resume_neither_loses_nor_repeats_prompts(run: RunPaths) -> None:
    task = make_task("addition", max_digits=2)
    sampler = UniformSampler(task.samples("train", POOL, SEED), SEED)
    for i in range(ITERATIONS):
        expected = [s.uid for s in sampler.sample(PROMPTS)]
        trained = list(dict.fromkeys(load_batch(run.batch(i)).prompt_uids))
        assert trained == expected, f"iteration {i}"


def test_run_directory_has_metrics_plot_and_checkpoints(run: RunPaths) -> None:
    assert (run.root / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((run.root / "tensorboard").glob("events.out.tfevents.*"))
    assert run.latest_checkpoint() == ITERATIONS
    assert (run.controller_state(ITERATIONS)).exists()
    assert (run.trainer_state(ITERATIONS, 0)).exists()


def test_an_exported_checkpoint_reproduces_vllms_logprobs_in_transformers(run: RunPaths, tmp_path: Path) -> None:
    """`timeshare export` of checkpoint 2 (the weights of version 2) loads in transformers, which gives
    the tokens vLLM sampled in iteration 2's rollout the logprobs vLLM reported; the run itself
    exported its final checkpoint to <run>/hf."""
    from transformers import AutoModelForCausalLM

    model = export_reproduces_rollout(run, 2, tmp_path / "hf")
    final = AutoModelForCausalLM.from_pretrained(run.root / "hf")
    assert final.config.vocab_size == model.config.vocab_size
    out = tmp_path / "hf"
    bad = subprocess.run(
        [sys.executable, "-m", "launch.cli", "export", str(run.root), str(out), "--iteration", "9"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2
    assert "no complete checkpoint 9; complete ones: [1, 2, 3]" in bad.stderr


def test_a_tensor_parallel_run_exports_one_merged_model(tmp_path: Path) -> None:
    """A run whose trainer shards the model over two ranks (parallel=tp2) exports checkpoint 1 as one
    HF model, which reproduces the logprobs vLLM sampled rollout 1 with."""
    (tmp_path / "runs").mkdir()
    paths = whole_run(tmp_path / "runs", "parallel=tp2")
    export_reproduces_rollout(paths, 1, tmp_path / "hf")


@pytest.mark.parametrize(
    "trainer",
    [
        ["parallel.trainer_tp=1"],
        pytest.param(["parallel.trainer_tp=2"], marks=pytest.mark.extended),
        pytest.param(
            ["model.arch=qwen3_moe", "parallel.trainer_dp=2", "parallel.trainer_ep=2"], marks=pytest.mark.extended
        ),
    ],
    ids=["trainer-tp1", "trainer-tp2", "trainer-moe-ep2"],
)
def test_a_vllm_of_two_tensor_parallel_workers_loads_each_trainer_layout(tmp_path: Path, trainer: list[str]) -> None:
    """vLLM with tensor parallel 2 receives each version (whole HF tensors, each worker taking its shard)
    from a trainer of tensor parallel 1 or 2, or an MoE trainer of expert parallel 2 (vLLM splits each
    expert over its two workers): the trainer's logprobs of what it sampled agree. Pipeline parallelism
    is not among the layouts: megatron-core's schedules allocate on "cuda" (README, Model families)."""
    paths = whole_run(tmp_path, "run.iterations=1", "parallel.vllm_tp=2", *trainer)
    history = {int(r["iteration"]): r for r in rows(paths)}
    assert history[1]["vllm/weight_version/node0"] == 1
    assert history[1]["logprob_gap/mean_abs"] < 1e-3


def test_keep_alive_builds_vllm_once_and_serves_every_version(tmp_path: Path) -> None:
    paths = whole_run(tmp_path, "rollout.lifecycle=keep_alive")
    history = {int(r["iteration"]): r for r in rows(paths)}
    for i in range(2):
        assert history[i]["rollout/weight_version"] == i
    assert max(r["logprob_gap/mean_abs"] for r in history.values() if "logprob_gap/mean_abs" in r) < 1e-3
    builds = (paths.logs / "vllm-node0.log").read_text().count("vLLM built:")
    assert builds == 1, f"vLLM was built {builds} times; keep_alive builds it once"


def test_the_reward_and_sampler_sections_reach_the_run(tmp_path: Path) -> None:
    """`sampler=prioritized reward=kimi` (length reward from iteration 0) through the real job: the
    metrics break each rollout's reward into its terms, which add up to it, and the controller's
    checkpoint holds the prioritized sampler's success counts of every scored group."""
    paths = whole_run(
        tmp_path,
        "sampler=prioritized",
        "reward=kimi",
        "reward.length.warmup_iterations=0",
        "reward.length.ramp_iterations=0",
    )
    history = {int(r["iteration"]): r for r in rows(paths)}
    for i in range(2):  # the rollouts of iterations 0 and 1 (the last iteration only evaluates)
        terms = {k: v for k, v in history[i].items() if k.startswith("reward/term/")}
        assert {"reward/term/task", "reward/term/length"} <= set(terms), f"iteration {i}: {sorted(terms)}"
        assert history[i]["reward/mean"] == pytest.approx(sum(terms.values()))
    sampler = json.loads(paths.controller_state(2).read_text())["sampler"]
    assert sampler["kind"] == "prioritized"
    assert sampler["iteration"] == 1
    assert sum(sampler["trials"]) == 2 * PROMPTS * 4  # two rollouts of PROMPTS groups of group_size 4


@pytest.mark.parametrize("keep", [False, True], ids=["exclude", "keep"])
def test_long_answers_continue_from_the_buffer_in_the_next_iteration(tmp_path: Path, keep: bool) -> None:
    """The scratchpad task with a budget of 16 tokens per iteration: answers with a carry take more, and
    continue in the next iteration from the replay buffer. Their older tokens serve as context only
    (staleness=exclude, Kimi), or train with their importance ratio to the rollout (keep, with grpo)."""
    keeping = ["algo=grpo", "rollout.staleness=keep"] if keep else []
    paths = whole_run(tmp_path, *PARTIAL, *keeping)
    history = {int(r["iteration"]): r for r in rows(paths)}
    assert history[1]["rollout/partial_share"] > 0
    assert history[1]["rollout/stale_token_share"] > 0
    assert history[1]["rollout/length_max"] > 16
    batch = load_batch(paths.batch(1))
    stale = batch.versions == 0
    assert stale.any()
    assert (batch.loss_mask[batch.versions == 1] == 1).all()
    assert (batch.loss_mask[stale] == float(keep)).all()
    trained = history[2]  # TRAIN of iteration 2 learns from rollout 1
    if keep:
        assert trained["train/stale_tokens"] == stale.sum().item()
        assert 0 < trained["train/stale_ratio_mean"] <= trained["train/stale_ratio_max"]
    else:
        assert "train/stale_tokens" not in trained


def test_curriculum_starts_easy_and_a_repeating_trajectory_stops_with_its_penalty(tmp_path: Path) -> None:
    """sampler=curriculum on the scratchpad task: iteration 0 draws from the easiest fifth of the pool
    (by columns). Repeat detection at its most eager (any token twice in a row) stops trajectories in
    vLLM as "repeat", and the penalty is their reward's repeat term."""
    paths = whole_run(
        tmp_path,
        "task=scratchpad",
        "task.pool_size=400",
        "sampler=curriculum",
        "rollout.repeat.enabled=true",
        "rollout.repeat.max_ngram=1",
        "rollout.repeat.min_repeats=2",
        "reward.repeat_penalty=0.5",
    )
    pool = {s.uid: s.difficulty for s in make_task("scratchpad").samples("train", 400, SEED)}
    easiest = sorted(pool.values())[: 400 // 5][-1]
    assert max(pool.values()) > easiest
    assert max(pool[uid] for uid in load_batch(paths.batch(0)).prompt_uids) <= easiest
    history = {int(r["iteration"]): r for r in rows(paths)}
    stopped = [i for i in range(2) if history[i]["rollout/repeat_share"] > 0]
    assert stopped, "no trajectory repeated a token twice in a row"
    for i in stopped:
        share = history[i]["rollout/repeat_share"]
        assert history[i]["reward/term/repeat"] == pytest.approx(-0.5 * share)


@pytest.mark.parametrize(
    "algo",
    [["algo=grpo", "algo.kl_coef=0.05"], ["algo=dr_grpo"], ["algo=rloo"], ["algo=reinforce_pp"], ["algo=ppo"]],
    ids=str,
)
def test_every_algorithm_trains_through_the_job(tmp_path: Path, algo: list[str]) -> None:
    """The other algorithms (kimi is the default) train in the real job; with a KL term (kl_coef > 0),
    TRAIN recomputes the reference policy's logprobs: the policy RL started from, so the KL to it is
    zero at the first update and not after it. ppo trains its critic, a value head, with the policy."""
    # After a 2-epoch cold start no answer is right yet: the length reward is what separates a group's
    # samples, so that the advantages and the first update are not zero.
    trained = [r for r in rows(whole_run(tmp_path, *LENGTH, *algo)) if "train/loss" in r]
    assert [int(r["iteration"]) for r in trained] == [1, 2]
    assert all(abs(r["train/loss"]) < 1e3 and r["train/grad_norm"] > 0 for r in trained)
    if "algo=ppo" in algo:
        assert all(r["train/value_loss"] > 0 for r in trained)
        assert trained[0]["train/value_mean"] == 0.0 != trained[1]["train/value_mean"]
    if not any("kl_coef" in a for a in algo) and "algo=reinforce_pp" not in algo:  # reinforce_pp's KL is on
        assert all("train/kl_to_reference" not in r for r in trained)
    else:
        first, second = (r["train/kl_to_reference"] for r in trained)
        assert first == pytest.approx(0.0, abs=1e-6)
        assert abs(second) > 1e-6


def test_a_vllm_zygote_of_its_own_serves_the_job(tmp_path: Path) -> None:
    """Containers per role, on one machine: `timeshare vllm-zygote DIR` (the vLLM container's command) runs on
    its own, the job's engine (`cluster.vllm_zygote=DIR`) asks it for every iteration's vLLM instead of spawning
    a zygote, each rollout uses the exported version, and the zygote outlives the job for the next one."""
    zygote_dir = tmp_path / "zygote"
    zygote = ProcessGroup.spawn(
        [sys.executable, "-m", "launch.cli", "vllm-zygote", str(zygote_dir)], tmp_path / "zygote.log", cwd=REPO
    )
    try:
        (tmp_path / "runs").mkdir()
        paths = whole_run(tmp_path / "runs", f"cluster.vllm_zygote={zygote_dir}")
        history = {int(r["iteration"]): r for r in rows(paths)}
        for i in range(2):
            assert history[i]["rollout/weight_version"] == i
        vllm_log = (paths.logs / "vllm-node0.log").read_text()
        assert "vLLM zygote ready" not in vllm_log  # the engine spawned no zygote of its own
        served = (tmp_path / "zygote.log").read_text().count("vLLM sidecar pid")  # each forked, then killed
        assert served == vllm_log.count("vLLM built:") >= 2
        assert zygote.alive()
    finally:
        stopped = zygote.stop(grace=10)
    assert not stopped.killed, "the zygote did not stop on SIGTERM"
