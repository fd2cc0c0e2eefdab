"""A standalone vLLM serving the requests of a job's rollouts: the baseline of `timeshare bench cycle`.

`python -m launch.bench_standalone SETTINGS.json BATCH.pt... [--temperature T] [--top-p P]` builds
vLLM as the sidecar does, from the job's own `VllmSettings` (dummy weights: the cost of a dense model
does not depend on its weights' values), and replays each rollout batch's trajectories as requests:
the same prompt and as many tokens as the response had (`ignore_eos`), one request per trajectory,
sampled and with logprobs as in the loop. The first batch is served once untimed (vLLM's warm-up),
then every batch once, timed inside `generate`, each with an empty prefix cache. Prints one JSON
line: the tokens and seconds, and the mean over batches of tokens per second (as the loop's
`rollout/tokens_per_second` is averaged).
"""

from __future__ import annotations

import argparse
import json
import time

from checkpoint_engine.contracts.vllm_protocol import VllmSettings
from engine.batch import TrainBatch, load_batch


def requests_from_batch(batch: TrainBatch) -> list[tuple[list[int], int]]:
    """(prompt ids, response length) of each trajectory: targets with a version are response tokens."""
    has_version = batch.versions >= 0
    requests = []
    for row, ids in zip(has_version, batch.input_ids, strict=True):
        first = int(row.nonzero()[0, 0])  # target `first` is token `first + 1`, the response's first
        requests.append((ids[: first + 1].tolist(), int(row.sum())))
    return requests


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("settings", help="the job's VllmSettings JSON (its run directory's logs/vllm-<node>.json)")
    ap.add_argument("batches", nargs="+", help="rollout batches of the job (its run directory's rollouts/*.pt)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    args = ap.parse_args(argv)

    from vllm import SamplingParams, TokensPrompt

    from sidecars.vllm.llm import compile_sampler_ops, start_llm

    settings = VllmSettings.from_json_file(args.settings)
    compile_sampler_ops(settings)
    llm = start_llm(settings)

    def serve(requests: list[tuple[list[int], int]]) -> tuple[int, float]:
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids, _ in requests]
        params = [
            SamplingParams(
                n=1, max_tokens=n, ignore_eos=True, temperature=args.temperature, top_p=args.top_p, seed=k, logprobs=0
            )
            for k, (_, n) in enumerate(requests)
        ]
        llm.reset_prefix_cache()  # as a fresh vLLM in the loop: no prompt of an earlier pass is cached
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return sum(len(c.token_ids) for o in outputs for c in o.outputs), time.perf_counter() - start

    batches = [requests_from_batch(load_batch(path)) for path in args.batches]
    serve(batches[0])
    served = [serve(requests) for requests in batches]
    rate = sum(tokens / seconds for tokens, seconds in served) / len(served)
    tokens, seconds = (sum(column) for column in zip(*served, strict=True))
    print(json.dumps({"tokens": tokens, "seconds": seconds, "tokens_per_second": rate}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
