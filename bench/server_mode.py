"""Benchmark of server mode against the embedded defaults, in one run on this machine.

1. The same small training run (fresh workspace, synthetic cohort) twice: `tumorscope run` in embedded mode
   (ephemeral Prefect, SQLite MLflow, local files), and the training deployment run by the Prefect worker of
   `infra/local/stack.py` (PostgreSQL, S3, MLflow and Prefect servers), timed from submission to completion.
   Prints both times and their ratio (goal ≤ 1.2×).
2. The endpoint with 1 and then 2 BentoML workers (TUMORSCOPE_SERVICE_WORKERS), each under the same closed-loop
   load (8 concurrent clients, one slice per request): throughput, p50/p99 latency and the 2-vs-1 ratio.

    .venv/bin/python bench/server_mode.py [--seconds 20] [--subjects 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

PROJECT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TOOL_HOMES = ("PREFECT_HOME", "BENTOML_HOME", "MLFLOW_TRACKING_URI", "TUMORSCOPE_MLFLOW_TRACKING_URI", "TUMORSCOPE_PREDICTION_LOG",
              "PREFECT_API_URL")  # fmt: skip


def small_run_params(subjects: int) -> dict:
    return {
        "synth": {"subjects": subjects, "slices_per_subject": 2, "image_size": 64},
        "train": {"image_size": 64, "epochs": 4, "batch_size": 32, "channels": [8, 16, 32, 32], "patience": 4},
        "register": {"min_accuracy": 0.0, "min_sensitivity": 0.0, "min_specificity": 0.0, "min_auc": 0.0,
                     "min_subgroup_sensitivity": 0.0, "tolerance": 1.0},
    }  # fmt: skip


def workspace(parent: Path, name: str, params: dict) -> Path:
    root = parent / name
    subprocess.run(["git", "clone", "-q", str(PROJECT), str(root)], check=True)
    merged = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in params.items():
        merged[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
    return root


def clean_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in TOOL_HOMES}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["TUMORSCOPE_PREDICTION_LOG"] = str(root / "data" / "predictions.sqlite")
    return env


def read_env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and not line.startswith("#"))


def timed(command: list[str], cwd: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return time.perf_counter() - started


def training_times(parent: Path, subjects: int) -> dict:
    params = small_run_params(subjects)
    embedded_root = workspace(parent, "embedded", params)
    embedded = timed([sys.executable, "-m", "components.cli", "run"], embedded_root, clean_env(embedded_root))

    server_root = workspace(parent, "server", params)
    stack_env = {**clean_env(server_root), "TUMORSCOPE_STACK_DIR": str(parent / "stack"), "TUMORSCOPE_SCHEDULES": "paused"}
    stack = [sys.executable, str(PROJECT / "infra" / "local" / "stack.py")]
    up = timed([*stack, "up", "--workdir", str(server_root)], server_root, stack_env)
    try:
        client = {**stack_env, **read_env_file(parent / "stack" / "client.env"), "PREFECT_HOME": str(parent / "stack" / "prefect-client")}
        code = "from prefect.deployments import run_deployment\nrun = run_deployment('training/scheduled', timeout=3600)\n"
        code += "assert run.state.is_completed(), run.state\n"
        server = timed([sys.executable, "-c", code], server_root, client)
    finally:
        subprocess.run([*stack, "down", "--purge"], env=stack_env, capture_output=True)
    return {"embedded_s": embedded, "server_s": server, "stack_up_s": up, "root": embedded_root}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def closed_loop(url: str, image: bytes, clients: int, seconds: float) -> list[float]:
    """Each client sends its next request when the previous one answered; returns the latencies (s)."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    async with httpx.AsyncClient(timeout=60) as http:

        async def client() -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                response = await http.post(f"{url}/predict", files={"image": ("slice.png", image, "image/png")})
                response.raise_for_status()
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(client() for _ in range(clients)))
    return latencies


def endpoint_load(root: Path, workers: int, clients: int, seconds: float) -> dict:
    port = free_port()
    env = {**clean_env(root), "TUMORSCOPE_SERVICE_WORKERS": str(workers), "BENTOML_HOME": str(root / ".bentoml"),
           "TUMORSCOPE_KEEP_IMAGES": "false"}  # fmt: skip
    command = [str(BIN / "bentoml"), "serve", "serving.service:TumorScope", "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        image = next((root / "data" / "synth").glob("tumor/*.png")).read_bytes()
        asyncio.run(closed_loop(url, image, clients, 3))  # warm-up: every worker has answered
        latencies = asyncio.run(closed_loop(url, image, clients, seconds))
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    ordered = sorted(latencies)
    return {
        "workers": workers,
        "requests_per_s": len(latencies) / seconds,
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "requests": len(latencies),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20, help="load duration per endpoint configuration")
    parser.add_argument("--subjects", type=int, default=200, help="synthetic subjects of the small training run")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--keep", action="store_true", help="keep the workspaces")
    args = parser.parse_args()
    parent = Path(tempfile.mkdtemp(prefix="tumorscope-server-bench-"))
    try:
        times = training_times(parent, args.subjects)
        print(f"training run, embedded mode:               {times['embedded_s']:.1f} s")
        print(f"training run, deployment through worker:   {times['server_s']:.1f} s   (stack up: {times['stack_up_s']:.1f} s)")
        print(f"server-mode overhead: {times['server_s'] / times['embedded_s']:.2f}x (goal <= 1.2x)")
        one, two = (endpoint_load(times["root"], workers, args.clients, args.seconds) for workers in (1, 2))
        for row in (one, two):
            print(f"endpoint, {row['workers']} worker(s), {args.clients} clients: {row['requests_per_s']:.1f} req/s, "
                  f"p50 {row['p50_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms ({row['requests']} requests)")  # fmt: skip
        print(f"2 workers vs 1: {two['requests_per_s'] / one['requests_per_s']:.2f}x throughput")
        print(
            json.dumps(
                {"overhead": times["server_s"] / times["embedded_s"], "workers_ratio": two["requests_per_s"] / one["requests_per_s"]}
            )
        )
    finally:
        if not args.keep:
            shutil.rmtree(parent, ignore_errors=True)


if __name__ == "__main__":
    main()
