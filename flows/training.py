"""The training flow: each DVC stage of the pipeline as one Prefect task.

The flow only orchestrates. Every stage runs in its own process through
``dvc repro --single-item`` (so DVC decides what is up to date and DDP never
starts inside this process); a failed stage is retried only when the failure
was transient, not when the data or params are wrong. The flow ends with a
Prefect artifact holding the metrics table and the gate decision.

    python -m flows.training              # ephemeral Prefect, no server needed
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from components.errors import TumorScopeError
from components.settings import apply_runtime_env
from components.stage import ERROR_MARK, EXIT_DATA_ERROR

STAGES = ("synth", "ingest", "validate", "split", "train", "evaluate", "register", "package")
SKIPPED_MARK = "didn't change, skipping"


class StageFailed(TumorScopeError):
    def __init__(self, stage: str, detail: str, transient: bool) -> None:
        self.stage, self.transient = stage, transient
        super().__init__(f"stage '{stage}' failed: {detail}")


def stage_env(workdir: Path) -> dict[str, str]:
    """The stage processes' environment: this venv first on PATH, offline settings, tool homes."""
    env = {**os.environ, **apply_runtime_env(workdir)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _only_if_transient(task, task_run, state) -> bool:
    try:
        state.result()
    except StageFailed as exc:
        return exc.transient
    except Exception:
        return True
    return False


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=_only_if_transient, task_run_name="{stage}")
def run_stage(stage: str, workdir: str, force: bool = False) -> dict:
    """``dvc repro`` one stage, streaming its output; returns whether it ran and how long it took."""
    command = [sys.executable, "-m", "dvc", "repro", "--single-item", stage, *(["--force"] if force else [])]
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=workdir, env=stage_env(Path(workdir)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    for line in process.stdout:
        lines.append(line.rstrip())
        print(f"[{stage}] {line.rstrip()}", flush=True)
    if process.wait() != 0:
        errors = [line.split(ERROR_MARK, 1)[1].strip() for line in lines if ERROR_MARK in line]
        detail = "\n".join(errors) or "\n".join(lines[-15:])
        raise StageFailed(stage, detail, transient=not errors and process.returncode != EXIT_DATA_ERROR)
    ran = not any(SKIPPED_MARK in line for line in lines)
    return {"stage": stage, "status": "ran" if ran else "up to date", "seconds": round(time.perf_counter() - started, 1)}


def pipeline_stages(workdir: Path) -> list[str]:
    """All stages, minus the synthetic cohort when the data comes from elsewhere."""
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    uses_synth = Path(params["ingest"]["source"]) == Path(params["synth"]["out"])
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


@flow(name="training", log_prints=True)
def training(workdir: str = ".", force_from: str | None = None) -> dict:
    """Run the pipeline; ``force_from`` reruns that stage and every later one even if DVC thinks them current."""
    root = Path(workdir).resolve()
    stages = pipeline_stages(root)
    if force_from is not None and force_from not in stages:
        raise TumorScopeError(f"force_from: unknown stage '{force_from}' (stages: {', '.join(stages)})")
    forced = stages[stages.index(force_from) :] if force_from else []
    results = [run_stage(stage, str(root), force=stage in forced) for stage in stages]
    summary = {**read_summary(root), "stages": results}
    _publish_artifacts(summary, results)
    return summary


if __name__ == "__main__":
    training()
