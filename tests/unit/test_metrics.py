"""MetricsLogger files (JSON lines, TensorBoard, PNG) and resume; console line and phase table by hand."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from engine.metrics import MetricsLogger, format_line, summarize_phase_times

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def iteration_metrics(i: int, *, with_eval: bool) -> dict[str, float]:
    """Plausible metrics of iteration i; eval keys only when `with_eval`."""
    metrics = {
        "reward/mean": 0.1 * (i + 1),
        "rollout/mean_length": 7.0 + i,
        "logprob_gap/mean_abs": 1e-7 * (i + 1),
        "push/gb_per_s": 1.5,
        "train/loss": 0.5 - 0.1 * i,
        "time/train": 4.0,
        "time/offload": 0.1,
        "time/start_vllm": 30.0 + i,
        "time/rollout": 5.0,
    }
    if with_eval:
        metrics |= {"eval/pass@1": 0.2 + 0.1 * i, "eval/pass@4": 0.5 + 0.1 * i}
    return metrics


def read_lines(path: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def log_three(run_dir: Path, **kwargs: object) -> list[dict[str, float]]:
    logged = [iteration_metrics(i, with_eval=i % 2 == 0) for i in range(3)]
    with MetricsLogger(run_dir, echo=None, **kwargs) as logger:  # type: ignore[arg-type]
        for i, metrics in enumerate(logged):
            logger.log(i, metrics)
    return logged


def test_log_writes_one_json_line_per_iteration(tmp_path: Path) -> None:
    before = time.time()
    logged = log_three(tmp_path, tensorboard=False)
    lines = read_lines(tmp_path / "metrics.jsonl")
    assert len(lines) == 3
    for i, (line, metrics) in enumerate(zip(lines, logged, strict=True)):
        assert line["iteration"] == i
        assert before <= line["time"] <= time.time()
        assert {k: v for k, v in line.items() if k not in {"iteration", "time"}} == pytest.approx(metrics)
    assert "eval/pass@1" in lines[0]
    assert "eval/pass@1" not in lines[1]


def test_resume_sees_history_and_appends(tmp_path: Path) -> None:
    log_three(tmp_path, tensorboard=False)
    logger = MetricsLogger(tmp_path, tensorboard=False, echo=None)
    assert [h["iteration"] for h in logger.history()] == [0, 1, 2]
    assert logger.history()[2]["reward/mean"] == pytest.approx(0.3)
    logger.log(3, {"reward/mean": 0.9})
    logger.close()
    assert [h["iteration"] for h in logger.history()] == [0, 1, 2, 3]
    assert [line["iteration"] for line in read_lines(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3]


def test_rewind_replaces_later_iterations_in_history_and_file(tmp_path: Path) -> None:
    """A run resumed from the checkpoint of iteration 1 logs 2 again: the old 2 drops out of history and
    out of metrics.jsonl, which has one line per iteration."""
    log_three(tmp_path, tensorboard=False)
    logger = MetricsLogger(tmp_path, tensorboard=False, echo=None)
    logger.log(2, {"reward/mean": 0.77})
    history = logger.history()
    assert [h["iteration"] for h in history] == [0, 1, 2]
    assert history[-1]["reward/mean"] == pytest.approx(0.77)
    lines = read_lines(tmp_path / "metrics.jsonl")
    assert [line["iteration"] for line in lines] == [0, 1, 2]
    assert lines[-1]["reward/mean"] == pytest.approx(0.77)
    logger.log(1, {"reward/mean": 0.5})  # further back: 1 and 2 go
    assert [line["iteration"] for line in read_lines(tmp_path / "metrics.jsonl")] == [0, 1]
    assert [h["iteration"] for h in MetricsLogger(tmp_path, tensorboard=False, echo=None).history()] == [0, 1]


def test_half_written_last_line_is_cut_off(tmp_path: Path) -> None:
    log_three(tmp_path, tensorboard=False)
    path = tmp_path / "metrics.jsonl"
    with path.open("a") as f:
        f.write('{"iteration": 3, "reward/me')  # the run was killed mid-write
    logger = MetricsLogger(tmp_path, tensorboard=False, echo=None)
    assert [h["iteration"] for h in logger.history()] == [0, 1, 2]
    logger.log(3, {"reward/mean": 0.5})
    assert [line["iteration"] for line in read_lines(path)] == [0, 1, 2, 3]


def test_reserved_and_bad_inputs_are_refused(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path, tensorboard=False, echo=None)
    with pytest.raises(ValueError, match="reserved"):
        logger.log(0, {"time": 1.0})
    with pytest.raises(ValueError, match="iteration"):
        logger.log(-1, {"reward/mean": 1.0})
    assert not (tmp_path / "metrics.jsonl").exists()


def test_tensorboard_holds_the_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = log_three(tmp_path)
    tb_dir = tmp_path / "tensorboard"
    assert list(tb_dir.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    assert {"reward/mean", "eval/pass@4", "time/start_vllm"} <= set(acc.Tags()["scalars"])
    rewards = acc.Scalars("reward/mean")
    assert [e.step for e in rewards] == [0, 1, 2]
    assert [e.value for e in rewards] == pytest.approx([m["reward/mean"] for m in logged])
    assert [e.step for e in acc.Scalars("eval/pass@1")] == [0, 2]


def test_tensorboard_purges_steps_after_a_rewind(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_three(tmp_path)
    with MetricsLogger(tmp_path, echo=None) as logger:
        logger.log(1, {"reward/mean": 0.99})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    events = acc.Scalars("reward/mean")
    assert [e.step for e in events] == [0, 1]
    assert events[-1].value == pytest.approx(0.99)


def test_echo_prints_one_line_per_log(tmp_path: Path) -> None:
    lines: list[str] = []
    logger = MetricsLogger(tmp_path, tensorboard=False, echo=lines.append)
    logger.log(5, {"reward/mean": 0.5})
    assert lines == ["iter 5 | reward 0.500"]


def test_plot_writes_a_png_with_gaps_in_eval(tmp_path: Path) -> None:
    log_three(tmp_path, tensorboard=False)  # eval present in iterations 0 and 2 only
    path = MetricsLogger(tmp_path, tensorboard=False, echo=None).plot()
    assert path == tmp_path / "progress.png"
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # IHDR
    assert width > 0
    assert height > 0
    assert not list(tmp_path.glob("*.partial"))


def test_plot_with_missing_panels_and_custom_path(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path, tensorboard=False, echo=None)
    target = tmp_path / "plots" / "only_reward.png"
    assert logger.plot(target) == target  # no history at all: three "no data" panels
    logger.log(0, {"reward/mean": 0.1})
    logger.log(1, {"reward/mean": 0.2, "logprob_gap/mean_abs": 0.0})  # a zero gap: linear axis
    assert logger.plot(target) == target
    assert target.read_bytes().startswith(PNG_SIGNATURE)


def test_format_line_orders_known_keys_and_omits_absent_ones() -> None:
    metrics = {
        "train/loss": 0.01234,
        "time/onload": 0.1,
        "time/rollout": 5.2,
        "time/train": 4.1,
        "eval/pass@4": 0.51,
        "eval/accuracy": 0.3,
        "time/start_vllm": 38.0,
        "reward/mean": 0.4123,
        "eval/pass@1": 0.25,
        "time/update_weights": 0.3,
        "logprob_gap/mean_abs": 2.1e-7,
        "push/gb_per_s": 1.234,
        "rollout/mean_length": 7.12,
        "time/offload": 0.1,
        "time/export": 0.2,
        "time/terminate_vllm": 1.0,
    }
    assert format_line(3, metrics) == (
        "iter 3 | reward 0.412 | heldout 0.300 (pass@1 0.250, pass@4 0.510) | len 7.1 | gap 2.1e-07 | "
        "push 1.23 GB/s | train 4.1s offload 0.1s export 0.2s start_vllm 38.0s update 0.3s rollout 5.2s "
        "terminate 1.0s onload 0.1s"
    )
    short = format_line(4, {"time/rollout": 5.0, "reward/mean": 0.5, "time/train": 4.0, "time/offload": 0.004})
    assert short == "iter 4 | reward 0.500 | train 4.0s offload 0.004s rollout 5.0s"
    assert "heldout" not in short
    assert "gap" not in short


def test_format_line_without_greedy_accuracy_leaves_other_keys_to_the_logs() -> None:
    line = format_line(0, {"eval/pass@16": 0.9, "eval/pass@4": 0.6, "zeta": 2.0, "alpha/x": 1.0, "time/eval": 3.0})
    assert line == "iter 0 | heldout (pass@4 0.600, pass@16 0.900) | eval 3.0s"


def test_summarize_phase_times_shares_sum_to_100() -> None:
    history = [
        {"iteration": 0, "time": 1.0, "reward/mean": 0.1, "time/train": 4.0, "time/rollout": 6.0},
        {"iteration": 1, "time": 2.0, "time/train": 2.0, "time/rollout": 6.0, "time/start_vllm": 2.0},
    ]
    table = summarize_phase_times(history)
    rows = [line.split("|")[1:-1] for line in table.splitlines()[2:]]
    body = {cells[0].strip(): (float(cells[1]), float(cells[2])) for cells in rows}
    assert list(body) == ["train", "start_vllm", "rollout", "**iteration**"]  # run order, then the total
    assert body["train"] == pytest.approx((3.0, 30.0))
    assert body["start_vllm"] == pytest.approx((2.0, 10.0))
    assert body["rollout"] == pytest.approx((6.0, 60.0))
    assert body["**iteration**"] == pytest.approx((10.0, 100.0))
    assert sum(share for name, (_, share) in body.items() if name != "**iteration**") == pytest.approx(100.0, abs=0.2)
    assert table.splitlines()[0] == "| phase | mean s | share of iteration (%) |"


def test_summarize_phase_times_without_phases() -> None:
    assert "no phase times" in summarize_phase_times([{"iteration": 0, "reward/mean": 1.0}])
