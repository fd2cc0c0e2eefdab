"""Run as a script by test_vllm_push.py: dummy-start vLLM, push weights through shm, generate greedily.

Writes a JSON file: greedy token ids before and after the push, and the version vLLM reports.
"""

from __future__ import annotations

import argparse
import json

from checkpoint_engine.contracts.vllm_protocol import VllmSettings
from checkpoint_engine.contracts.weight_region import Manifest
from sidecars.vllm.llm import start_llm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from vllm import SamplingParams, TokensPrompt

    with open(args.manifest) as f:
        manifest = Manifest.from_dict(json.load(f))
    prompts = [TokensPrompt(prompt_token_ids=p) for p in json.loads(args.prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)

    llm = start_llm(
        VllmSettings(
            model_dir=args.model,
            port=1,
            tensor_parallel=1,
            gpu_memory_utilization=0.15,
            max_model_len=512,
            dtype="float32",
            seed=0,
        )
    )  # in-process: the port is not opened
    before = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    versions = llm.collective_rpc("load_from_shm", args=(manifest.to_dict(),))
    llm.reset_prefix_cache()
    after = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
    with open(args.out, "w") as f:
        json.dump({"before": [list(b) for b in before], "after": after, "versions": versions}, f)


if __name__ == "__main__":
    main()
