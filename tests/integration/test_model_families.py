"""Each model family beyond the default Llama through the real job (etcd, engine, Megatron ranks, vLLM
with dummy weights), with the byte-level BPE tokenizer and prompts rendered through its chat
template: Qwen3 (q/k norms, trainer TP 2, trajectories continued across iterations), Qwen3-MoE
(experts split over two trainer ranks, EP 2) and Llama 3.x RoPE scaling. Every rollout samples the
version the trainer exported, the trainer's logprobs of it agree with vLLM's, and the exported
checkpoint reproduces them in transformers; vLLM serves the exported directory as transformers does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.hf_reference import hf_greedy
from tests.integration.test_vllm_push import MAX_TOKENS, run_vllm_driver
from tests.integration.train_job import PARTIAL, export_reproduces_rollout, rows, whole_run

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.extended]
BPE = ["model.tokenizer=bpe", "task.chat_template=true"]


@pytest.mark.parametrize(
    ("overrides", "architecture"),
    [
        (["model.arch=qwen3", "parallel.trainer_tp=2", *PARTIAL], "Qwen3ForCausalLM"),
        (["model.arch=qwen3_moe", "parallel.trainer_dp=2", "parallel.trainer_ep=2"], "Qwen3MoeForCausalLM"),
        (["model.rope_scaling=llama3"], "LlamaForCausalLM"),
    ],
    ids=["qwen3-tp2", "qwen3-moe-ep2", "llama3-scaled"],
)
def test_the_family_trains_and_serves_every_version(tmp_path: Path, overrides: list[str], architecture: str) -> None:
    (tmp_path / "runs").mkdir()
    paths = whole_run(tmp_path / "runs", *BPE, *overrides)
    config = json.loads((paths.root / "hf" / "config.json").read_text())
    assert config["architectures"] == [architecture]
    history = {int(r["iteration"]): r for r in rows(paths)}
    for i in range(2):
        assert history[i]["rollout/weight_version"] == i
        assert history[i]["push/weight_version"] == i
    gaps = [r["logprob_gap/mean_abs"] for r in history.values() if "logprob_gap/mean_abs" in r]
    assert len(gaps) == 2
    assert max(gaps) < 1e-3
    if "task=scratchpad" in overrides:
        assert history[1]["rollout/partial_share"] > 0
    export_reproduces_rollout(paths, 1, tmp_path / "hf")
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    served = run_vllm_driver(tmp_path / "hf", None, prompts, tmp_path / "served.json")
    assert served["before"] == hf_greedy(tmp_path / "hf", prompts, MAX_TOKENS)
