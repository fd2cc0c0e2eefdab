"""A real two-node slurm on this machine for the sbatch script's test: Debian's slurm-wlm and munge.

slurmctld and two slurmd (node names n1 and n2 on this host, `slurmd -N`) run from a config written
under the test's directory (SLURM_CONF), as root; munged runs as the munge user with the key the
package made. Everything started here is stopped on exit; a munged that was already running stays.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from checkpoint_engine.process_group import ProcessGroup
from launch.etcd_server import free_loopback_ports

NODES = ("n1", "n2")


def slurm_missing() -> str | None:
    """Why no slurm can run here, or None."""
    for tool in ("slurmctld", "slurmd", "munged", "sbatch", "scontrol"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian's slurm-wlm and munge; `make setup` installs them)"
    if os.geteuid() != 0:
        return "slurmd runs as root here"
    return None


def _config(root: Path, ctld_port: int, slurmd_ports: list[int]) -> str:
    host = socket.gethostname()
    nodes = "".join(
        f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs=2 RealMemory=4000 State=UNKNOWN\n"
        for n, p in zip(NODES, slurmd_ports, strict=True)
    )
    return f"""ClusterName=timeshare
SlurmctldHost={host}
SlurmctldPort={ctld_port}
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
KillWait=30
MailProg=/bin/true
{nodes}PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


@contextmanager
def slurm_cluster(root: Path) -> Iterator[dict[str, str]]:
    """slurmctld and slurmd n1, n2 running; yields the environment (SLURM_CONF) to submit with."""
    root.mkdir(parents=True, exist_ok=True)
    ctld_port, *slurmd_ports = free_loopback_ports(3)
    conf = root / "slurm.conf"
    conf.write_text(_config(root, ctld_port, slurmd_ports))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    with ExitStack() as stack:
        if _start_munge():
            stack.callback(subprocess.run, ["pkill", "-x", "munged"], check=False)
        ctld = ProcessGroup.spawn(["slurmctld", "-D", "-i", "-f", str(conf)], root / "slurmctld.out", env=env)
        stack.callback(ctld.stop, 10)
        for node in NODES:
            slurmd = ProcessGroup.spawn(
                ["slurmd", "-D", "-N", node, "-f", str(conf)], root / f"slurmd-{node}.out", env=env
            )
            stack.callback(slurmd.stop, 10)
        _await_idle(env, root)
        yield env


def _start_munge() -> bool:
    """munged running as the munge user; True when it was started here."""
    if subprocess.run(["munge", "-n"], capture_output=True, check=False).returncode == 0:  # it answers
        return False
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
    return True


def _await_idle(env: dict[str, str], root: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    states = ""
    while time.monotonic() < deadline:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=env, capture_output=True, text=True, check=False)
        states = out.stdout.strip()
        if out.returncode == 0 and sorted(states.splitlines()) == [f"{n} idle" for n in NODES]:
            return
        time.sleep(0.5)
    logs = "\n".join(p.read_text()[-1500:] for p in sorted(root.glob("*.log")) if p.is_file())
    raise AssertionError(f"slurm nodes not idle within {timeout:g} s (sinfo: {states!r})\n{logs}")
