"""The MLflow model registry as the stages use it: who holds an alias, and that version as a Classifier.

A registered version is rebuilt from its own run's ``tumorscope/model.json`` (the spec) and
MLflow PyTorch model, so a champion trained by older code loads exactly as it was trained.
"""

from __future__ import annotations

from components.model import Classifier, ModelSpec
from components.settings import get_settings

CHAMPION, CHALLENGER = "champion", "challenger"


def client():
    import mlflow

    mlflow.set_tracking_uri(get_settings().tracking_uri)
    return mlflow.MlflowClient()


def version_by_alias(registry, name: str, alias: str):
    """The model version holding ``alias``, or None when there is none (or no such model)."""
    from mlflow.exceptions import MlflowException

    try:
        return registry.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def load_version(version) -> Classifier:
    import mlflow
    from mlflow.exceptions import MlflowException

    from components.model import EmbeddingProjection

    spec = ModelSpec.model_validate(mlflow.artifacts.load_dict(f"runs:/{version.run_id}/tumorscope/model.json"))
    net = mlflow.pytorch.load_model(f"models:/{version.name}/{version.version}", map_location="cpu")
    try:
        projection = EmbeddingProjection.model_validate(mlflow.artifacts.load_dict(f"runs:/{version.run_id}/tumorscope/embedding.json"))
    except (MlflowException, OSError):
        projection = None  # versions trained before the embedding summary existed
    return Classifier(spec, net, projection)
