"""The vLLM sidecar process: one per node and rollout phase, started and killed by the checkpoint engine.

`python -m sidecars.vllm.server <settings.json>` (a `VllmSettings` document the engine writes)
imports torch and vLLM, compiles vLLM's sampler helpers (what the first rollout would otherwise
pay), starts vLLM with dummy weights and serves, on loopback.

With `--zygote FILE` it stops after the imports and compiles, most of a start-up on CPU, and forks a
sidecar each time FILE appears: each builds vLLM and serves, and the engine kills it after its
rollout. The imports are paid once per engine instead of once per iteration, and a fork takes
milliseconds. The zygote runs niced (its imports overlap the trainer's work) and never touches an
accelerator: each forked sidecar builds its own vLLM (and CUDA context) from scratch.
  GET  /health          -> Health (pid, loaded weight version)
  POST /weights/update  -> load a pushed version from shared memory (checksums verified, stale
                           versions refused), reset the prefix cache
  POST /generate        -> token ids in; token ids, per-token logprobs, finish reason and the
                           weight version out, n samples per request
vLLM's `LLM` is synchronous and not thread-safe, so requests are served one at a time.
"""

from __future__ import annotations

import argparse
import gc
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
from sidecars.vllm.llm import compile_sampler_ops, configure_vllm, start_llm

# vLLM's finish reasons in the project's vocabulary (contracts.vllm_protocol.FinishReason).
_FINISH = {"stop": "stop", "length": "length", "abort": "aborted", "repetition": "repeat"}
ZYGOTE_NICE = 19


def create_app(llm, model: str, startup: StartupTimes):  # -> fastapi.FastAPI
    from fastapi import FastAPI, HTTPException
    from vllm import SamplingParams, TokensPrompt
    from vllm.sampling_params import RepetitionDetectionParams

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


def _exit_with_parent(poll: float = 0.5) -> None:
    """Kill this sidecar's process group once the engine that spawned it is gone (reparented): a
    zygote lives across phases, and an engine killed by SIGKILL cannot stop it or its sidecars."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll)
        os.killpg(0, signal.SIGKILL)  # its own session: vLLM's workers (TP > 1) go with it

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _set_priority(nice: int) -> None:
    """This process's CPU priority (threads started later inherit it), and its session's: the kernel's
    autogroups share the CPU between sessions before nice values count, and the sidecar has its own."""
    os.setpriority(os.PRIO_PROCESS, 0, nice)
    autogroup = Path("/proc/self/autogroup")
    if autogroup.exists():
        autogroup.write_text(str(nice))


def _restore_priority() -> None:
    """Back to normal priority for the build and the rollout, where the system lets a process raise it
    (root or CAP_SYS_NICE); otherwise vLLM runs niced, which costs nothing while the trainer idles."""
    try:
        _set_priority(0)
    except PermissionError:
        print(f"vLLM keeps nice {ZYGOTE_NICE}: raising a priority needs CAP_SYS_NICE", flush=True)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.rename(path)


def _reap_children() -> None:
    """The zygote reaps its forked sidecars (the engine kills them; they are not its children)."""

    def reap() -> None:
        while True:
            try:
                pid, status = os.wait()
            except ChildProcessError:  # none right now
                time.sleep(0.2)
                continue
            print(f"vLLM sidecar pid {pid} ended with status {os.waitstatus_to_exitcode(status)}", flush=True)

    threading.Thread(target=reap, name="reap", daemon=True).start()


def fork_on_request(requests: Path, ready: StartupTimes, poll: float = 0.01) -> StartupTimes:
    """The zygote's loop: fork a sidecar each time `requests` appears, and write its pid beside it
    (`<requests>.pid`). Returns only in a forked child: its start-up so far (the first also reports
    the zygote's imports and compiles, which its start may have waited for)."""
    pid_path = requests.with_suffix(".pid")
    _reap_children()
    first = True
    while True:
        if not requests.exists():
            time.sleep(poll)
            continue
        asked = time.perf_counter()
        requests.unlink()
        pid = os.fork()
        if pid == 0:
            os.setsid()  # its own session and process group: the engine kills its tree without the zygote
            _exit_with_parent()  # the zygote's, and with it the engine's
            _restore_priority()
            fork = time.perf_counter() - asked
            return ready.model_copy(update={"fork": fork}) if first else StartupTimes(fork=fork)
        _write_atomically(pid_path, str(pid))
        first = False


def main() -> None:
    began = time.perf_counter()
    _exit_with_parent()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("settings", help="JSON file of checkpoint_engine.contracts.vllm_protocol.VllmSettings")
    ap.add_argument("--zygote", metavar="REQUESTS", default=None,
                    help="import everything, then fork a sidecar each time this file appears")  # fmt: skip
    args = ap.parse_args()
    settings = VllmSettings.from_json_file(args.settings)
    if args.zygote:  # it yields the CPU to the trainer: its imports only have to be done by START_VLLM
        _set_priority(ZYGOTE_NICE)
    configure_vllm(settings)  # before vLLM is imported: its environment is read then

    import fastapi  # noqa: F401 - imported once, in the zygote
    import uvicorn
    from vllm import LLM, SamplingParams  # noqa: F401 - vLLM's top level is lazy: these import the engine

    imported = time.perf_counter()
    compile_sampler_ops(settings)
    times = StartupTimes(imports=imported - began, compile=time.perf_counter() - imported)
    if args.zygote:
        # What the zygote holds now is shared with every sidecar: out of the garbage collector's sight, the
        # collections vLLM runs while it builds skip it (about 1 s on CPU) and leave its pages shared.
        gc.freeze()
        print(f"vLLM zygote ready: {times.model_dump_json()}", flush=True)
        times = fork_on_request(Path(args.zygote), times)
    began = time.perf_counter()
    llm = start_llm(settings)
    times = times.model_copy(update={"build": time.perf_counter() - began})
    print(f"vLLM built: {times.model_dump_json()}", flush=True)
    app = create_app(llm, settings.model_dir, times)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
    if args.zygote:
        os._exit(0)  # a forked sidecar: nothing of the zygote's to clean up


if __name__ == "__main__":
    main()
