"""Benchmark of the endpoint against the raw model, in one run on this machine.

A model of the default architecture (params.yaml `train`: ResNet, 112 px) is put in a fresh BentoML store
and served by `bentoml serve` on 127.0.0.1. Then, side by side:

- the raw model in this process: `Classifier.predict` on batches of 32 decoded slices (images/s);
- `/predict` (one scan per request) and `/predict_batch` (one scan per request, merged by adaptive
  batching) at 1, 8 and 32 concurrent closed-loop clients: requests/s, p50 and p99 latency, errors;
- the service's memory (RSS of its process tree) before and after, and with `--soak S` a load of S seconds
  at 8 clients sampled every 10 s (flat = no leak).

Prints the ratio of the endpoint's throughput at concurrency 32 to the raw model's.

    .venv/bin/python bench/endpoint.py [--seconds 15] [--soak 600]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))


def build_model(bento_home: Path, cohort: Path) -> None:
    """The default architecture, its embedding summary fitted on the cohort, saved as the package stage does."""
    import bentoml
    import torch

    from components.config import load_params
    from components.imaging import read_slice
    from components.model import Classifier, EmbeddingProjection, ModelSpec, build_network

    os.environ["BENTOML_HOME"] = str(bento_home)
    train = load_params(PROJECT / "params.yaml").train
    spec = ModelSpec(network=train.network, image_size=train.image_size, channels=train.channels, blocks=train.blocks,
                     classes=["notumor", "tumor"], norm=train.norm)  # fmt: skip
    torch.manual_seed(0)
    classifier = Classifier(spec, build_network(spec))
    images = classifier.batch([read_slice(p) for p in sorted(cohort.glob("*tumor/*.png"))[:64]])
    classifier.projection = EmbeddingProjection.fit(classifier.predict_prepared(images)[1], images=images)
    identity = {"registered_model": "bench", "model_version": "1", "run_id": "none"}
    with bentoml.models.create("tumorscope-classifier", labels=identity) as model:
        torch.save(classifier.net.state_dict(), model.path_of("model.pt"))
        Path(model.path_of("model.json")).write_text(json.dumps({**spec.model_dump(), **identity}))
        Path(model.path_of("embedding.json")).write_text(classifier.projection.model_dump_json())


def raw_throughput(bento_home: Path, slices: list[np.ndarray], seconds: float) -> float:
    """Images/s of the packaged model called directly, in batches of 32 (decoded slices in, probabilities out)."""
    import torch

    from components.model import Classifier

    torch.set_num_threads(os.cpu_count() or 1)
    folder = next((bento_home / "models" / "tumorscope-classifier").glob("*/model.json")).parent
    classifier = Classifier.load(folder)
    batch = (slices * 32)[:32]
    classifier.predict(batch)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        classifier.predict(batch, batch_size=32)
        done += len(batch)
    return done / (time.perf_counter() - started)


async def closed_loop(url: str, route: str, image: bytes, clients: int, seconds: float) -> tuple[list[float], int]:
    field = "image" if route == "/predict" else "images"
    latencies, errors = [], 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:

        async def client() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                response = await http.post(f"{url}{route}", files={field: ("slice.png", image, "image/png")})
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1

        await asyncio.gather(*(client() for _ in range(clients)))
    return latencies, errors


def tree_rss_gb(pid: int) -> float:
    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)] if p.is_running()) / 1e9


def serve(bento_home: Path, folder: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "BENTOML_HOME": str(bento_home), "TUMORSCOPE_PREDICTION_LOG": str(folder / "predictions.sqlite"),
           "TUMORSCOPE_API_KEYS": str(folder / "no-keys.json"), "TUMORSCOPE_KEEP_IMAGES": "false"}  # fmt: skip
    command = [
        str(Path(sys.executable).parent / "bentoml"),
        "serve",
        "serving.service:TumorScope",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    process = subprocess.Popen(command, cwd=PROJECT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.5)
    sys.exit("bentoml serve did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15, help="load per (route, concurrency)")
    parser.add_argument("--soak", type=float, default=0, help="seconds of load at 8 clients to watch memory (0: skip)")
    args = parser.parse_args()
    from components.config import SynthConfig
    from components.imaging import read_slice
    from components.synth import run as synthesise

    folder = Path(tempfile.mkdtemp(prefix="tumorscope-endpoint-bench-"))
    try:
        cohort = folder / "synth"
        synthesise(SynthConfig(out=cohort, subjects=40, slices_per_subject=2, image_size=128, seed=1))
        bento_home = folder / "bentoml"
        build_model(bento_home, cohort)
        image_path = next(cohort.glob("tumor/*.png"))
        raw = raw_throughput(bento_home, [read_slice(image_path)], args.seconds)
        print(f"raw model, in process, batches of 32: {raw:.1f} images/s")
        process, url = serve(bento_home, folder)
        rss_start = tree_rss_gb(process.pid)
        image = image_path.read_bytes()
        results = {}
        for route in ("/predict", "/predict_batch"):
            for clients in (1, 8, 32):
                asyncio.run(closed_loop(url, route, image, clients, 2))  # warm-up
                latencies, errors = asyncio.run(closed_loop(url, route, image, clients, args.seconds))
                ordered = sorted(latencies)
                row = {"rps": len(latencies) / args.seconds, "p50_ms": 1000 * statistics.median(ordered),
                       "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], "errors": errors}  # fmt: skip
                results[f"{route} c{clients}"] = row
                print(f"{route:15s} concurrency {clients:2d}: {row['rps']:6.1f} req/s  p50 {row['p50_ms']:6.0f} ms  "
                      f"p99 {row['p99_ms']:6.0f} ms  errors {errors}  ({row['rps'] / raw:.2f}x raw)", flush=True)  # fmt: skip
        rss_after = tree_rss_gb(process.pid)
        print(f"service memory (process tree RSS): {rss_start:.2f} GB at start, {rss_after:.2f} GB after the runs")
        if args.soak:
            samples = []
            for _ in range(int(args.soak // 10)):
                asyncio.run(closed_loop(url, "/predict", image, 8, 10))
                samples.append(tree_rss_gb(process.pid))
            print(
                f"soak {args.soak:.0f} s at 8 clients: RSS first {samples[0]:.3f} GB, max {max(samples):.3f} GB, last {samples[-1]:.3f} GB"
            )
        best = max(results["/predict c32"]["rps"], results["/predict_batch c32"]["rps"])
        print(f"endpoint at concurrency 32 vs raw model: {best / raw:.2f}x (goal >= 0.7x)")
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
