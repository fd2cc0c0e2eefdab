"""`sbatch -N 2 launch/slurm/timeshare.sbatch` on a real two-node slurm on this machine (slurm_cluster.py):
the job finishes with its metrics, and both nodes' vLLMs served rollouts of the trainer's versions; a second
job, `resume=` the run, continues it on both nodes from its newest checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from checkpoint_engine.contracts.run_dir import RunPaths
from tests.integration.slurm_cluster import slurm_cluster, slurm_missing
from tests.integration.train_job import OVERRIDES, REPO, rows

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.skipif(slurm_missing() is not None, reason=str(slurm_missing()))
def test_the_sbatch_script_runs_a_job_on_two_slurm_nodes(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    with slurm_cluster(tmp_path / "slurm") as slurm:
        env = {**slurm, "TIMESHARE": f"{sys.executable} -m launch.cli", "PYTHONPATH": str(REPO)}

        def sbatch(*overrides: str) -> tuple[str, str]:
            """Submit and wait: the job id and its output."""
            submit = subprocess.run(
                [
                    "sbatch",
                    "-N",
                    "2",
                    "--wait",
                    f"--output={tmp_path}/slurm-%j.out",
                    f"--chdir={REPO}",
                    str(REPO / "launch/slurm/timeshare.sbatch"),
                    *overrides,
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=900,
                check=False,
            )
            job = submit.stdout.split()[-1] if submit.stdout else "?"  # "Submitted batch job N"
            out = tmp_path / f"slurm-{job}.out"
            assert submit.returncode == 0, submit.stderr + (out.read_text()[-5000:] if out.exists() else "")
            return job, out.read_text()

        job, out = sbatch(*OVERRIDES, "run.iterations=2", f"run.root={runs}")
        paths = RunPaths(runs / f"timeshare-{job}")
        _, resumed = sbatch(f"resume={paths.root}")
    history = {int(r["iteration"]): r for r in rows(paths)}
    assert sorted(history) == [0, 1, 2]
    for i, row in history.items():
        assert row["vllm/weight_version/n1"] == row["vllm/weight_version/n2"] == i
        assert row["rollout/requests/n1"] > 0
        assert row["rollout/requests/n2"] > 0
    assert f"timeshare: job timeshare-{job} on n1 n2, head n1 at 127.0.0.1" in out
    assert "n2 done" in out
    assert f"n2 of job timeshare-{job} in {paths.root}, from iteration 2" in resumed  # the run's own name
    assert "n2 done" in resumed
    assert [int(r["iteration"]) for r in rows(paths)] == [0, 1, 2]  # iteration 2 again, logged once
