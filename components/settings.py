"""Where things live and which services are used: environment, not params.yaml.

params.yaml says *what* the pipeline computes (and is versioned by DVC); these
settings say *where* it runs (paths, tracking server, secrets), so the same
pipeline moves from a laptop to a cluster by environment alone.
"""

from __future__ import annotations

import os
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

# Every tool in the stack phones home by default; this platform handles patient
# data on closed networks, so telemetry is off unless a user turns it back on.
OFFLINE_ENV = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "BENTOML_DO_NOT_TRACK": "true",
    "HF_HUB_OFFLINE": "1",
    "GIT_PYTHON_REFRESH": "quiet",
    "TQDM_DISABLE": "1",
}


class Settings(BaseSettings):
    """Runtime locations and services; every field can be set as TUMORSCOPE_<NAME>."""

    model_config = SettingsConfigDict(env_prefix="TUMORSCOPE_", extra="ignore")

    root: Path = Field(default_factory=Path.cwd, description="Workspace holding dvc.yaml and params.yaml.")
    mlflow_tracking_uri: str | None = Field(None, description="Defaults to a SQLite store in the workspace.")
    pseudonym_key: str | None = Field(None, description="Secret for subject pseudonyms; never commit it.")
    prediction_log: Path | None = Field(None, description="SQLite file of served predictions.")
    keep_images: bool = Field(True, description="Keep served slices (re-encoded, no metadata) so feedback can become training data.")
    image_store: Path | None = Field(None, description="Folder of kept slices; defaults to 'served/' beside the prediction log.")
    serve_registered_model: str | None = Field(
        None, description="Serve this registered model's champion from the MLflow registry instead of the model packaged in the bento."
    )
    api_keys: Path | None = Field(None, description="The endpoint's hashed API keys (JSON); defaults to .tumorscope/api_keys.json.")
    auth: Literal["auto", "required"] = Field(
        "auto", description="'auto': keys are checked once one exists; 'required': refuse every guarded call without a valid key."
    )
    cors_origins: list[str] = Field(default_factory=list, description="Origins allowed to call the endpoint from a browser.")
    rdzv_endpoint: str | None = Field(None, description="host:port of node 0 for multi-node training (torchrun c10d rendezvous).")
    rdzv_id: str = Field("tumorscope-train", description="Rendezvous id shared by the nodes of one training job.")

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{(self.root / 'mlflow.db').resolve()}"

    @property
    def artifact_root(self) -> str:
        return (self.root / "mlartifacts").resolve().as_uri()

    @property
    def prediction_log_path(self) -> Path:
        return self.prediction_log or self.root / "data" / "predictions.sqlite"

    @property
    def image_store_path(self) -> Path:
        return self.image_store or self.prediction_log_path.parent / "served"

    @property
    def api_keys_path(self) -> Path:
        return self.api_keys or self.state_dir / "api_keys.json"

    @property
    def state_dir(self) -> Path:
        return self.root / ".tumorscope"

    def secret_key(self) -> bytes:
        """The pseudonym key: from the environment, else a local key made once and git-ignored."""
        if self.pseudonym_key:
            return self.pseudonym_key.encode()
        key_file = self.state_dir / "pseudonym.key"
        if not key_file.exists():
            key_file.parent.mkdir(parents=True, exist_ok=True)
            key_file.write_text(secrets.token_hex(32))
            key_file.chmod(0o600)
        return key_file.read_text().strip().encode()


def use_experiment(name: str) -> None:
    """Point MLflow at the tracking store and experiment ``name``, creating it with this workspace's artifact
    folder when the store is the embedded SQLite file (else MLflow would write artifacts to ./mlruns)."""
    import mlflow

    settings = get_settings()
    mlflow.set_tracking_uri(settings.tracking_uri)
    if mlflow.get_experiment_by_name(name) is None and settings.tracking_uri.startswith("sqlite"):
        mlflow.create_experiment(name, artifact_location=settings.artifact_root)
    mlflow.set_experiment(name)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def apply_runtime_env(root: Path | None = None) -> dict[str, str]:
    """Set the offline/telemetry variables and the tools' homes, unless the user set them.

    Returns the variables, so that subprocesses (DVC stages, bentoml serve) get the same.
    """
    root = (root or get_settings().root).resolve()
    defaults = {
        **OFFLINE_ENV,
        "PREFECT_HOME": str(root / ".prefect"),
        # Prefect's own 20 s for its ephemeral server timed out on 2 cores busy with a training job
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "BENTOML_HOME": str(root / ".bentoml"),
        "MLFLOW_TRACKING_URI": Settings(root=root).tracking_uri,
    }
    for name, value in defaults.items():
        os.environ.setdefault(name, value)
    return {name: os.environ[name] for name in defaults}
