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
from components.imaging import model_input

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
    in_channels: int = 1  # 3: one MRI sequence per channel (LGG's T1, FLAIR, T1c)
    norm: str = "batch"  # models saved before this field existed used batch norm
    temperature: float = 1.0  # softmax temperature fitted on validation: calibrated confidences
    operating_threshold: float = 0.5  # P(tumour) at or above which the answer is a tumour class
    flip_averaging: bool = False  # logits averaged over the slice and its left-right mirror
    lesion_head: bool = False  # a ResNet that also maps the lesion, trained on masks (components/lesion_net.py)
    lesion_vote: bool = False  # P(tumour) is the mean of the classifier's and the lesion map's strongest cell's
    members: int = 1  # > 1: that many networks of this spec, their probabilities averaged (components/ensemble_net.py)

    @property
    def tumour_free_index(self) -> int:
        return self.classes.index(NO_TUMOUR)

    @property
    def member(self) -> ModelSpec:
        """The spec of one network of an ensemble."""
        return self.model_copy(update={"members": 1})


def build_network(spec: ModelSpec):
    """A MONAI 2D classifier trained from scratch (no pretrained weights can be downloaded here)."""
    if spec.members > 1:
        return one_network([build_network(spec.member) for _ in range(spec.members)])
    if spec.lesion_head:
        from components.lesion_net import LesionResNet

        return LesionResNet(
            spatial_dims=2,
            n_input_channels=spec.in_channels,
            num_classes=len(spec.classes),
            **_resnet_args(spec.channels, spec.blocks, spec.norm),
        )
    return monai_classifier(spec.network, 2, spec.in_channels, len(spec.classes), spec.channels, spec.blocks, spec.norm)


def one_network(nets: list):
    """The network, or the ensemble of the networks (components/ensemble_net.py)."""
    if len(nets) == 1:
        return nets[0]
    from components.ensemble_net import Ensemble

    return Ensemble(nets)


def monai_classifier(
    network: str, spatial_dims: int, in_channels: int, classes: int, channels: list[int], blocks: list[int], norm: str = "batch"
):
    """MONAI's DenseNet121 or a ResNet of the given widths and depths, 2D or 3D. The ResNet stem is a 5-wide
    stride-2 convolution: MONAI's default 7-wide stride-1 stem costs most of a CPU step, in 3D above all."""
    from monai.networks.nets import DenseNet121, ResNet

    if network == "densenet121":
        return DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=classes)
    return ResNet(spatial_dims=spatial_dims, n_input_channels=in_channels, num_classes=classes, **_resnet_args(channels, blocks, norm))


def _resnet_args(channels: list[int], blocks: list[int], norm: str) -> dict:
    return {"block": "basic", "layers": blocks, "block_inplanes": channels, "conv1_t_size": 5, "conv1_t_stride": 2, "norm": NORMS[norm]}


