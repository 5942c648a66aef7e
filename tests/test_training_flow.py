"""The training flow's own logic (its stages run in tests/test_e2e.py)."""

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import PROJECT

HOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from flows.training import workspace_lock
    with workspace_lock(Path(sys.argv[1])) as holder:
        print(repr(holder), flush=True)
        time.sleep(120)
    """
)


def _held(workspace: Path) -> subprocess.Popen:
    """Another process holding the workspace's run lock, as a running pipeline does."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(workspace)], cwd=PROJECT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "''", "the first holder gets the lock"
    return holder


def test_a_second_run_in_a_workspace_is_refused_in_one_line_and_the_lock_ends_with_its_holder(tmp_path: Path):
    from flows.training import workspace_lock

    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(PROJECT / name, tmp_path / name)
    holder = _held(tmp_path)
    try:
        with workspace_lock(tmp_path) as seen:
            assert seen.startswith(f"PID {holder.pid}, started ")
        run = subprocess.run(
            [sys.executable, "-m", "components.cli", "run", "-C", str(tmp_path)], capture_output=True, text=True, cwd=PROJECT
        )
        assert run.returncode == 2 and f"another pipeline run is using {tmp_path} (PID {holder.pid}" in run.stderr, run.stderr
        assert "Traceback" not in run.stdout + run.stderr and not (tmp_path / "data").exists(), "no stage ran"
    finally:
        holder.kill()
        holder.wait()
    with workspace_lock(tmp_path) as seen:
        assert seen == "", "a killed holder leaves no lock behind"
