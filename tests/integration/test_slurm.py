"""`sbatch -N 2 launch/slurm/timeshare.sbatch` on a real two-node slurm on this machine (slurm_cluster.py):
the job finishes with its metrics, and both nodes' vLLMs served rollouts of the trainer's versions; a second
job, `resume=` the run, continues it on both nodes from its newest checkpoint. Two layouts of etcd: the
head's own (started per job), and the cluster's (TIMESHARE_ETCD: one etcd that outlives both jobs), where
each attempt coordinates under its own namespace and the resumed head removes the earlier attempt's keys."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest

from checkpoint_engine.contracts.run_dir import RunPaths
from checkpoint_engine.etcd_client import connect
from checkpoint_engine.job_status import job_names
from launch.etcd_server import LocalEtcd
from tests.integration.slurm_cluster import slurm_cluster, slurm_missing
from tests.integration.train_job import OVERRIDES, REPO, rows

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.skipif(slurm_missing() is not None, reason=str(slurm_missing()))
@pytest.mark.parametrize("etcd", ["head", "cluster"])
def test_the_sbatch_script_runs_a_job_on_two_slurm_nodes_and_resumes_it(tmp_path: Path, etcd: str) -> None:
    runs = tmp_path / "runs"
    with contextlib.ExitStack() as stack:
        slurm = stack.enter_context(slurm_cluster(tmp_path / "slurm"))
        env = {**slurm, "TIMESHARE": f"{sys.executable} -m launch.cli", "PYTHONPATH": str(REPO)}
        cluster_etcd = stack.enter_context(LocalEtcd(tmp_path / "cluster-etcd")) if etcd == "cluster" else None
        if cluster_etcd is not None:
            env["TIMESHARE_ETCD"] = cluster_etcd.endpoint

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

        def namespaces() -> list[str]:
            assert cluster_etcd is not None
            with connect(cluster_etcd.endpoint) as client:
                return job_names(client)

        job, out = sbatch(*OVERRIDES, "run.iterations=2", f"run.root={runs}")
        left = namespaces() if cluster_etcd is not None else []
        paths = RunPaths(runs / f"timeshare-{job}")
        resumed_job, resumed = sbatch(f"resume={paths.root}")
        if cluster_etcd is not None:
            # the first attempt's phase stayed in the cluster's etcd; the resumed attempt ran beside it, not on it,
            # and its head removed it
            assert left == [f"timeshare-{job}@slurm-{job}.0"]
            assert namespaces() == [f"timeshare-{job}@slurm-{resumed_job}.0"]
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