def tumour_probability(probabilities: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """P(any tumour) = 1 − P(no tumour): the score behind sensitivity, specificity and AUC."""
    return 1.0 - probabilities[:, spec.tumour_free_index]


def with_lesion_vote(probabilities: np.ndarray, lesion_probability: np.ndarray, tumour_free_index: int) -> np.ndarray:
    """Class probabilities whose P(tumour) is the mean of the classifier's and the lesion map's: two opinions from
    one network. Where a small focus lights the map but the pooled features (which also saw the patient's other
    slices in training) call it tumour-free, the alarm still rises. The tumour types keep their proportions."""
    tumour = 1.0 - probabilities[:, tumour_free_index]
    voted = (tumour + lesion_probability) / 2
    types = len(probabilities[0]) - 1
    scale = np.divide(voted, tumour, out=np.zeros_like(voted), where=tumour > 0)[:, None]
    even = np.where(tumour[:, None] > 0, 0.0, voted[:, None] / max(types, 1))  # no type preferred: split evenly
    result = probabilities * scale + even
    result[:, tumour_free_index] = 1.0 - voted
    return result


def calibrated(log_probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature scaling of (log) class probabilities: softmax(log p / T). On a plain classifier this is
    softmax(logits / T), and it applies alike after a lesion vote, so validation and the endpoint share it."""
    from scipy.special import softmax

    return softmax(log_probabilities / temperature, axis=1)


def decide(probabilities: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Labels at the operating threshold: a tumour when P(tumour) reaches it, then its most probable type.
    Screening sets the threshold for a target sensitivity; at 0.5 a binary model's answer is its argmax."""
    classes = np.asarray(spec.classes)
    free = spec.tumour_free_index
    tumour_only = np.where(np.arange(len(classes)) == free, -np.inf, probabilities)
    is_tumour = tumour_probability(probabilities, spec) >= spec.operating_threshold
    return np.where(is_tumour, classes[tumour_only.argmax(1)], classes[free])


def fit_temperature(log_probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The softmax temperature that minimises validation log-loss (temperature scaling, Guo et al. 2017):
    it changes confidences, never the ranking, so accuracy and AUC stay as they are."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    rows = np.arange(len(labels))
    result = minimize_scalar(
        lambda t: -log_softmax(log_probabilities / t, axis=1)[rows, labels].mean(), bounds=(0.05, 20), method="bounded"
    )
    return float(result.x)


def threshold_for_sensitivity(tumour_score: np.ndarray, is_tumour: np.ndarray, target: float, confidence: float = 0.95) -> float:
    """The highest P(tumour) threshold at which the validation sensitivity is at least ``target`` with
    ``confidence`` (one-sided Wilson lower bound), so that unseen patients still get about ``target``: the
    threshold where validation merely touches it sits on the edge and new data falls below it."""
    from scipy.stats import norm

    positives = np.sort(tumour_score[is_tumour])
    n = len(positives)
    if not n:
        return 0.5
    z = norm.ppf(confidence)
    for misses in range(int(np.floor((1 - target) * n)), -1, -1):
        p = (n - misses) / n
        lower = (p + z * z / (2 * n) - z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n)
        if lower >= target:
            break
    return float(np.clip(positives[max(misses, 0)], 1e-4, 1 - 1e-4))


def threshold_for_specificity(tumour_score: np.ndarray, is_tumour: np.ndarray, floor: float) -> float:
    """The lowest P(tumour) threshold at which the validation specificity is at least ``floor``. On a small
    validation set the sensitivity target can pull the threshold down to its hardest tumour slice, where most
    tumour-free slices are alarms too; this is the floor under it."""
    negatives = np.sort(tumour_score[~is_tumour])[::-1]
    allowed_alarms = int(np.floor((1 - floor) * len(negatives) + 1e-9))
    if allowed_alarms >= len(negatives):
        return 0.0
    # one float32 step above that negative: the endpoint compares float32 scores with it. Capped: 1.0 calls nothing a tumour
    above = np.nextafter(np.float32(negatives[allowed_alarms]), np.float32(np.inf))
    return float(min(above, 1 - 1e-4))


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """ECE of the top-label confidence: the gap between confidence and accuracy over equal-width bins."""
    from components.intervals import calibration_error, reliability_table

    return calibration_error(reliability_table(probabilities.argmax(1) == labels, probabilities.max(1), bins))


class EmbeddingProjection(BaseModel):
    """PCA of the network's penultimate features, fitted on validation images at training time:
    a few numbers per served image that show when inputs move away from what the model knows."""

    mean: list[float]
    components: list[list[float]]
    scale: list[float] | None = None  # spread of each component on validation images
    ood_distance: float | None = None  # scaled distance beyond which an input is unlike the validation images
    ood_residual: float | None = None  # the same for the part of the features the components do not explain
    image_low: list[float] | None = None  # range of the image descriptor (below) on validation images
    image_high: list[float] | None = None

    @classmethod
    def fit(cls, features: np.ndarray, n_components: int = EMBEDDING_COMPONENTS, images: np.ndarray | None = None) -> EmbeddingProjection:
        from sklearn.decomposition import PCA

        pca = PCA(n_components=min(n_components, *features.shape)).fit(features)
        components = np.zeros((n_components, features.shape[1]))
        components[: len(pca.components_)] = pca.components_
        projection = cls(mean=pca.mean_.tolist(), components=components.tolist())
        projected = projection.project(features)
        projection.scale = np.maximum(projected.std(axis=0), 1e-6).tolist()
        # 1.5 × the 99th percentile of validation images' own distances: a margin, so that a normal image
        # is rarely flagged while an image of another kind (not a brain MRI, another modality) lands far out
        projection.ood_distance = float(1.5 * np.quantile(projection.distance(projected), 0.99))
        projection.ood_residual = float(1.5 * np.quantile(projection.residual(features), 0.99))
        if images is not None:
            descriptors = image_descriptors(images)
            low, high = np.quantile(descriptors, [0.005, 0.995], axis=0)
            margin = 0.25 * (high - low) + 0.02
            projection.image_low, projection.image_high = (low - margin).tolist(), (high + margin).tolist()
        return projection

    def project(self, features: np.ndarray) -> np.ndarray:
        return (features - np.asarray(self.mean)) @ np.asarray(self.components).T

    def residual(self, features: np.ndarray) -> np.ndarray:
        """How far features lie off the components' subspace: an input unlike anything seen moves there first."""
        centred = np.atleast_2d(features) - np.asarray(self.mean)
        components = np.asarray(self.components)
        return np.linalg.norm(centred - (centred @ components.T) @ components, axis=1)

    def is_outlier(self, features: np.ndarray, images: np.ndarray | None = None) -> np.ndarray:
        """Unlike the validation images: beyond them on the components or off them, or (given the prepared
        images) with a background, brightness or texture they never had. False where the model predates this."""
        outlier = np.zeros(len(np.atleast_2d(features)), bool)
        if self.ood_distance is not None and self.ood_residual is not None:
            outlier |= (self.distance(self.project(features)) > self.ood_distance) | (self.residual(features) > self.ood_residual)
        if images is not None and self.image_low is not None:
            descriptors = image_descriptors(images)
            outlier |= ((descriptors < self.image_low) | (descriptors > self.image_high)).any(axis=1)
        return outlier

    def distance(self, projected: np.ndarray) -> np.ndarray:
        """Root-mean-square of the projected components in units of their validation spread."""
        return np.sqrt(((np.atleast_2d(projected) / np.asarray(self.scale)) ** 2).mean(axis=1))


def image_descriptors(images: np.ndarray) -> np.ndarray:
    """Per prepared image (N, C, S, S) in [0, 1] (channels averaged): the fraction of non-background pixels, the median and the
    pixel-to-pixel roughness. A brain slice has a dark background and smooth tissue; a photo, a document or
    noise does not, whatever the network's features say."""
    flat = images.reshape(len(images), -1, images.shape[-2], images.shape[-1]).mean(axis=1)
    roughness = np.abs(np.diff(flat, axis=1)).mean(axis=(1, 2)) + np.abs(np.diff(flat, axis=2)).mean(axis=(1, 2))
    return np.stack([(flat > 0.05).mean(axis=(1, 2)), np.median(flat.reshape(len(flat), -1), axis=1), roughness], axis=1)


def _feature_layers(net) -> list:
    """The last linear layer of the network, or of each network of an ensemble: its input is the features."""
    import torch

    members = getattr(net, "members", [net])
    return [[module for module in member.modules() if isinstance(module, torch.nn.Linear)][-1] for member in members]


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

    def members(self) -> list[Classifier]:
        """Each network of an ensemble as a classifier of its own (Grad-CAM explains them one by one); else itself."""
        if self.spec.members == 1:
            return [self]
        return [Classifier(self.spec.member, member) for member in self.net.members]

    def batch(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Model input (N, C, S, S) from raw slices (gray or colour), prepared as in training."""
        return np.stack([model_input(image, self.spec.image_size, self.spec.in_channels) for image in images])

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

        layers = _feature_layers(self.net)
        features: list[list[np.ndarray]] = [[] for _ in layers]
        hooks = [
            layer.register_forward_hook(lambda _, inputs, __, seen=seen: seen.append(inputs[0].detach().numpy()))
            for layer, seen in zip(layers, features)
        ]
        try:
            with torch.inference_mode():
                x = torch.from_numpy(np.ascontiguousarray(batch)).contiguous(memory_format=torch.channels_last)
                # brains are near-symmetric: the mirror is a second, free opinion
                views = [x, x.flip(-1)] if self.spec.flip_averaging else [x]
                outputs = [self._logits_and_lesion(view) for view in views]
                log_probabilities = torch.log_softmax(sum(logits for logits, _ in outputs).float() / len(outputs), dim=1).numpy()
        finally:
            for hook in hooks:
                hook.remove()
        if self.spec.lesion_vote:
            from scipy.special import expit

            lesion = np.mean([peak for _, peak in outputs], axis=0)
            voted = with_lesion_vote(np.exp(log_probabilities), expit(lesion), self.spec.tumour_free_index)
            log_probabilities = np.log(np.clip(voted, 1e-12, 1.0))
        unmirrored = np.concatenate([seen[0] for seen in features], axis=1)  # each member's features, side by side
        return calibrated(log_probabilities.astype(np.float64), self.spec.temperature).astype(np.float32), unmirrored

    def _logits_and_lesion(self, x) -> tuple:
        """Class logits and, for a lesion vote, each slice's strongest lesion-map logit (float64 NumPy)."""
        if not self.spec.lesion_vote:
            return self.net(x), None
        logits, lesion_map = self.net.classify(x)
        return logits, lesion_map.flatten(1).amax(1).double().numpy()

    def decide(self, probabilities: np.ndarray) -> np.ndarray:
        return decide(probabilities, self.spec)

    def is_unfamiliar(self, features: np.ndarray, image: np.ndarray) -> bool:
        """Whether one input (its penultimate features and raw slice) is unlike the validation images."""
        return self.projection is not None and bool(self.projection.is_outlier(features, self.batch([image]))[0])

    def embeddings(self, features: np.ndarray) -> np.ndarray:
        """The monitoring summary of penultimate features; NaN when the model has no projection (older models)."""
        if self.projection is None:
            return np.full((len(features), EMBEDDING_COMPONENTS), np.nan)
        return self.projection.project(features)
