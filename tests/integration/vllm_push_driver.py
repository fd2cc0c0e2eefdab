"""Run as a script by test_vllm_push.py: dummy-start vLLM, push weights through shm, generate greedily.

Writes a JSON file: greedy token ids before and after the push, and the version vLLM reports.
Without --manifest (and with --load-format auto) it serves a model directory's own weights: "before".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from checkpoint_engine.contracts.vllm_protocol import VllmSettings
from checkpoint_engine.contracts.weight_region import Manifest
from sidecars.vllm.llm import start_llm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--manifest", help="the shm region's manifest to push; none: no push")
    ap.add_argument("--load-format", default="dummy", help="dummy (then pushed) or auto (the directory's weights)")
    ap.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from vllm import SamplingParams, TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=p) for p in json.loads(args.prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)

    llm = start_llm(
        VllmSettings(
            model_dir=args.model,
            port=1,
            tensor_parallel=1,
            gpu_memory_utilization=0.15,
            max_model_len=min(512, json.loads(Path(args.model, "config.json").read_text())["max_position_embeddings"]),
            dtype="float32",
            seed=0,
            load_format=args.load_format,
        )
    )  # in-process: the port is not opened
    before = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
    result: dict = {"before": before}
    if args.manifest:
        with open(args.manifest) as f:
            manifest = Manifest.from_dict(json.load(f))
        result["versions"] = llm.collective_rpc("load_region", args=(manifest.to_dict(),))
        llm.reset_prefix_cache()
        result["after"] = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
