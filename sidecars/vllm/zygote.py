"""The vLLM zygote: the process that forks each node's vLLM sidecar, one per rollout phase.

`python -m sidecars.vllm.zygote --zygote PREFIX` imports torch and vLLM and compiles vLLM's sampler helpers
(most of a start-up on CPU, and what the first rollout would otherwise pay), then forks a sidecar for each
request the engine writes (`ZygoteFiles(PREFIX)` in `contracts/vllm_protocol.py`). Each sidecar starts vLLM
with dummy weights, serves its HTTP API (`sidecars/vllm/app.py`), and is killed by the engine after its
rollout. The imports are paid once per zygote instead of once per iteration, and a fork takes milliseconds.
The zygote never touches an accelerator: each forked sidecar builds its own vLLM (and CUDA context) from
scratch.

The engine spawns its zygote, niced (its imports overlap the trainer's work), and it dies with the
engine. With `--external` (`timeshare vllm-zygote DIR`, the command of a vLLM container beside the
trainer's) it is started on its own, waits for an engine's settings before its compiles, serves
one engine after another and stops on SIGTERM; every sidecar still dies with its engine.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import signal
import threading
import time
from pathlib import Path

import psutil

from checkpoint_engine.contracts.lifetime import running
from checkpoint_engine.contracts.vllm_protocol import (
    ForkRequest,
    StartupTimes,
    VllmSettings,
    ZygoteFiles,
    write_atomically,
)
from sidecars.vllm.app import create_app
from sidecars.vllm.llm import compile_sampler_ops, start_llm

ZYGOTE_NICE = 19


def _exit_with(engine_pid: int | None = None, poll: float = 0.5) -> None:
    """Kill this process's group once its parent is gone (reparented) or, given, the engine it serves: a
    zygote lives across phases, and an engine killed by SIGKILL cannot stop it or its sidecars."""
    parent = os.getppid()
    engine = psutil.Process(engine_pid) if engine_pid else None

    def watch() -> None:
        while os.getppid() == parent and (engine is None or running(engine)):
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


def _reap_children(sidecars: set[int]) -> None:
    """The zygote reaps its forked sidecars (the engine kills them; they are not its children)."""

    def reap() -> None:
        while True:
            try:
                pid, status = os.wait()
            except ChildProcessError:  # none right now
                time.sleep(0.2)
                continue
            sidecars.discard(pid)
            print(f"vLLM sidecar pid {pid} ended with status {os.waitstatus_to_exitcode(status)}", flush=True)

    threading.Thread(target=reap, name="reap", daemon=True).start()


def _stop_on_sigterm(files: ZygoteFiles, sidecars: set[int]) -> None:
    """A zygote of its own stops when its container does: its sidecars' sessions first, then itself."""

    def stop(signum: int, _frame: object) -> None:
        for pid in list(sidecars):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        files.zygote_pid.unlink(missing_ok=True)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def _wait_for(path: Path, poll: float = 0.2) -> None:
    if not path.exists():
        print(f"vLLM zygote waiting for an engine's settings in {path}", flush=True)
    while not path.exists():
        time.sleep(poll)


def fork_on_request(
    files: ZygoteFiles, ready: StartupTimes, sidecars: set[int], poll: float = 0.01
) -> tuple[ForkRequest, StartupTimes]:
    """The zygote's loop: fork a sidecar for each request, and write its pid. Returns only in a forked child:
    the request it serves (its output already goes to the request's log) and its start-up so far (the first
    also reports the zygote's imports and compiles, which its start may have waited for)."""
    first = True
    while True:
        try:
            request = files.take()
        except ValueError as e:  # not a ForkRequest: nothing to serve, and the next one may be sound
            print(f"vLLM zygote ignores a malformed request in {files.request}: {e}", flush=True)
            continue
        if request is None:
            time.sleep(poll)
            continue
        asked = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            os.setsid()  # its own session and process group: the engine kills its tree without the zygote
            for signum in (signal.SIGTERM, signal.SIGINT):  # not the zygote's handlers
                signal.signal(signum, signal.SIG_DFL)
            _log_to(request.log)
            _exit_with(request.engine_pid)  # the zygote's death or the engine's
            if os.getpriority(os.PRIO_PROCESS, 0) > 0:
                _restore_priority()
            fork = time.perf_counter() - asked
            return request, ready.model_copy(update={"fork": fork}) if first else StartupTimes(fork=fork)
        sidecars.add(pid)
        write_atomically(files.sidecar_pid, str(pid))
        first = False


def _log_to(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def main(argv: list[str] | None = None) -> None:
    began = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--zygote",
        metavar="PREFIX",
        required=True,
        type=Path,
        help="the zygote's files: PREFIX.json (settings), .fork (requests), .pid, .zygote",
    )
    ap.add_argument(
        "--external",
        action="store_true",
        help="started on its own (a container's command): serve engines until SIGTERM",
    )
    args = ap.parse_args(argv)
    files = ZygoteFiles(args.zygote)
    sidecars: set[int] = set()
    if args.external:
        _stop_on_sigterm(files, sidecars)
    else:  # it yields the CPU to the trainer: its imports only have to be done by START_VLLM
        _exit_with()
        _set_priority(ZYGOTE_NICE)
    write_atomically(files.zygote_pid, str(os.getpid()))

    import fastapi  # noqa: F401 - imported once, in the zygote
    import uvicorn
    from vllm import LLM, SamplingParams  # noqa: F401 - vLLM's top level is lazy: these import the engine

    imported = time.perf_counter()
    _wait_for(files.settings)
    waited = time.perf_counter()
    compile_sampler_ops(VllmSettings.from_json_file(files.settings))
    times = StartupTimes(imports=imported - began, compile=time.perf_counter() - waited)
    # What the zygote holds now is shared with every sidecar: out of the garbage collector's sight, the
    # collections vLLM runs while it builds skip it (about 1 s on CPU) and leave its pages shared.
    gc.freeze()
    print(f"vLLM zygote ready: {times.model_dump_json()}", flush=True)
    _reap_children(sidecars)
    request, times = fork_on_request(files, times, sidecars)
    settings = VllmSettings.from_json_file(request.settings)
    began = time.perf_counter()
    llm = start_llm(settings)  # vLLM's environment first: it reads it when it builds, not when imported
    times = times.model_copy(update={"build": time.perf_counter() - began})
    print(f"vLLM built: {times.model_dump_json()}", flush=True)
    app = create_app(llm, settings.model_dir, times)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
    os._exit(0)  # a forked sidecar: nothing of the zygote's to clean up


if __name__ == "__main__":
    main()
