"""Register the training and monitoring flows as deployments of a Prefect work pool, with their schedules.

A worker on that pool (``prefect worker start --pool tumorscope``) runs them in ``--workdir``; the stack
script (``infra/local/stack.py up``) does this for server mode. Needs ``PREFECT_API_URL`` (a server).

    python -m flows.deploy --workdir . --pool tumorscope
"""

from __future__ import annotations

import argparse
from pathlib import Path

TRAINING_CRON = "0 2 * * 0"  # weekly retraining on the newest data version, Sunday 02:00
MONITORING_CRON = "0 * * * *"  # hourly drift check


def deploy(workdir: Path, pool: str, paused: bool = False, push_to: str | None = "stack") -> list[str]:
    """Both deployments, from the flows' source in ``workdir``; returns their names. ``push_to`` is the DVC
    remote a scheduled training run pushes its data versions to."""
    from prefect import flow

    source = str(workdir.resolve())
    common = {"work_pool_name": pool, "paused": paused, "tags": ["tumorscope"], "print_next_steps": False}
    training = flow.from_source(source=source, entrypoint="flows/training.py:training")
    training.deploy(name="scheduled", cron=TRAINING_CRON, parameters={"workdir": source, "push_to": push_to}, **common)
    monitoring = flow.from_source(source=source, entrypoint="flows/monitoring.py:monitoring")
    monitoring.deploy(name="scheduled", cron=MONITORING_CRON, parameters={"workdir": source}, **common)
    return ["training/scheduled", "monitoring/scheduled"]


def main() -> None:
    parser = argparse.ArgumentParser(description="Deploy the training and monitoring flows to a work pool.")
    parser.add_argument("--workdir", type=Path, default=Path("."))
    parser.add_argument("--pool", default="tumorscope")
    parser.add_argument("--paused", action="store_true", help="register the schedules paused (runs only on demand)")
    parser.add_argument("--push-to", default="stack", help="DVC remote for the training runs' data ('' for none)")
    args = parser.parse_args()
    for name in deploy(args.workdir, args.pool, args.paused, args.push_to or None):
        print(f"deployed {name} to pool {args.pool}")


if __name__ == "__main__":
    main()
