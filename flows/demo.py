"""The closed loop, end to end on the synthetic cohort (`make demo`).

Serve the champion; send in-distribution traffic and check (no retraining); send traffic from
another scanner (site-D) with clinician feedback and check again: drift → the feedback becomes a
new DVC data version → retraining → the gate on the fixed holdout → a new champion (or a refusal)
→ the endpoint reloads and answers with the version it now serves. Everything stays visible in
the MLflow, Prefect and Evidently UIs; the last lines print how to open them.

    .venv/bin/python -m flows.demo [--workdir .]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pandas as pd

from components.fairness import with_age_band
from flows.training import stage_env


def say(message: str) -> None:
    print(f"\n== {message}", flush=True)


def tumorscope(root: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "components.cli", *args]
    result = subprocess.run(command, cwd=root, env=env, text=True, capture_output=True)
    print(result.stdout.strip()[-3000:])
    if result.returncode != 0:
        raise SystemExit(f"demo stopped: `tumorscope {' '.join(args)}` failed:\n{result.stderr[-2000:]}")
    return result


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve(root: Path, env: dict) -> tuple[subprocess.Popen, str]:
    bento = json.loads((root / "reports" / "package.json").read_text())["bento"]
    port = free_port()
    command = [str(Path(sys.executable).parent / "bentoml"), "serve", bento, "--host", "127.0.0.1", "--port", str(port)]
    log = (root / "data" / "demo-serve.log").open("w")
    server = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        if server.poll() is not None:
            raise SystemExit(f"demo stopped: bentoml serve exited (code {server.returncode}); its output is in {log.name}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    server.kill()
    raise SystemExit("demo stopped: bentoml serve did not become ready in 120 s")


def send(url: str, cohort: Path, feedback: bool) -> tuple[int, float, set[str]]:
    """Each slice of a synthetic cohort to /predict (with its subgroups), and its true label to /feedback."""
    metadata = with_age_band(pd.read_csv(cohort / "metadata.csv"))  # the endpoint's age bands, from fairness
    correct, versions = 0, set()
    with httpx.Client(timeout=30) as client:
        for row in metadata.itertuples():
            with (cohort / row.file).open("rb") as image:
                fields = {"sex": row.sex, "site": row.site, "age_band": row.age_band}
                fields = {name: value for name, value in fields.items() if pd.notna(value)}
                answer = client.post(f"{url}/predict", files={"image": image}, data=fields).raise_for_status().json()
            label = row.file.split("/")[0]
            correct += answer["label"] == label
            versions.add(answer["model_version"])
            if feedback:
                client.post(f"{url}/feedback", json={"prediction_id": answer["prediction_id"], "label": label}).raise_for_status()
    return len(metadata), correct / len(metadata), versions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=".")
    root = Path(parser.parse_args().workdir).resolve()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    demo_dir = root / "data" / "demo" / stamp
    # the demo's own prediction log and kept slices, so an earlier demo's traffic does not count
    env = stage_env(root) | {
        "TUMORSCOPE_PREDICTION_LOG": str(demo_dir / "predictions.sqlite"),
        "TUMORSCOPE_IMAGE_STORE": str(demo_dir / "served"),
    }
    started = time.perf_counter()
    if not (root / "reports" / "package.json").exists():
        say("no packaged champion yet: running the training pipeline first")
        tumorscope(root, env, "run", "--workdir", str(root))
    say("1. serving the champion")
    server, url = serve(root, env)
    try:
        env["TUMORSCOPE_SERVICE_URL"] = url
        say("2. in-distribution traffic (sites A-C, like training), no feedback")
        in_distribution = ("--subjects", "150", "--slices-per-subject", "1")
        tumorscope(root, env, "synth", "--out", str(demo_dir / "in-distribution"), *in_distribution, "--seed", "101")
        n, accuracy, versions = send(url, demo_dir / "in-distribution", feedback=False)
        print(f"sent {n} slices; served by version {', '.join(sorted(versions))}; accuracy {accuracy:.3f}")
        say("3. monitoring: expect no retraining")
        tumorscope(root, env, "monitor", "--cooldown-hours", "0", "--workdir", str(root))
        say("4. traffic from a new scanner (site-D), each answer confirmed or corrected by a clinician")
        tumorscope(root, env, "synth", "--out", str(demo_dir / "site-d"), "--subjects", "120", "--shift", "scanner", "--seed", "202")
        n, accuracy, before = send(url, demo_dir / "site-d", feedback=True)
        print(f"sent {n} slices with feedback; served by version {', '.join(sorted(before))}; accuracy {accuracy:.3f}")
        say("5. monitoring: drift → feedback becomes a new data version → retraining → gate → reload")
        tumorscope(root, env, "monitor", "--cooldown-hours", "0", "--workdir", str(root))
        decision = json.loads((root / "reports" / "monitoring" / "decision.json").read_text())
        gate = json.loads((root / "reports" / "gate.json").read_text())
        say("6. the endpoint after the loop, on site-D slices it has never seen")
        tumorscope(root, env, "synth", "--out", str(demo_dir / "site-d-new"), "--subjects", "100", "--shift", "scanner", "--seed", "303")
        _, accuracy_after, after = send(url, demo_dir / "site-d-new", feedback=False)
        print(f"retraining decided: {decision['retrain']} ({'; '.join(decision['reasons'][:3])})")
        print(
            f"gate: {'promoted' if gate.get('promoted') else 'refused'} version {gate.get('candidate_version')}: {'; '.join(gate.get('reasons', []))}"
        )
        print(
            f"served version before: {', '.join(sorted(before))} (site-D accuracy {accuracy:.3f}); now: {', '.join(sorted(after))} (on new site-D slices {accuracy_after:.3f})"
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
    say(f"done in {time.perf_counter() - started:.0f} s. Look at it:")
    print(f"  MLflow:    .venv/bin/mlflow ui --backend-store-uri sqlite:///{root / 'mlflow.db'} --host 127.0.0.1")
    print(f"  Prefect:   PREFECT_HOME={root / '.prefect'} .venv/bin/prefect server start --host 127.0.0.1")
    print(f"  Evidently: .venv/bin/evidently ui --workspace {root / 'reports/monitoring/evidently-workspace'} --host 127.0.0.1")
    print(f"  Reports:   {root / 'reports/monitoring'} (drift, embedding drift, quality on feedback, per subgroup)")


if __name__ == "__main__":
    main()
