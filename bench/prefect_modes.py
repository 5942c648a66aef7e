"""What one flow run costs in Prefect's ephemeral mode against a running Prefect server, in one run on this machine.

Every `tumorscope run`, `monitor` or `tune` is a new process; in ephemeral mode (the README's default) each one
starts its own server and, in a new workspace, migrates a new database. The test suite runs about fifteen such
flows, so `tests/conftest.py` starts one `prefect server start` per worker and points the tests' flows at it.
This prints the wall and CPU seconds (the process and its children) of a one-task flow in a fresh process,
the two modes alternating, and their ratio.

    .venv/bin/python bench/prefect_modes.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
ONE_TASK_FLOW = """
import sys
from pathlib import Path
from components.settings import apply_runtime_env
apply_runtime_env(Path(sys.argv[1]))
from prefect import flow, task

@task
def one() -> int:
    return 1

@flow
def one_task() -> int:
    return one()

one_task()
"""


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_flow(env: dict[str, str], workspace: Path) -> tuple[float, float]:
    """Wall and CPU seconds of the one-task flow in a new process with a new Prefect home (a new workspace)."""
    workspace.mkdir(parents=True)
    started, cpu = time.perf_counter(), children_cpu()
    subprocess.run([sys.executable, "-c", ONE_TASK_FLOW, str(workspace)], cwd=PROJECT, env=env, capture_output=True, check=True)
    return time.perf_counter() - started, children_cpu() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(PROJECT))
    from tests.conftest import workspace_env

    scratch = Path(tempfile.mkdtemp(prefix="prefect-modes-"))
    started = time.perf_counter()
    workspace_env(scratch / "start", test_prefect_server=True)
    print(f"prefect server start: {time.perf_counter() - started:.1f} s until healthy (once per test worker)")
    times: dict[str, list[tuple[float, float]]] = {"server": [], "ephemeral": []}
    for repeat in range(args.repeats):
        for mode in times:
            workspace = scratch / f"{mode}-{repeat}"
            times[mode].append(one_flow(workspace_env(workspace, test_prefect_server=mode == "server"), workspace))
            print(f"{mode:9} {times[mode][-1][0]:5.1f} s wall {times[mode][-1][1]:5.1f} s CPU")
    wall = {mode: statistics.median(t[0] for t in runs) for mode, runs in times.items()}
    cpu = {mode: statistics.median(t[1] for t in runs) for mode, runs in times.items()}
    print(
        f"median per flow: ephemeral {wall['ephemeral']:.1f} s wall / {cpu['ephemeral']:.1f} s CPU, "
        f"server {wall['server']:.1f} s / {cpu['server']:.1f} s: {wall['ephemeral'] / wall['server']:.1f}x wall, "
        f"{cpu['ephemeral'] / cpu['server']:.1f}x CPU"
    )


if __name__ == "__main__":
    main()
