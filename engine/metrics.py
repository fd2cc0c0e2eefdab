"""Per-iteration metrics of a run: a JSON-lines file, TensorBoard scalars, one console line and a progress plot.

Consumes, once per iteration, a flat mapping of slash-separated metric names to floats (`reward/mean`,
`eval/pass@1`, `time/rollout`, ...); keys may be missing in some iterations (eval runs every N).
Produces, under the run directory:

- `metrics.jsonl`: one `{"iteration": i, "time": unix, **metrics}` object per line, flushed as it is
  written so that a killed run keeps what it logged, and read back on start so that a resumed run's
  `history()` covers the whole run;
- `tensorboard/`: event files (global step = iteration);
- `progress.png` (on `plot()`): reward and held-out pass@k, the trainer/rollout logprob gap, and the
  phase times stacked per iteration.

`summarize_phase_times` turns a history into a Markdown table for notes. TensorBoard and matplotlib
are imported only where they are used.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from checkpoint_engine.contracts.phases import CYCLE

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
PLOT_FILE = "progress.png"
TIME_PREFIX = "time/"
RESERVED_KEYS = frozenset({"iteration", "time"})

# The phases of one iteration in the order they run; their short labels on the console line.
# The launch's own spans first, then the cycle's phases in their order (contracts.phases.TABLE).
PHASE_ORDER: tuple[str, ...] = ("startup", "cold_start", *(p.value.lower() for p in CYCLE))
_PHASE_LABELS = {"update_weights": "update", "terminate_vllm": "terminate"}
_PASS_AT_K = re.compile(r"^eval/pass@(\d+)$")


# --------------------------------------------------------------------------------------------------
# Pure helpers: key ordering and formatting
# --------------------------------------------------------------------------------------------------


def phase_keys(keys: Iterable[str]) -> list[str]:
    """The `time/*` keys among `keys`: the known phases in run order first, then the others sorted."""
    names = {k[len(TIME_PREFIX) :] for k in keys if k.startswith(TIME_PREFIX)}
    known = [p for p in PHASE_ORDER if p in names]
    return [TIME_PREFIX + p for p in known + sorted(names - set(known))]


def pass_at_k_keys(keys: Iterable[str]) -> list[str]:
    """The `eval/pass@k` keys among `keys`, ordered by k (numerically: pass@16 after pass@4)."""
    found = {k for k in keys if _PASS_AT_K.match(k)}
    return sorted(found, key=lambda k: int(_PASS_AT_K.match(k).group(1)))  # type: ignore[union-attr]


def _seconds(value: float) -> str:
    # Phases under 0.05 s (offload of a tiny model) would all read "0.0s" at one decimal.
    if value == 0 or abs(value) >= 0.05 or not math.isfinite(value):
        return f"{value:.1f}s"
    return f"{value:.2g}s"


def format_line(iteration: int, metrics: Mapping[str, float]) -> str:
    """One human-readable line of the headline numbers in a fixed order; absent keys omitted (the rest go
    to metrics.jsonl and TensorBoard). `heldout` is greedy accuracy, then pass@k over sampled answers:

    `iter 3 | reward 0.412 | heldout 0.250 (pass@1 0.231, pass@4 0.510) | len 7.1 | gap 2.1e-07 |
    push 1.23 GB/s | train 4.1s offload 0.1s ...`
    """
    parts = [f"iter {iteration}"]
    used: set[str] = set()

    def take(key: str) -> float | None:
        if key not in metrics:
            return None
        used.add(key)
        return float(metrics[key])

    if (reward := take("reward/mean")) is not None:
        parts.append(f"reward {reward:.3f}")

    accuracy = take("eval/accuracy")
    samples = [f"{k.removeprefix('eval/')} {take(k):.3f}" for k in pass_at_k_keys(metrics.keys())]
    if accuracy is not None or samples:
        head = f"heldout {accuracy:.3f}" if accuracy is not None else "heldout"
        parts.append(head + (f" ({', '.join(samples)})" if samples else ""))

    if (length := take("rollout/mean_length")) is not None:
        parts.append(f"len {length:.1f}")
    if (gap := take("logprob_gap/mean_abs")) is not None:
        parts.append(f"gap {gap:.1e}")
    if (push := take("push/gb_per_s")) is not None:
        parts.append(f"push {push:.2f} GB/s" + (" (CUDA IPC)" if take("push/cuda_ipc") else ""))

    phases = []
    for key in phase_keys(metrics.keys()):
        name = key[len(TIME_PREFIX) :]
        phases.append(f"{_PHASE_LABELS.get(name, name)} {_seconds(take(key))}")  # type: ignore[arg-type]
    if phases:
        parts.append(" ".join(phases))

    return " | ".join(parts)


def summarize_phase_times(history: Sequence[Mapping[str, float]]) -> str:
    """A Markdown table of the `time/*` keys in `history`: phase | mean s | share of iteration (%).

    `mean s` averages over the iterations in which the phase ran; the share is the phase's total seconds
    over the total seconds of all phases, so the shares add up to 100. A last row gives the mean
    iteration (the sum of its phases).
    """
    keys = phase_keys({k for entry in history for k in entry})
    if not keys:
        return "_no phase times (time/*) in the history_"
    sums = dict.fromkeys(keys, 0.0)
    counts = dict.fromkeys(keys, 0)
    iteration_totals = []
    for entry in history:
        present = [k for k in keys if k in entry]
        for k in present:
            sums[k] += float(entry[k])
            counts[k] += 1
        if present:
            iteration_totals.append(sum(float(entry[k]) for k in present))
    grand = sum(sums.values())
    lines = ["| phase | mean s | share of iteration (%) |", "|---|---:|---:|"]
    for k in keys:
        share = 100.0 * sums[k] / grand if grand > 0 else float("nan")
        lines.append(f"| {k[len(TIME_PREFIX) :]} | {sums[k] / counts[k]:.3f} | {share:.1f} |")
    mean_iteration = sum(iteration_totals) / len(iteration_totals)
    lines.append(f"| **iteration** | {mean_iteration:.3f} | {100.0 if grand > 0 else float('nan'):.1f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The logger
# --------------------------------------------------------------------------------------------------


class MetricsLogger:
    """Writes each iteration's metrics to `metrics.jsonl`, TensorBoard and the console; plots the run.

    On start it reads an existing `metrics.jsonl` (a resumed run). When a run resumes from an earlier
    checkpoint and logs an iteration it had already logged, the entries from that iteration on are dropped
    from `history()` and from the file (so each iteration has one line), and TensorBoard is told to purge
    its events from that step on.
    """

    def __init__(self, run_dir: Path, *, tensorboard: bool = True, echo: Callable[[str], None] | None = print) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.tensorboard_dir = self.run_dir / TENSORBOARD_DIR
        self._tensorboard = tensorboard
        self._echo = echo
        self._writer: Any = None  # torch.utils.tensorboard.SummaryWriter, made on the first log
        self._history: list[dict[str, float]] = []
        if tensorboard:
            self.tensorboard_dir.mkdir(exist_ok=True)
        for entry in _read_history(self.metrics_path):
            self._record(entry)

    def log(self, iteration: int, metrics: Mapping[str, float]) -> None:
        """Append one iteration: a flushed JSON line, TensorBoard scalars at step `iteration`, one console line."""
        if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
            raise ValueError(f"iteration must be an int >= 0, got {iteration!r}")
        clash = RESERVED_KEYS & metrics.keys()
        if clash:
            raise ValueError(f"metric names {sorted(clash)} are reserved for the logger's own fields")
        values = {k: float(v) for k, v in metrics.items()}
        entry: dict[str, float] = {"iteration": iteration, "time": time.time(), **values}

        rewinds = bool(self._history) and iteration <= self._history[-1]["iteration"]
        self._record(entry)
        if rewinds:  # the lines from `iteration` on belong to the run before its restart
            _rewrite(self.metrics_path, self._history)
        else:
            with self.metrics_path.open("a", encoding="utf-8") as f:  # closed (so flushed) after every line
                f.write(json.dumps(entry) + "\n")

        if self._tensorboard:
            writer = self._summary_writer(purge_step=iteration if rewinds else None)
            for key, value in values.items():
                writer.add_scalar(key, value, global_step=iteration)
            writer.flush()
        if self._echo is not None:
            self._echo(format_line(iteration, values))

    def history(self) -> list[dict[str, float]]:
        """Every iteration logged in this run, resumed parts included, in iteration order (copies)."""
        return [dict(entry) for entry in self._history]

    def plot(self, path: Path | None = None) -> Path:
        """Draw the progress figure (PNG) at `path` (default `run_dir/progress.png`) and return the path."""
        target = Path(path) if path is not None else self.run_dir / PLOT_FILE
        plot_history(self._history, target)
        return target

    def close(self) -> None:
        """Flush and close the TensorBoard writer (the JSON lines are already on disk)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _record(self, entry: dict[str, float]) -> None:
        iteration = entry["iteration"]
        if self._history and iteration <= self._history[-1]["iteration"]:
            self._history = [h for h in self._history if h["iteration"] < iteration]
        self._history.append(entry)

    def _summary_writer(self, purge_step: int | None) -> Any:
        # Only a new event file can carry TensorBoard's purge marker, so a rewind starts a new writer.
        if self._writer is not None and purge_step is not None:
            self.close()
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.tensorboard_dir), purge_step=purge_step)
        return self._writer


