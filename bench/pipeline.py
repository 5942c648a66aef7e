"""Benchmark of the main job: the whole pipeline from a fresh workspace, then a no-op rerun.

Prints wall time and peak memory (RSS summed over the process tree, sampled every
0.2 s) of `tumorscope run` on the default data, the time of `dvc repro` and of
`tumorscope run` when nothing changed, and their ratios, all measured in this one run.

    .venv/bin/python bench/pipeline.py [--keep]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

PROJECT = Path(__file__).resolve().parents[1]
TOOL_HOMES = ("PREFECT_HOME", "BENTOML_HOME", "MLFLOW_TRACKING_URI", "TUMORSCOPE_PREDICTION_LOG", "PREFECT_API_URL")


def measure(command: list[str], cwd: Path) -> tuple[float, float, int]:
    """(seconds, peak tree RSS in GB, exit code) of one command."""
    env = {k: v for k, v in os.environ.items() if k not in TOOL_HOMES}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0.0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(process.pid)
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()) / 1e9)
            except psutil.Error:
                pass
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = process.wait()
    done.set()
    sampler.join()
    return time.perf_counter() - started, peak, code


def main() -> None:
    workspace = Path(tempfile.mkdtemp(prefix="tumorscope-bench-")) / "ws"
    subprocess.run(["git", "clone", "-q", str(PROJECT), str(workspace)], check=True)
    cli = [sys.executable, "-m", "components.cli"]
    full, full_peak, code = measure([*cli, "run"], workspace)
    if code != 0:
        sys.exit(f"tumorscope run failed in {workspace} (exit {code})")
    noop_dvc, _, _ = measure([sys.executable, "-m", "dvc", "repro"], workspace)
    noop_flow, noop_peak, _ = measure([*cli, "run"], workspace)
    print(f"workspace: {workspace}")
    print(f"tumorscope run, fresh workspace (default data): {full:7.1f} s   peak RSS {full_peak:.2f} GB")
    print(f"dvc repro, nothing changed:                     {noop_dvc:7.1f} s")
    print(f"tumorscope run, nothing changed (Prefect+DVC):  {noop_flow:7.1f} s   peak RSS {noop_peak:.2f} GB")
    print(f"ratio no-op dvc repro / full run:               {noop_dvc / full:7.4f}")
    print(f"ratio no-op flow / full run:                    {noop_flow / full:7.4f}")


if __name__ == "__main__":
    main()
