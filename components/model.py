"""The network and the inference wrapper that every consumer shares.

A model travels as ``model.pt`` (weights) plus ``model.json`` (its spec: network,
input size, classes), so the endpoint, batch prediction and the gate rebuild the
exact network without unpickling code.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from components.config import NO_TUMOUR
from components.errors import TumorScopeError
from components.imaging import prepare

WEIGHTS_FILE, SPEC_FILE, EMBEDDING_FILE = "model.pt", "model.json", "embedding.json"
EMBEDDING_COMPONENTS = 5
EMBEDDING_COLUMNS = [f"emb_{i}" for i in range(EMBEDDING_COMPONENTS)]
# MONAI's ResNet applies ``norm`` to its stem only (its residual blocks keep batch norm). A group-norm
# stem alone removed the epoch-to-epoch swings of validation accuracy that a batch-norm stem showed
# here under augmentation (0.52-0.87 → steady 0.97 on the synthetic cohort, same speed).
NORMS = {"batch": "batch", "instance": "instance", "group": ("group", {"num_groups": 4})}


class ModelSpec(BaseModel):
    network: str
    image_size: int
    channels: list[int]
    blocks: list[int]
    classes: list[str]
    in_channels: int = 1
    norm: str = "batch"  # models saved before this field existed used batch norm

    @property
    def tumour_free_index(self) -> int:
        return self.classes.index(NO_TUMOUR)


def build_network(spec: ModelSpec):
    """A MONAI 2D classifier trained from scratch (no pretrained weights can be downloaded here)."""
    from monai.networks.nets import DenseNet121, ResNet

    if spec.network == "densenet121":
        return DenseNet121(spatial_dims=2, in_channels=spec.in_channels, out_channels=len(spec.classes))
    return ResNet(
        block="basic",
        layers=spec.blocks,
        block_inplanes=spec.channels,
        spatial_dims=2,
        n_input_channels=spec.in_channels,
        num_classes=len(spec.classes),
        conv1_t_size=5,
        conv1_t_stride=2,
        norm=NORMS[spec.norm],
    )


def tumour_probability(probabilities: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """P(any tumour) = 1 − P(no tumour): the score behind sensitivity, specificity and AUC."""
    return 1.0 - probabilities[:, spec.tumour_free_index]


class EmbeddingProjection(BaseModel):
    """PCA of the network's penultimate features, fitted on validation images at training time:
    a few numbers per served image that show when inputs move away from what the model knows."""

    mean: list[float]
    components: list[list[float]]

    @classmethod
    def fit(cls, features: np.ndarray, n_components: int = EMBEDDING_COMPONENTS) -> EmbeddingProjection:
        from sklearn.decomposition import PCA

        pca = PCA(n_components=min(n_components, *features.shape)).fit(features)
        components = np.zeros((n_components, features.shape[1]))
        components[: len(pca.components_)] = pca.components_
        return cls(mean=pca.mean_.tolist(), components=components.tolist())

    def project(self, features: np.ndarray) -> np.ndarray:
        return (features - np.asarray(self.mean)) @ np.asarray(self.components).T


def _last_linear(net):
    import torch

    return [module for module in net.modules() if isinstance(module, torch.nn.Linear)][-1]


class Classifier:
    """A trained network in eval mode that maps raw [0, 1] slices to class probabilities
    (and, with a projection, to a small embedding summary for monitoring)."""

    def __init__(self, spec: ModelSpec, net, projection: EmbeddingProjection | None = None) -> None:
        import torch

        self.spec = spec
        self.net = net.eval().to(memory_format=torch.channels_last)
        self.projection = projection

    @classmethod
    def from_weights(cls, spec: ModelSpec, state_dict: dict) -> Classifier:
        net = build_network(spec)
        net.load_state_dict(state_dict)
        return cls(spec, net)

    @classmethod
    def load(cls, folder: Path) -> Classifier:
        import torch

        if not (folder / SPEC_FILE).exists():
            raise TumorScopeError(f"{folder}: no trained model here ({SPEC_FILE} missing)")
        spec = ModelSpec.model_validate_json((folder / SPEC_FILE).read_text())
        classifier = cls.from_weights(spec, torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True))
        if (folder / EMBEDDING_FILE).exists():
            classifier.projection = EmbeddingProjection.model_validate_json((folder / EMBEDDING_FILE).read_text())
        return classifier

    def save(self, folder: Path, extra: dict | None = None) -> None:
        import torch

        folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.net.state_dict(), folder / WEIGHTS_FILE)
        (folder / SPEC_FILE).write_text(json.dumps({**self.spec.model_dump(), **(extra or {})}, indent=2))
        if self.projection is not None:
            (folder / EMBEDDING_FILE).write_text(self.projection.model_dump_json())

    def batch(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Model input (N, 1, S, S) from raw slices, prepared as in training."""
        return np.stack([prepare(image, self.spec.image_size) for image in images])[:, None]

    def predict_proba(self, images: Sequence[np.ndarray], batch_size: int = 64) -> np.ndarray:
        return self.predict(images, batch_size)[0]

    def predict(self, images: Sequence[np.ndarray], batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """Class probabilities and the penultimate features (the last linear layer's input), in one pass."""
        if not len(images):
            return np.zeros((0, len(self.spec.classes)), dtype=np.float32), np.zeros((0, 0), dtype=np.float32)
        parts = [self.predict_prepared(self.batch(images[start : start + batch_size])) for start in range(0, len(images), batch_size)]
        return np.concatenate([p for p, _ in parts]), np.concatenate([f for _, f in parts])

    def predict_prepared(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities and penultimate features of model input that is already prepared, (N, 1, S, S)."""
        import torch

        features = []
        hook = _last_linear(self.net).register_forward_hook(lambda _, inputs, __: features.append(inputs[0].detach().numpy()))
        try:
            with torch.inference_mode():
                x = torch.from_numpy(np.ascontiguousarray(batch)).contiguous(memory_format=torch.channels_last)
                probabilities = torch.softmax(self.net(x), dim=1).numpy()
        finally:
            hook.remove()
        return probabilities, features[0]

    def embeddings(self, features: np.ndarray) -> np.ndarray:
        """The monitoring summary of penultimate features; NaN when the model has no projection (older models)."""
        if self.projection is None:
            return np.full((len(features), EMBEDDING_COMPONENTS), np.nan)
        return self.projection.project(features)
