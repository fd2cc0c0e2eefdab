"""`timeshare long2short`: Kimi k1.5's ways to shorten a long-chain-of-thought model's answers.

- `merge A B OUT --weight w`: weight averaging, OUT = w * A + (1 - w) * B, tensor by tensor, of two
  models of one architecture (a run directory stands for its final model `<run>/hf`; any HF directory
  for itself). Config and tokenizer are A's; a tensor A and B do not share is an error naming it.
- `shortest RUN OUT [--k 8 --prompts 256]`: shortest rejection sampling. The run's final model answers
  each of the first `--prompts` prompts of its RL pool k times (vLLM, the run's own rollout settings);
  of the responses its task's reward passes, the one with the fewest tokens is written as a JSONL
  record `{"prompt", "response", "tokens", "passed"}`: supervised data for a cold start
  (`trainer.cold_start.data=OUT`).
- RL with the length penalty from the first iteration is `reward=long2short` (`conf/reward/`).
Each prints a JSON summary line.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from checkpoint_engine.contracts.config import ConfigError
from checkpoint_engine.contracts.run_dir import RunPaths


def model_dir_of(path: Path) -> Path:
    """`path`'s HF directory: a run's final model `<run>/hf`, or `path` itself."""
    for candidate in (path / "hf", path):
        if (candidate / "config.json").is_file():
            return candidate
    raise ConfigError(f"{path} is neither an HF model directory nor a run directory with a final model (hf/)")


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{model_dir} holds no *.safetensors weights")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(str(f)))
    return weights


def merge_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], weight: float) -> dict[str, torch.Tensor]:
    """w * a + (1 - w) * b per tensor, computed in float32 and stored in a's dtype."""
    if a.keys() != b.keys():
        only = sorted(a.keys() ^ b.keys())
        raise ConfigError(f"the models' tensors differ: {only[:5]} are in one only; merge models of one architecture")
    merged = {}
    for name, x in a.items():
        y = b[name]
        if x.shape != y.shape:
            raise ConfigError(f"tensor {name} has shape {tuple(x.shape)} in A and {tuple(y.shape)} in B")
        merged[name] = (weight * x.float() + (1.0 - weight) * y.float()).to(x.dtype).contiguous()
    return merged


def merge(a: Path, b: Path, out: Path, weight: float) -> dict:
    if not 0.0 <= weight <= 1.0:
        raise ConfigError(f"--weight must be in [0, 1] (the share of A), got {weight}")
    if out.exists():
        raise ConfigError(f"{out} exists; name a new directory (nothing is overwritten)")
    dir_a, dir_b = model_dir_of(a), model_dir_of(b)
    config_a, config_b = (json.loads((d / "config.json").read_text()) for d in (dir_a, dir_b))
    if config_a.get("architectures") != config_b.get("architectures"):
        raise ConfigError(f"A is {config_a.get('architectures')} and B is {config_b.get('architectures')}")
    from safetensors.torch import save_file

    merged = merge_weights(load_weights(dir_a), load_weights(dir_b), weight)
    out.mkdir(parents=True)
    for f in dir_a.iterdir():  # config, tokenizer, generation config: A's
        if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copy2(f, out / f.name)
    save_file(merged, str(out / "model.safetensors"), metadata={"format": "pt"})
    return {"merge": str(out), "a": str(dir_a), "b": str(dir_b), "weight": weight, "tensors": len(merged)}


def shortest(run: Path, out: Path, k: int, prompts: int) -> dict:
    from engine.rewards import RewardScorer
    from launch.offline_sampling import passes, sample_completions
    from launch.train_config import TrainConfig

    if k < 1 or prompts < 1:
        raise ConfigError(f"--k and --prompts must be >= 1, got {k} and {prompts}")
    if out.exists():
        raise ConfigError(f"{out} exists; name a new file (nothing is overwritten)")
    paths = RunPaths(run)
    if not paths.config.is_file():
        raise ConfigError(f"{run} is not a run directory (no {paths.config.name})")
    model = run / "hf"
    if not (model / "config.json").is_file():
        raise ConfigError(f"{run} has no final model ({model}); write one with `timeshare export {run} {model}`")
    cfg = TrainConfig.from_dict(json.loads(paths.config.read_text()))
    task = cfg.task.make()
    pool = task.samples("train", cfg.task.pool_size, cfg.run.seed)[:prompts]
    completions = sample_completions(cfg, model, pool, k)
    pairs = [(c.text, s) for s, cs in zip(pool, completions, strict=True) for c in cs]
    ok = iter(RewardScorer(cfg.reward, task).map(passes(cfg, task), pairs))
    kept, chosen_tokens, correct_tokens = 0, 0, 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("x", encoding="utf-8") as f:
        for sample, cs in zip(pool, completions, strict=True):
            correct = [c for c in cs if next(ok)]
            if not correct:
                continue
            best = min(correct, key=lambda c: c.tokens)
            kept += 1
            chosen_tokens += best.tokens
            correct_tokens += sum(c.tokens for c in correct) / len(correct)
            record = {"prompt": sample.prompt, "response": best.text, "tokens": best.tokens, "passed": len(correct)}
            f.write(json.dumps(record) + "\n")
    summary = {"shortest": str(out), "model": str(model), "prompts": len(pool), "kept": kept, "k": k}
    if kept:
        summary["mean_tokens_kept"] = chosen_tokens / kept
        summary["mean_tokens_correct"] = correct_tokens / kept  # what a random correct response would cost
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="timeshare long2short", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="how", required=True)
    m = sub.add_parser("merge", help="weight averaging of two models: OUT = w * A + (1 - w) * B")
    m.add_argument("a", type=Path, help="a run directory (its hf/) or an HF model directory")
    m.add_argument("b", type=Path, help="the same for B")
    m.add_argument("out", type=Path, help="the merged HF directory to write")
    m.add_argument("--weight", type=float, required=True, help="the share of A, in [0, 1]")
    s = sub.add_parser("shortest", help="the shortest passing of k responses per prompt, as cold-start data")
    s.add_argument("run", type=Path, help="a run directory with its final model (hf/)")
    s.add_argument("out", type=Path, help="the JSONL file to write")
    s.add_argument("--k", type=int, default=8, help="responses per prompt")
    s.add_argument("--prompts", type=int, default=256, help="prompts of the run's RL pool, from its start")
    args = ap.parse_args(argv)
    if args.how == "merge":
        summary = merge(args.a, args.b, args.out, args.weight)
    else:
        summary = shortest(args.run, args.out, args.k, args.prompts)
    print(json.dumps(summary), flush=True)
    return 0
