"""`timeshare status`: where a job is, from etcd alone (see `checkpoint_engine.job_status`).

The job is named by a run directory (its `engine-<node>.json` says which etcd and job) or by `--etcd` and
`--job`; `--etcd` alone lists the jobs there. `--watch SECONDS` redraws until Ctrl-C.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from checkpoint_engine.contracts.config import ConfigError
from checkpoint_engine.etcd_client import connect
from checkpoint_engine.job_status import NoSuchJob, format_status, job_names, read_status


def locate(run_dir: str | None, etcd: str | None, job: str | None) -> tuple[str, str | None]:
    """(etcd endpoint, job) from the arguments; a ConfigError saying what is missing or wrong."""
    if run_dir is not None:
        docs = sorted(Path(run_dir).glob("engine-*.json"))
        if not docs:
            raise ConfigError(f"{run_dir} has no engine-<node>.json: not a run directory (or its engine never started)")
        doc = json.loads(docs[0].read_text())
        return etcd or doc["etcd"], job or doc["job"]
    if etcd is None:
        raise ConfigError("name the job: a run directory, or --etcd HOST:PORT [--job NAME]")
    return etcd, job


def main(run_dir: str | None, etcd: str | None, job: str | None, watch: float | None) -> int:
    endpoint, job = locate(run_dir, etcd, job)
    import pyetcd

    client = connect(endpoint, timeout=3.0)
    try:
        if job is None:
            print("\n".join(job_names(client)) or f"no jobs in etcd at {endpoint}")
            return 0
        while True:
            text = format_status(read_status(client, job))
            if watch is None:
                print(text)
                return 0
            clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
            print(f"{clear}{text}\n(every {watch:g} s; Ctrl-C to stop)", flush=True)
            time.sleep(watch)
    except pyetcd.exceptions.ConnectionFailedError:
        hint = " (a run's own etcd stops with the run)" if run_dir is not None else ""
        raise ConfigError(f"etcd at {endpoint} did not answer{hint}") from None
    except NoSuchJob as e:
        raise ConfigError(f"{e} (etcd at {endpoint})") from None
    except KeyboardInterrupt:
        return 130
    finally:
        client.close()
