"""Run as a script by test_bpe_partial_rollouts.py: a vLLM with the model's own weights continues
trajectories through the replay buffer over three versions (a budget of 8 tokens each), and
generates the same prompts whole; also a continuation from decoded-then-encoded text.

Greedy decoding: a continuation that resumes from exactly the trajectory's ids must give the
tokens that one whole generation gives. Writes a JSON file of the three kinds of response ids.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from checkpoint_engine.contracts.vllm_protocol import VllmSettings
from engine.replay_buffer import PartialRolloutBuffer, PartialRolloutConfig, PromptTokens, RolloutResult
from engine.tokenizer import load_tokens
from sidecars.vllm.llm import start_llm

BUDGET, ROUNDS = 8, 3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True, help="JSON list of prompt texts")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from vllm import SamplingParams, TokensPrompt

    texts = json.loads(args.prompts)
    tokens = load_tokens(Path(args.model), "", chat_template=True, texts=texts)
    llm = start_llm(
        VllmSettings(
            model_dir=args.model,
            port=1,
            tensor_parallel=1,
            gpu_memory_utilization=0.15,
            max_model_len=256,
            dtype="float32",
            seed=0,
            load_format="auto",
        )
    )

    def greedy(context: list[list[int]], n: int) -> list[tuple[list[int], list[float]]]:
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=0)
        outs = llm.generate([TokensPrompt(prompt_token_ids=c) for c in context], params, use_tqdm=False)
        return [
            (list(o.outputs[0].token_ids), [next(iter(lp.values())).logprob for lp in o.outputs[0].logprobs])
            for o in outs
        ]

    prompts = [PromptTokens(f"p{i}", tuple(tokens.encode(t))) for i, t in enumerate(texts)]
    buffer = PartialRolloutBuffer(
        PartialRolloutConfig(
            max_response_tokens=BUDGET * ROUNDS,
            iteration_token_budget=BUDGET,
            group_size=1,
            staleness="exclude",
            max_staleness=None,
        )
    )
    for version in range(ROUNDS):
        requests = buffer.plan_round(prompts if version == 0 else [], version)
        answers = greedy([list(r.token_ids) for r in requests], BUDGET)
        buffer.record(
            RolloutResult(r.prompt_uid, r.sample_index, tuple(ids), tuple(lps), "length", version)
            for r, (ids, lps) in zip(requests, answers, strict=True)
        )
    continued = {t.prompt_uid: (t.response_ids, t.versions) for t in buffer.trajectories()}
    whole = greedy([list(p.prompt_ids) for p in prompts], BUDGET * ROUNDS)
    # The alternative the buffer avoids: continue from the first segment's text, encoded again.
    first = greedy([list(p.prompt_ids) for p in prompts], BUDGET)
    again = [
        list(p.prompt_ids) + tokens.encode_response(tokens.decode(ids))
        for p, (ids, _) in zip(prompts, first, strict=True)
    ]
    with open(args.out, "w") as f:
        json.dump(
            {
                "continued": [continued[p.uid][0] for p in prompts],
                "versions": [continued[p.uid][1] for p in prompts],
                "whole": [ids for ids, _ in whole],
                "first": [ids for ids, _ in first],
                "retokenised": [a[len(p.prompt_ids) :] for p, a in zip(prompts, again, strict=True)],
            },
            f,
        )


if __name__ == "__main__":
    main()
