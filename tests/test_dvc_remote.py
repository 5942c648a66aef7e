"""Data versioning against real remotes: the project's default local folder and an S3-compatible
server (moto's server mode on 127.0.0.1, started here): push, lose the cache, pull back."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_workspace, workspace_env

pytestmark = pytest.mark.slow
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def dvc(root: Path, *args: str, env: dict | None = None) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env or workspace_env(root), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture
def tracked(tmp_path: Path) -> tuple[Path, Path]:
    root = make_workspace(tmp_path / "ws")
    data = root / "datasets" / "raw"
    data.mkdir(parents=True)
    for i in range(3):
        (data / f"slice{i}.bin").write_bytes(os.urandom(2048))
    dvc(root, "add", "datasets/raw")
    return root, data


def _round_trip(root: Path, data: Path, remote: str, env: dict | None = None) -> None:
    original = {p.name: p.read_bytes() for p in data.iterdir()}
    dvc(root, "push", "-r", remote, "datasets/raw.dvc", env=env)
    shutil.rmtree(data)
    shutil.rmtree(root / ".dvc" / "cache")
    dvc(root, "pull", "-r", remote, "datasets/raw.dvc", env=env)
    assert {p.name: p.read_bytes() for p in data.iterdir()} == original


def test_default_local_remote_push_and_pull(tracked):
    root, data = tracked
    _round_trip(root, data, "local")
    assert any((root / ".dvc-remote").rglob("*"))


@pytest.fixture
def s3_endpoint():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(60):
        try:
            httpx.get(url, timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.5)
    yield url
    server.terminate()
    server.wait(timeout=10)


def test_s3_compatible_remote_push_and_pull(tracked, s3_endpoint: str):
    import boto3

    root, data = tracked
    boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        **{k.lower(): v for k, v in S3_CREDENTIALS.items() if k != "AWS_DEFAULT_REGION"},
        region_name="us-east-1",
    ).create_bucket(Bucket="tumorscope")
    env = workspace_env(root) | S3_CREDENTIALS
    dvc(root, "remote", "add", "s3", "s3://tumorscope/dvc", env=env)
    dvc(root, "remote", "modify", "s3", "endpointurl", s3_endpoint, env=env)
    _round_trip(root, data, "s3", env=env)
