"""Server mode on one machine: the services a team runs, started on 127.0.0.1 from this venv.

    python infra/local/stack.py up        # PostgreSQL, S3 (moto), MLflow server, Prefect server + worker
    set -a; . .tumorscope/stack/client.env; set +a   # then every tumorscope/dvc/prefect command uses them
    python infra/local/stack.py down      # stop them (data kept; --purge removes it)

PostgreSQL (Debian's package) is the backend store of both servers; moto's S3 server holds MLflow's artifacts
(proxied by the MLflow server, so clients need no S3 credentials) and the DVC remote. Passwords and keys are
made once into ``secrets.env`` (mode 600, under the git-ignored state folder) and reach the servers through
their environment only, never a command line. The same pipeline then runs with no code change: only the
environment in ``client.env`` differs. ``infra/compose`` is the container version of this stack.

``TUMORSCOPE_SCHEDULES=paused`` registers the deployments' schedules paused. Where things are: ``TUMORSCOPE_STACK_DIR`` (default ``.tumorscope/stack``), ports from
``TUMORSCOPE_STACK_PORT_BASE`` (PostgreSQL base, S3 +1, MLflow +2, Prefect +3; default 15430).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
POOL = "tumorscope"
BUCKETS = ("tumorscope-mlflow", "tumorscope-dvc")
DATABASES = ("mlflow", "prefect")
DB_USER = "tumorscope"
SERVICES = ("postgres", "s3", "mlflow", "prefect", "worker")
OFFLINE = {"DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1"}


class StackError(Exception):
    """A service did not come up; the message says which and where its log is."""


def state_dir() -> Path:
    return Path(os.environ.get("TUMORSCOPE_STACK_DIR", ROOT / ".tumorscope" / "stack")).resolve()


def ports() -> dict[str, int]:
    base = int(os.environ.get("TUMORSCOPE_STACK_PORT_BASE", "15430"))
    return {"postgres": base, "s3": base + 1, "mlflow": base + 2, "prefect": base + 3}


def read_env_file(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines() if path.exists() else []
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


def write_private(path: Path, values: dict[str, str], header: str) -> None:
    """Write an env file readable by its owner only (it holds credentials)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(f"# {header}\n" + "".join(f"{name}={value}\n" for name, value in values.items()))


def stack_secrets(state: Path) -> dict[str, str]:
    """The database password and the object store's keys: made once, then reused."""
    path = state / "secrets.env"
    values = read_env_file(path)
    if not values:
        values = {
            "POSTGRES_PASSWORD": secrets.token_urlsafe(24),
            "AWS_ACCESS_KEY_ID": "tumorscope" + secrets.token_hex(6),
            "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30),
        }
        write_private(path, values, "made by infra/local/stack.py; never commit, never log")
    return values


def database_url(name: str, password: str, driver: str = "postgresql") -> str:
    return f"{driver}://{DB_USER}:{password}@127.0.0.1:{ports()['postgres']}/{name}"


def client_env(secret: dict[str, str]) -> dict[str, str]:
    """What a client of the stack needs: where the servers are, and S3 keys for DVC pushes."""
    port = ports()
    return {
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port['mlflow']}",
        "TUMORSCOPE_MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port['mlflow']}",
        "PREFECT_API_URL": f"http://127.0.0.1:{port['prefect']}/api",
        "AWS_ACCESS_KEY_ID": secret["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": secret["AWS_SECRET_ACCESS_KEY"],
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port['s3']}",
        "TUMORSCOPE_DVC_REMOTE": f"s3://{BUCKETS[1]}/store",
    }


# --- processes -------------------------------------------------------------------------------------------


def start(state: Path, name: str, command: list[str], env: dict[str, str]) -> None:
    """Start a service in its own process group, its output in logs/<name>.log, its pid in pids/<name>.pid."""
    (state / "logs").mkdir(parents=True, exist_ok=True)
    (state / "pids").mkdir(parents=True, exist_ok=True)
    with open(state / "logs" / f"{name}.log", "ab") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    (state / "pids" / f"{name}.pid").write_text(str(process.pid))


def running(state: Path, name: str) -> bool:
    pid_file = state / "pids" / f"{name}.pid"
    if not pid_file.exists():
        return False
    try:
        os.kill(int(pid_file.read_text()), 0)
    except (ProcessLookupError, ValueError):
        return False
    return True


def stop(state: Path, name: str, timeout: float = 20) -> None:
    pid_file = state / "pids" / f"{name}.pid"
    if not running(state, name):
        pid_file.unlink(missing_ok=True)
        return
    group = int(pid_file.read_text())
    os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and running(state, name):
        time.sleep(0.2)
    if running(state, name):
        os.killpg(group, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)


