"""The vLLM sidecar's HTTP API, served by each sidecar the zygote forks (`sidecars/vllm/zygote.py`):
  GET  /health          -> Health (pid, loaded weight version)
  POST /weights/update  -> load a pushed version from shared memory (checksums verified, stale
                           versions refused), reset the prefix cache
  POST /generate        -> token ids in; token ids, per-token logprobs, finish reason and the
                           weight version out, n samples per request
  POST /sleep           -> vLLM's sleep mode, level 1 or 2 (rollout.sleep_level; CUDA only): its device
                           memory goes back until POST /wake_up, which also resets the prefix cache
vLLM's `LLM` is synchronous and not thread-safe, so requests are served one at a time.
"""

from __future__ import annotations

import os
import threading
import time

from checkpoint_engine.contracts.vllm_protocol import (
    Completion,
    GenerateBody,
    GenerateResponse,
    GenerationResult,
    Health,
    SleepBody,
    SleepResponse,
    StartupTimes,
    UpdateWeightsBody,
    UpdateWeightsResponse,
)

# vLLM's finish reasons in the project's vocabulary (contracts.vllm_protocol.FinishReason).
_FINISH = {"stop": "stop", "length": "length", "abort": "aborted", "repetition": "repeat"}


def create_app(llm, model: str, startup: StartupTimes):  # -> fastapi.FastAPI
    from fastapi import FastAPI, HTTPException
    from vllm import SamplingParams, TokensPrompt
    from vllm.sampling_params import RepetitionDetectionParams

    app = FastAPI(title="timeshare vLLM sidecar")
    lock = threading.Lock()
    state = {"version": -1, "asleep": 0}

    @app.get("/health")
    def health() -> Health:
        return Health(
            pid=os.getpid(), weight_version=state["version"], model=model, startup=startup, asleep=state["asleep"]
        )

    @app.post("/sleep")
    def sleep(body: SleepBody) -> SleepResponse:
        start = time.perf_counter()
        with lock:
            if state["asleep"]:
                raise HTTPException(status_code=409, detail=f"already asleep at level {state['asleep']}")
            llm.sleep(level=body.level)
            state["asleep"] = body.level
            if body.level == 2:  # the weights are gone: nothing is served until a version is pushed again
                state["version"] = -1
        return SleepResponse(asleep=state["asleep"], seconds=time.perf_counter() - start)

    @app.post("/wake_up")
    def wake_up() -> SleepResponse:
        start = time.perf_counter()
        with lock:
            if state["asleep"]:
                llm.wake_up()
                llm.reset_prefix_cache()  # cached prefixes were computed by the version before
                state["asleep"] = 0
        return SleepResponse(asleep=0, seconds=time.perf_counter() - start)

    @app.post("/weights/update")
    def update_weights(body: UpdateWeightsBody) -> UpdateWeightsResponse:
        start = time.perf_counter()
        with lock:
            if state["asleep"]:
                raise HTTPException(status_code=409, detail="asleep: POST /wake_up before pushing weights")
            try:
                versions = llm.collective_rpc("load_region", args=(body.manifest,))
            except Exception as e:  # the worker's own error (checksum, stale version) is the message
                raise HTTPException(status_code=409, detail=str(e)) from e
            llm.reset_prefix_cache()
            state["version"] = versions[0]
        return UpdateWeightsResponse(weight_version=state["version"], seconds=time.perf_counter() - start)

    @app.post("/generate")
    def generate(body: GenerateBody) -> GenerateResponse:
        if state["asleep"]:
            raise HTTPException(status_code=409, detail="asleep: POST /wake_up first")
        if state["version"] < 0:
            raise HTTPException(status_code=409, detail="no weights loaded yet: POST /weights/update first")
        prompts = [TokensPrompt(prompt_token_ids=r.prompt_ids) for r in body.requests]
        params = [
            SamplingParams(
                n=r.n,
                max_tokens=r.max_tokens,
                temperature=r.temperature,
                top_p=r.top_p,
                seed=r.seed,
                stop_token_ids=r.stop_token_ids,
                ignore_eos=r.ignore_eos,
                logprobs=0,
                repetition_detection=RepetitionDetectionParams(
                    max_pattern_size=r.repeat_max_ngram, min_count=r.repeat_min_repeats
                )
                if r.repeat_max_ngram
                else None,
            )
            for r in body.requests
        ]
        with lock:
            start = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - start
            version = state["version"]
        results = []
        for out in outputs:
            samples = [
                Completion(
                    token_ids=list(c.token_ids),
                    logprobs=[lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs or [], strict=True)],
                    finish_reason=_FINISH.get(c.finish_reason or "abort", "aborted"),
                    weight_version=version,
                )
                for c in out.outputs
            ]
            results.append(GenerationResult(samples=samples))
        return GenerateResponse(results=results, seconds=seconds)

    return app
