"""The vLLM sidecar process: one per node and rollout phase, started and killed by the checkpoint engine.

`python -m sidecars.vllm.server <settings.json> [--go FILE]` (a `VllmSettings` document the engine
writes) starts vLLM with dummy weights and serves, on loopback. With `--go` it is a standby: it
imports torch and vLLM at once (most of a start-up on CPU) and builds vLLM only when FILE appears,
so the engine can spawn it while the trainer works and START_VLLM pays for the build alone.
  GET  /health          -> Health (pid, loaded weight version)
  POST /weights/update  -> load a pushed version from shared memory (checksums verified, stale
                           versions refused), reset the prefix cache
  POST /generate        -> token ids in; token ids, per-token logprobs, finish reason and the
                           weight version out, n samples per request
vLLM's `LLM` is synchronous and not thread-safe, so requests are served one at a time.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time
from pathlib import Path

from checkpoint_engine.contracts.vllm_protocol import (
    Completion,
    GenerateBody,
    GenerateResponse,
    GenerationResult,
    Health,
    StartupTimes,
    UpdateWeightsBody,
    UpdateWeightsResponse,
    VllmSettings,
)
from sidecars.vllm.llm import configure_vllm, start_llm

# vLLM's finish reasons in the project's vocabulary (contracts.vllm_protocol.FinishReason).
_FINISH = {"stop": "stop", "length": "length", "abort": "aborted"}


def create_app(llm, model: str, startup: StartupTimes):  # -> fastapi.FastAPI
    from fastapi import FastAPI, HTTPException
    from vllm import SamplingParams, TokensPrompt

    app = FastAPI(title="timeshare vLLM sidecar")
    lock = threading.Lock()
    state = {"version": -1}

    @app.get("/health")
    def health() -> Health:
        return Health(pid=os.getpid(), weight_version=state["version"], model=model, startup=startup)

    @app.post("/weights/update")
    def update_weights(body: UpdateWeightsBody) -> UpdateWeightsResponse:
        start = time.perf_counter()
        with lock:
            try:
                versions = llm.collective_rpc("load_from_shm", args=(body.manifest,))
            except Exception as e:  # the worker's own error (checksum, stale version) is the message
                raise HTTPException(status_code=409, detail=str(e)) from e
            llm.reset_prefix_cache()
            state["version"] = versions[0]
        return UpdateWeightsResponse(weight_version=state["version"], seconds=time.perf_counter() - start)

    @app.post("/generate")
    def generate(body: GenerateBody) -> GenerateResponse:
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
            )
            for r in body.requests
        ]
        with lock:
            outputs = llm.generate(prompts, params, use_tqdm=False)
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
        return GenerateResponse(results=results)

    return app


def _exit_with_parent(poll: float = 0.5) -> None:
    """Kill this sidecar's process group once the engine that spawned it is gone (reparented): a
    standby lives across phases, and an engine killed by SIGKILL cannot stop it."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll)
        os.killpg(0, signal.SIGKILL)  # its own session: vLLM's workers (TP > 1) go with it

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _wait_for(path: Path, poll: float = 0.01) -> None:
    while not path.exists():
        time.sleep(poll)


def main() -> None:
    began = time.perf_counter()
    _exit_with_parent()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("settings", help="JSON file of checkpoint_engine.contracts.vllm_protocol.VllmSettings")
    ap.add_argument("--go", default=None, help="standby: import everything, then build vLLM once this file exists")
    args = ap.parse_args()
    settings = VllmSettings.from_json_file(args.settings)
    configure_vllm(settings)  # before vLLM is imported: its environment is read then

    import fastapi  # noqa: F401 - imported during standby, not after the go
    import uvicorn
    from vllm import LLM, SamplingParams  # noqa: F401 - vLLM's top level is lazy: these import the engine

    imported = time.perf_counter()
    if args.go:
        _wait_for(Path(args.go))
    go = time.perf_counter()
    llm = start_llm(settings)
    times = StartupTimes(imports=imported - began, standby=go - imported, build=time.perf_counter() - go)
    print(f"vLLM built: {times.model_dump_json()}", flush=True)
    app = create_app(llm, settings.model_dir, times)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")


if __name__ == "__main__":
    main()