def wait_http(url: str, name: str, state: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if not running(state, name):
            break
        time.sleep(0.5)
    raise StackError(f"{name} did not answer {url}; see {state / 'logs' / f'{name}.log'}")


# --- PostgreSQL ------------------------------------------------------------------------------------------


def postgres_binary(name: str) -> str:
    found = shutil.which(name) or next((str(p) for p in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))), None)
    if not found:
        raise StackError(f"PostgreSQL's {name} not found: install Debian's postgresql package (apt-get install postgresql)")
    return found


def as_postgres_user(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its programs as the 'postgres' system user."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def postgres_data_dir(state: Path) -> Path:
    """The cluster's folder. As root it lies outside the state folder, whose parents 'postgres' may not enter."""
    if os.geteuid() != 0:
        return state / "pgdata"
    import hashlib

    return Path("/tmp") / f"tumorscope-pg-{hashlib.sha256(str(state).encode()).hexdigest()[:12]}"


def start_postgres(state: Path, password: str) -> None:
    data = postgres_data_dir(state)
    log = data / "postgres.log"  # inside the cluster's folder: the one place the server's user surely may write
    if not (data / "PG_VERSION").exists():
        data.mkdir(mode=0o700, parents=True, exist_ok=True)
        password_file = data.parent / f".{data.name}.pw"
        password_file.write_text(password)
        if os.geteuid() == 0:
            shutil.chown(data, "postgres", "postgres")
            shutil.chown(password_file, "postgres", "postgres")
        password_file.chmod(0o600)
        try:
            init = [postgres_binary("initdb"), "-D", str(data), "-U", DB_USER, "--pwfile", str(password_file), "-A", "scram-sha-256"]
            subprocess.run(as_postgres_user(init), check=True, capture_output=True)
        finally:
            password_file.unlink(missing_ok=True)
    options = f"-c listen_addresses=127.0.0.1 -p {ports()['postgres']} -c unix_socket_directories=''"
    command = [postgres_binary("pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start"]
    result = subprocess.run(as_postgres_user(command), capture_output=True, text=True)
    if result.returncode != 0 and "another server might be running" not in result.stdout + result.stderr:
        raise StackError(f"PostgreSQL did not start: {result.stderr.strip() or result.stdout.strip()}; see {log}")
    create_databases(password)


def create_databases(password: str) -> None:
    import psycopg2

    connection = psycopg2.connect(database_url("postgres", password))
    connection.autocommit = True
    with connection.cursor() as cursor:
        for name in DATABASES:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cursor.fetchone() is None:
                cursor.execute(f'CREATE DATABASE "{name}"')
    connection.close()


def stop_postgres(state: Path) -> None:
    data = postgres_data_dir(state)
    if (data / "postmaster.pid").exists():
        subprocess.run(as_postgres_user([postgres_binary("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]), capture_output=True)


# --- the stack -------------------------------------------------------------------------------------------


def service_env(extra: dict[str, str]) -> dict[str, str]:
    env = {**os.environ, **OFFLINE, **extra}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def start_object_store(state: Path, secret: dict[str, str]) -> None:
    import boto3

    port = ports()["s3"]
    start(state, "s3", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], service_env({}))
    wait_http(f"http://127.0.0.1:{port}/moto-api/", "s3", state)
    s3 = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        aws_access_key_id=secret["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=secret["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )
    existing = {bucket["Name"] for bucket in s3.list_buckets().get("Buckets", [])}
    for bucket in set(BUCKETS) - existing:
        s3.create_bucket(Bucket=bucket)


def start_mlflow(state: Path, secret: dict[str, str]) -> None:
    port = ports()
    env = service_env(
        {
            "MLFLOW_BACKEND_STORE_URI": database_url("mlflow", secret["POSTGRES_PASSWORD"], "postgresql+psycopg2"),
            "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{BUCKETS[0]}/artifacts",
            "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{port['s3']}",
            "AWS_ACCESS_KEY_ID": secret["AWS_ACCESS_KEY_ID"],
            "AWS_SECRET_ACCESS_KEY": secret["AWS_SECRET_ACCESS_KEY"],
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    start(state, "mlflow", [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port["mlflow"]), "--workers", "1"], env)
    wait_http(f"http://127.0.0.1:{port['mlflow']}/health", "mlflow", state)


def start_prefect(state: Path, secret: dict[str, str]) -> None:
    port = ports()["prefect"]
    env = service_env(
        {
            "PREFECT_HOME": str(state / "prefect-server"),
            "PREFECT_API_DATABASE_CONNECTION_URL": database_url("prefect", secret["POSTGRES_PASSWORD"], "postgresql+asyncpg"),
        }
    )
    env.pop("PREFECT_API_URL", None)
    start(state, "prefect", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env)
    wait_http(f"http://127.0.0.1:{port}/api/health", "prefect", state, timeout=180)


def prefect_cli(args: list[str], env: dict[str, str]) -> None:
    result = subprocess.run([str(BIN / "prefect"), *args], env=env, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise StackError(f"prefect {' '.join(args)} failed: {result.stdout[-800:]}{result.stderr[-800:]}")


def start_worker(state: Path, client: dict[str, str], workdir: Path) -> None:
    """The process work pool, the two deployments (from flows/deploy.py) and one worker that runs them."""
    env = service_env({**client, "PREFECT_HOME": str(state / "prefect-client")})
    prefect_cli(["work-pool", "create", POOL, "--type", "process", "--overwrite"], env)
    paused = ["--paused"] if os.environ.get("TUMORSCOPE_SCHEDULES") == "paused" else []
    deploy = subprocess.run([sys.executable, "-m", "flows.deploy", "--workdir", str(workdir), "--pool", POOL, *paused], env=env,
                            cwd=workdir, capture_output=True, text=True)  # fmt: skip
    if deploy.returncode != 0:
        raise StackError(f"deploying the flows failed: {deploy.stdout[-1500:]}{deploy.stderr[-1500:]}")
    start(state, "worker", [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--name", "tumorscope-local"], env)


def configure_dvc_remote(workdir: Path, client: dict[str, str]) -> None:
    """The workspace's DVC remote 'stack' on the object store, in .dvc/config.local (git-ignored): the endpoint
    is machine-specific and the keys stay in the environment."""
    if not (workdir / ".dvc").exists():
        return
    dvc = [sys.executable, "-m", "dvc", "remote"]
    env = service_env({})
    subprocess.run([*dvc, "add", "--local", "--force", "stack", client["TUMORSCOPE_DVC_REMOTE"]], cwd=workdir, env=env, check=True)
    subprocess.run([*dvc, "modify", "--local", "stack", "endpointurl", client["AWS_ENDPOINT_URL_S3"]], cwd=workdir, env=env, check=True)


def up(workdir: Path) -> Path:
    state = state_dir()
    secret = stack_secrets(state)
    client = client_env(secret)
    steps = [
        ("postgres", lambda: start_postgres(state, secret["POSTGRES_PASSWORD"])),
        ("s3", lambda: start_object_store(state, secret)),
        ("mlflow", lambda: start_mlflow(state, secret)),
        ("prefect", lambda: start_prefect(state, secret)),
        ("worker", lambda: start_worker(state, client, workdir)),
    ]
    for name, step in steps:
        if name != "postgres" and running(state, name):
            print(f"{name}: already running")
            continue
        started = time.perf_counter()
        step()
        print(f"{name}: up in {time.perf_counter() - started:.1f} s", flush=True)
    configure_dvc_remote(workdir, client)
    env_file = state / "client.env"
    write_private(env_file, client, "server-mode client settings: set -a; . this-file; set +a")
    return env_file


def down(purge: bool) -> None:
    state = state_dir()
    for name in ("worker", "prefect", "mlflow", "s3"):
        stop(state, name)
    if (state / "pgdata").exists() or postgres_data_dir(state).exists():
        stop_postgres(state)
    if purge:
        shutil.rmtree(postgres_data_dir(state), ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)


def status() -> dict[str, bool]:
    state = state_dir()
    return {
        name: running(state, name) if name != "postgres" else (postgres_data_dir(state) / "postmaster.pid").exists() for name in SERVICES
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    start_parser = commands.add_parser("up", help="start PostgreSQL, S3, MLflow, Prefect server and worker; deploy the flows")
    start_parser.add_argument("--workdir", type=Path, default=ROOT, help="the workspace the deployments run in")
    stop_parser = commands.add_parser("down", help="stop every service")
    stop_parser.add_argument("--purge", action="store_true", help="also delete the database, object store state and secrets")
    commands.add_parser("status", help="which services run")
    args = parser.parse_args()
    try:
        if args.command == "up":
            env_file = up(args.workdir.resolve())
            print(f"stack up; client settings in {env_file}:\n  set -a; . {env_file}; set +a")
        elif args.command == "down":
            down(args.purge)
            print("stack down")
        else:
            for name, is_running in status().items():
                print(f"{name:9s} {'running' if is_running else 'stopped'}")
    except (StackError, subprocess.CalledProcessError) as exc:
        print(f"stack: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
