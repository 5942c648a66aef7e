"""infra/ checked statically (no Docker engine or cluster runs here): Kubernetes manifests against the API
schemas, the compose stack's wiring, the launch scripts' syntax, and no secret in any of them."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

INFRA = Path(__file__).resolve().parents[1] / "infra"
KUBERNETES_VERSION = "1.30.0"
MANIFESTS = sorted((INFRA / "k8s").glob("*.yaml"))


def _documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_kubernetes_manifest_validates_against_the_api_schema(path: Path):
    import kubernetes_validate

    for document in _documents(path):
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_manifests_cover_worker_training_job_serving_with_autoscaling_and_config():
    kinds = {(d["kind"], d["metadata"]["name"]) for path in MANIFESTS for d in _documents(path)}
    assert {("Deployment", "prefect-worker"), ("Job", "tumorscope-train"), ("Deployment", "tumorscope-bento")} <= kinds
    assert {("HorizontalPodAutoscaler", "tumorscope-bento"), ("ConfigMap", "tumorscope"), ("Deployment", "mlflow")} <= kinds
    assert not any(kind == "Secret" for kind, _ in kinds), "secrets are created outside git"
    job = next(d for path in MANIFESTS for d in _documents(path) if d["kind"] == "Job")
    command = " ".join(job["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "torchrun --nnodes 2" in command and "--node-rank $(JOB_COMPLETION_INDEX)" in command
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2


def test_compose_stack_is_wired_and_healthy_and_takes_secrets_from_the_environment():
    compose = yaml.safe_load((INFRA / "compose" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "minio", "mlflow", "prefect-server", "prefect-worker", "bento"} <= set(services)
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on an unknown service {dependency}"
        if service.get("restart") != "no" and name != "prefect-worker":
            assert "healthcheck" in service, f"{name} has no health check"
    text = (INFRA / "compose" / "docker-compose.yml").read_text()
    variables = set(re.findall(r"(?<!\$)\$\{(\w+)\}", text))
    defined = {
        line.split("=")[0]
        for line in (INFRA / "compose" / ".env.example").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    }
    assert variables and variables <= defined, f"undefined in .env.example: {variables - defined}"
    assert not re.search(r"(PASSWORD|SECRET|KEY)\w*:\s*[\"']?(?!\$\{)\w", text), "a literal secret in the compose file"


def test_launch_scripts_parse_and_use_torchrun():
    sbatch = INFRA / "slurm" / "train.sbatch"
    assert subprocess.run(["bash", "-n", str(sbatch)], capture_output=True).returncode == 0
    assert "srun" in sbatch.read_text() and "torchrun" in sbatch.read_text()
    dockerfile = (INFRA / "docker" / "Dockerfile.train").read_text()
    assert dockerfile.splitlines()[0].startswith("#") and "FROM ${BASE}" in dockerfile and "torch==2.13.0" in dockerfile
    assert not re.search(r"ENV .*(PASSWORD|SECRET|ACCESS_KEY)", dockerfile)


def test_serving_images_cpu_and_cuda_are_valid_bento_build_configs():
    from bentoml._internal.bento.build_config import BentoBuildConfig

    serving = INFRA.parent / "serving"
    with open(serving / "bentofile.yaml") as cpu_file, open(serving / "bentofile.cuda.yaml") as cuda_file:
        cpu, cuda = BentoBuildConfig.from_yaml(cpu_file), BentoBuildConfig.from_yaml(cuda_file)
    assert cpu.service == cuda.service == "serving.service:TumorScope"
    assert cpu.docker.cuda_version is None and cuda.docker.cuda_version.startswith("12.")
    assert any("cu12" in url for url in cuda.python.extra_index_url) and cpu.python.extra_index_url is None