def _rewrite(path: Path, history: Sequence[Mapping[str, float]]) -> None:
    """`path` holding exactly `history`, replaced at once: a kill mid-write leaves the old file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(json.dumps(dict(entry)) + "\n" for entry in history), encoding="utf-8")
    os.replace(partial, path)


def _read_history(path: Path) -> list[dict[str, float]]:
    """The entries of an existing `metrics.jsonl`, cutting off a last line left half-written by a killed run."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        complete = data.rfind(b"\n") + 1
        log.warning("%s: dropping a half-written last line (%d bytes) from a killed run", path, len(data) - complete)
        with path.open("r+b") as f:  # appending after it would glue the next entry onto the fragment
            f.truncate(complete)
        data = data[:complete]
    entries = []
    for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            log.warning("%s:%d: skipping an unreadable line (%s)", path, number, err)
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("iteration"), int):
            log.warning("%s:%d: skipping a line without an integer 'iteration'", path, number)
            continue
        entries.append(entry)
    return entries


# --------------------------------------------------------------------------------------------------
# The progress figure
# --------------------------------------------------------------------------------------------------


def _series(history: Sequence[Mapping[str, float]], key: str) -> tuple[list[float], list[float]]:
    """(iterations, values) of the entries that have a finite `key`."""
    xs, ys = [], []
    for entry in history:
        value = entry.get(key)
        if value is not None and math.isfinite(value):
            xs.append(entry["iteration"])
            ys.append(value)
    return xs, ys


