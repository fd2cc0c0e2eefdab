"""k responses per prompt from a model's own weights, by vLLM as the sidecar builds it: what `timeshare filter`
and `timeshare long2short shortest` score.

Consumes a run's config (its rollout sampling: temperature, top-p, lengths, stop; the task's chat
template; the model's dtype; vLLM's tensor parallelism and KV cache), an HF model directory and the
task's samples; produces each sample's k completions as (text, token count), in the samples' order,
and `passes`, the task's verdict on one.
vLLM runs in this process with `load_format=auto` (the directory's weights, no push)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine.tasks.base import Sample, Task
from launch.train_config import TrainConfig


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: int


def sample_completions(cfg: TrainConfig, model_dir: Path, samples: list[Sample], k: int) -> list[list[Completion]]:
    from vllm import SamplingParams, TokensPrompt

    from engine.tokenizer import load_tokens
    from sidecars.vllm.llm import start_llm

    rollout = cfg.effective_rollout()
    tokens = load_tokens(model_dir, rollout.stop, cfg.task.chat_template, [s.prompt for s in samples])
    llm = start_llm(cfg.vllm_settings(model_dir, port=1, load_format="auto"))  # in this process: no port opened
    prompts = [TokensPrompt(prompt_token_ids=tokens.encode(s.prompt)) for s in samples]
    params = [
        SamplingParams(
            n=k,
            temperature=rollout.temperature,
            top_p=rollout.top_p,
            max_tokens=rollout.max_response_tokens,
            stop_token_ids=list(tokens.stop_ids),
            seed=cfg.run.seed + i,
        )
        for i in range(len(samples))
    ]
    outputs = llm.generate(prompts, params, use_tqdm=True)
    return [[Completion(tokens.decode(list(c.token_ids)), len(c.token_ids)) for c in o.outputs] for o in outputs]


def passes(cfg: TrainConfig, task: Task) -> Callable[[str, Sample], bool]:
    """Whether a response passes: the task's reward at `reward.correct_threshold` or above."""
    threshold = cfg.reward.correct_threshold
    return lambda text, sample: task.reward(text, sample) >= threshold
