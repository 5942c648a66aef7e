"""The training flow: each DVC stage of the pipeline as one Prefect task.

The flow only orchestrates. Every stage runs in its own process through
``dvc repro --single-item`` (so DVC decides what is up to date and DDP never
starts inside this process); a failed stage is retried only when the failure
was transient, not when the data or params are wrong. The flow ends with a
Prefect artifact holding the metrics table and the gate decision.

    python -m flows.training              # ephemeral Prefect, no server needed
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Failed

from components.config import load_params
from components.errors import TumorScopeError
from components.settings import apply_runtime_env
from components.stage import ERROR_MARK

STAGES = ("synth", "feedback", "ingest", "validate", "split", "features", "classical", "pretrain_set", "pretrain", "train", "calibrate", "train_volumes",
          "evaluate", "register", "package")  # fmt: skip
SKIPPED_MARK = "didn't change, skipping"
BUSY = "another pipeline run is using"  # how a run refused by the workspace lock fails


def stage_env(workdir: Path) -> dict[str, str]:
    """The stage processes' environment: this venv first on PATH, offline settings, tool homes."""
    env = {**os.environ, **apply_runtime_env(workdir)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@task(retries=2, retry_delay_seconds=5, task_run_name="{stage}")
def run_stage(stage: str, workdir: str, force: bool = False) -> dict:
    """``dvc repro`` one stage, streaming its output; returns its status and how long it took.

    A stage that reports a problem with the data or params (exit code 2 and a
    ``tumorscope: error:`` line) comes back as status ``failed`` with that message,
    since retrying cannot fix it; any other crash raises, and Prefect retries it.
    """
    command = [sys.executable, "-m", "dvc", "repro", "--single-item", stage, *(["--force"] if force else [])]
    started = time.perf_counter()
    code, lines = stream(command, workdir, stage)
    outcome = {"stage": stage, "seconds": round(time.perf_counter() - started, 1)}
    errors = stage_error(lines)
    if code != 0 and errors:
        return {**outcome, "status": "failed", "error": errors}
    if code != 0:
        raise RuntimeError(f"stage '{stage}' crashed (exit {code}):\n" + "\n".join(lines[-15:]))
    return {**outcome, "status": "up to date" if any(SKIPPED_MARK in line for line in lines) else "ran"}


def stream(command: list[str], workdir: str, prefix: str) -> tuple[int, list[str]]:
    """Run a command in the workspace's stage environment, echoing its output line by line into the flow log."""
    process = subprocess.Popen(
        command, cwd=workdir, env=stage_env(Path(workdir)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    for line in process.stdout:
        lines.append(line.rstrip())
        print(f"[{prefix}] {line.rstrip()}", flush=True)
    return process.wait(), lines


def stage_error(lines: list[str]) -> str:
    """The stage's own error message: the marked line and its indented detail lines."""
    for index, line in enumerate(lines):
        if ERROR_MARK in line:
            details = [d.strip() for d in lines[index + 1 :] if d.startswith((" ", "\t")) and d.strip()]
            return "\n".join([line.split(ERROR_MARK, 1)[1].strip(), *details])
    return ""


def pipeline_stages(workdir: Path) -> list[str]:
    """All stages, minus the synthetic cohort when the data comes from elsewhere."""
    params = load_params(workdir / "params.yaml")
    uses_synth = params.ingest.source == params.synth.out
    return [stage for stage in STAGES if uses_synth or stage != "synth"]


def read_summary(workdir: Path) -> dict:
    """What the run produced: metrics, gate decision, packaged bento."""
    reports = workdir / "reports"
    summary = {}
    for name in ("metrics", "gate", "package"):
        path = reports / f"{name}.json"
        summary[name] = json.loads(path.read_text()) if path.exists() else None
    return summary


def _publish_artifacts(summary: dict, stages: list[dict]) -> None:
    metrics = summary["metrics"] or {}
    create_table_artifact(
        key="training-metrics",
        table=[{"metric": name, "value": round(value, 4)} for name, value in metrics.items()],
        description="Test-split metrics of the candidate model",
    )
    gate = summary["gate"] or {}
    verdict = "**promoted to champion**" if gate.get("promoted") else "**refused**: champion unchanged"
    lines = [f"# Gate: {gate.get('model_name', '?')} version {gate.get('candidate_version', '?')} {verdict}", ""]
    lines += [f"- {reason}" for reason in gate.get("reasons", [])]
    lines += ["", "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {s['stage']} | {s['status']} | {s['seconds']} |" for s in stages]
    create_markdown_artifact(key="gate-decision", markdown="\n".join(lines), description="Gate decision and stage timings")


@contextmanager
def workspace_lock(root: Path) -> Iterator[str]:
    """One pipeline run per workspace: yields '' while this run holds the lock, else who holds it. A scheduled
    retrain meeting a manual run would otherwise fail in DVC's own lock, stage by stage, each with a traceback.
    The lock is the kernel's (flock): it ends with its process, so a killed run leaves none behind."""
    path = root / ".tumorscope" / "run.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            yield handle.read().strip() or "a process holding .tumorscope/run.lock"
            return
        handle.truncate(0)
        handle.write(f"PID {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
        try:
            yield ""
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@task(retries=2, retry_delay_seconds=10, task_run_name="dvc-push-{remote}")
def push_data(workdir: str, remote: str) -> str:
    """Send this run's data versions and outputs to a shared DVC remote, so other machines can pull them."""
    command = [sys.executable, "-m", "dvc", "push", "-r", remote]
    result = subprocess.run(command, cwd=workdir, env=stage_env(Path(workdir)), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"dvc push -r {remote} failed:\n{result.stdout[-1500:]}{result.stderr[-1500:]}")
    print(result.stdout.strip().splitlines()[-1] if result.stdout.strip() else f"pushed to {remote}")
    return remote


@flow(name="training", log_prints=True)
def training(workdir: str = ".", force_from: str | None = None, push_to: str | None = None) -> dict:
    """Run the pipeline; ``force_from`` reruns that stage and every later one even if DVC thinks them current;
    ``push_to`` names a DVC remote that receives the data and outputs afterwards (scheduled runs use it).

    A stage's data or params problem ends the flow in a Failed state whose message
    is that problem (no traceback); later stages do not run.
    """
    root = Path(workdir).resolve()
    try:
        stages = pipeline_stages(root)
    except TumorScopeError as exc:
        return Failed(message=str(exc))
    if force_from is not None and force_from not in stages:
        return Failed(message=f"force_from: unknown stage '{force_from}' (stages: {', '.join(stages)})")
    forced = stages[stages.index(force_from) :] if force_from else []
    with workspace_lock(root) as holder:
        if holder:
            return Failed(message=f"{BUSY} {root} ({holder}): wait for it to end, or stop it")
        results = []
        for stage in stages:
            results.append(run_stage(stage, str(root), force=stage in forced))
            if results[-1]["status"] == "failed":
                return Failed(message=f"stage '{stage}' failed: {results[-1]['error']}")
    summary = {**read_summary(root), "stages": results}
    if push_to:
        summary["pushed_to"] = push_data(str(root), push_to)
    _publish_artifacts(summary, results)
    return summary


if __name__ == "__main__":
    training()