def _legend(ax: Any) -> None:
    # Outside on the right: inside, the phase legend hides the top of the stacked bars.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")


def _no_data(ax: Any) -> None:
    ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")


def plot_history(history: Sequence[Mapping[str, float]], path: Path) -> None:
    """Four panels over iterations: reward, held-out accuracy and pass@k; response lengths (all, the
    correct ones: the length reward's effect); logprob gap; stacked phase times."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, no display needed
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 13), layout="constrained")
    ax_reward, ax_length, ax_gap, ax_time = fig.subplots(4, 1, sharex=True)
    keys = {k for entry in history for k in entry}
    _plot_accuracy(ax_reward, history, keys)
    _plot_lengths(ax_length, history)
    _plot_gap(ax_gap, history, keys)
    _plot_phase_times(ax_time, history, keys)
    ax_time.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if history:  # shared x; half a bar of margin, and a readable axis when there is one iteration
        iterations = [entry["iteration"] for entry in history]
        ax_time.set_xlim(min(iterations) - 0.6, max(iterations) + 0.6)

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    fig.savefig(partial, format="png", dpi=100)  # a viewer refreshing the file never sees half a PNG
    os.replace(partial, path)


def _plot_accuracy(ax: Any, history: Sequence[Mapping[str, float]], keys: set[str]) -> None:
    ax.set_title("reward and held-out accuracy")
    drawn = False
    for key in ["reward/mean", *(["eval/accuracy"] if "eval/accuracy" in keys else []), *pass_at_k_keys(keys)]:
        xs, ys = _series(history, key)
        if xs:
            # Every iteration has a reward (small dots); eval runs every N (big dots). A lone point shows too.
            small = key == "reward/mean"
            ax.plot(xs, ys, ".-" if small else "o-", markersize=4 if small else 5, label=key)
            drawn = True
    if drawn:
        _legend(ax)
    else:
        _no_data(ax)


def _plot_lengths(ax: Any, history: Sequence[Mapping[str, float]]) -> None:
    ax.set_title("response length (tokens)")
    drawn = False
    for key in ("rollout/mean_length", "rollout/correct_length", "rollout/length_p90"):
        xs, ys = _series(history, key)
        if xs:
            ax.plot(xs, ys, ".-", label=key)
            drawn = True
    if drawn:
        _legend(ax)
    else:
        _no_data(ax)


def _plot_gap(ax: Any, history: Sequence[Mapping[str, float]], keys: set[str]) -> None:
    ax.set_title("trainer vs rollout logprob gap")
    gap_keys = sorted((k for k in keys if k.startswith("logprob_gap/")), key=lambda k: (k != "logprob_gap/mean_abs", k))
    values: list[float] = []
    for key in gap_keys:
        xs, ys = _series(history, key)
        if xs:
            ax.plot(xs, ys, ".-", label=key)
            values += ys
    if not values:
        _no_data(ax)
        return
    if min(values) > 0:  # the gap spans decades (1e-7 when exact, 1e-1 when weights went stale)
        ax.set_yscale("log")
    _legend(ax)


def _plot_phase_times(ax: Any, history: Sequence[Mapping[str, float]], keys: set[str]) -> None:
    ax.set_title("phase times per iteration")
    ax.set_xlabel("iteration")
    ax.set_ylabel("s")
    timed = [entry for entry in history if any(k.startswith(TIME_PREFIX) for k in entry)]
    if not timed:
        _no_data(ax)
        return
    iterations = [entry["iteration"] for entry in timed]
    bottom = [0.0] * len(timed)
    for key in phase_keys(keys):
        heights = [_finite_or_zero(entry.get(key)) for entry in timed]
        ax.bar(iterations, heights, bottom=bottom, width=0.8, label=key[len(TIME_PREFIX) :])
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    _legend(ax)


def _finite_or_zero(value: float | None) -> float:
    return value if value is not None and math.isfinite(value) else 0.0
