"""`timeshare bench cycle`'s summary of a run: per-phase means after the first iteration, the switch share."""

from __future__ import annotations

import json

import pytest

from launch.bench_cycle import PHASES, summarize


def test_summary_skips_the_first_iteration_and_computes_the_switch_share(capsys: pytest.CaptureFixture) -> None:
    def row(i: int, scale: float) -> dict[str, float]:
        return {"iteration": i, **{f"time/{p}": scale for p in PHASES}, "rollout/tokens_per_second": 100.0 * scale}

    total = summarize("terminate", [row(0, 50.0), row(1, 1.0), row(2, 3.0)])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert total == pytest.approx(2.0 * len(PHASES))  # iterations 1 and 2 only: each phase 2 s on average
    (switch,) = [x for x in lines if x["measure"] == "switch_overhead"]
    assert switch["ratio"] == pytest.approx(6 / 8)  # six of the eight phases are the switch
    (rate,) = [x for x in lines if x["measure"] == "rollout_tokens_per_second"]
    assert rate["value"] == pytest.approx(200.0)


def test_a_run_without_a_later_iteration_is_refused() -> None:
    with pytest.raises(SystemExit, match="raise --iterations"):
        summarize("keep_alive", [{"iteration": 0}])
