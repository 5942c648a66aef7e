"""Why the classifier says "tumour": Grad-CAM and occlusion heatmaps, overlays, and localisation figures.

Both explanations are computed at the resolution of the model input (``spec.image_size``²), on the slice
prepared exactly as for prediction (:meth:`Classifier.batch`), so a heatmap pixel is a model-input pixel.

The explained class defaults to the tumour evidence (:func:`target_class`): the most probable tumour class,
which is the predicted class whenever a tumour is predicted. When the model predicts "notumor", it still
shows what speaks most for a tumour: an explanation of "notumor" (evidence spread over healthy tissue)
does not answer a clinician's "why (not) a tumour?".

Thread safety: the classifier's network is shared by the web service and is only ever *read* here.
Grad-CAM needs hooks and gradients, so it runs on a private per-call copy of the network (built on the
meta device and given the shared weight tensors, so nothing is copied or randomly initialised); the
shared network never sees a hook, a changed ``inplace`` flag, a ``.grad`` or a mode switch, and
concurrent calls need no lock. Occlusion only runs forward passes under ``torch.inference_mode``.

How far to trust them: on a toy task whose answer is known (tests/test_explain.py: a bright blob decides
the class; small ResNet, 96 px, 7 training seeds per setting), occlusion put 27-40× the blob's area fraction
of its mass on the blob in every run. Grad-CAM did so in all runs with the batch-norm stem (4.8-8.7×), but
with the group-norm stem that params.yaml trains it failed in 2 of 7 runs (0.9× and 1.8×, its peak near the
blob on 0-8 % of slices), where only the initialisation differed and the model was just as accurate.
Check Grad-CAM against occlusion or lesion masks (:func:`mass_inside`) before trusting it for a model.

torch and MONAI are imported inside the functions: importing this module stays fast.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from components.model import Classifier, ModelSpec

# Grad-CAM's map has the target layer's resolution and is then upsampled to the input. A coarse map
# cannot localise: ResNet layer4 is 2×2 at 48 px and 4×4 at 112 px. The target is the deepest feature
# stage whose map is at least MIN_CAM_WIDTH pixels wide at the model's input size (deeper = more
# class-specific, shallower = finer). Measured on the toy task of tests/test_explain.py (a bright blob of
# radius S/12 decides the class; small ResNet with the batch-norm stem, 96 px): layer2 (12×12) put 4.8-8.7×
# the blob's area fraction of its mass on the blob (7 training seeds), its peak within half a cell of the
# blob on 83-100 % of slices; layer3 (6×6) 1.9-2.7×, peak on the blob on 0-30 %; layer4 (3×3) ~1.5×.
# At 48 px no stage did well (layer1 12×12 or layer2 6×6: 1.7-3.3×).
MIN_CAM_WIDTH = 8


@dataclass(frozen=True)
class _Stage:
    """A Grad-CAM candidate layer: its name, its total stride, and where its cell 0 is centred in input pixels.

    Cell i of the map is centred on input pixel ``stride * i + offset`` (measured from the receptive fields:
    tests check it). Upsampling must use this geometry: the usual ``align_corners=False`` resize assumes
    cell i sits at ``stride * (i + 0.5) - 0.5``, which for MONAI's ResNet (offset 0: every strided conv and
    pool is centred) shifts the heatmap down and right by stride/2 - 0.5 px, 15.5 px for layer4.
    """

    name: str
    stride: int
    offset: float


# Deepest first. ResNet (components.model.build_network): 5×5 conv stride 2 (pad 2), 3×3 max-pool stride 2
# (pad 1), then layer2-4 each halve with a stride-2 3×3 conv (pad 1): widths ceil(S / stride), offset 0.
# DenseNet121: 7×7 conv stride 2 (pad 3) and the same max-pool (ceil), then each transition ends in a 2×2
# average pool (floor; it moves the centre by half a cell). Its deepest stage is "class_layers.relu" (after
# the final norm5, as in MONAI's own example): hooking "features.norm5" fails, that ReLU works in place.
_STAGES: dict[str, list[_Stage]] = {
    "resnet": [_Stage("layer4", 32, 0.0), _Stage("layer3", 16, 0.0), _Stage("layer2", 8, 0.0), _Stage("layer1", 4, 0.0)],
    "densenet121": [
        _Stage("class_layers.relu", 32, 14.0),
        _Stage("features.denseblock3", 16, 6.0),
        _Stage("features.denseblock2", 8, 2.0),
        _Stage("features.denseblock1", 4, 0.0),
    ],
}


def _stage(spec: ModelSpec, layer: str) -> _Stage:
    stages = {stage.name: stage for stage in _STAGES[_network_kind(spec)]}
    if layer not in stages:
        raise ValueError(f"{layer!r} is not a Grad-CAM layer of {spec.network}: {sorted(stages)}")
    return stages[layer]


def feature_width(spec: ModelSpec, layer: str) -> int:
    """Width in pixels of a Grad-CAM candidate layer's map at ``spec.image_size``."""
    stage = _stage(spec, layer)
    width = math.ceil(math.ceil(spec.image_size / 2) / 2)  # both stems: stride-2 conv, stride-2 max-pool (ceil)
    for _ in range(int(math.log2(stage.stride)) - 2):
        width = width // 2 if _network_kind(spec) == "densenet121" else math.ceil(width / 2)
    return width


def target_layer(spec: ModelSpec) -> str:
    """The Grad-CAM layer: the deepest feature stage at least ``MIN_CAM_WIDTH`` pixels wide at ``spec.image_size``.

    ResNet: layer4 from 225 px, layer3 from 113 px, layer2 from 57 px (so 112 px → layer2, 14×14), else layer1.
    DenseNet121: class_layers.relu (after norm5) from 253 px, features.denseblock3 from 125 px, denseblock2
    from 61 px, else denseblock1.
    """
    stages = _STAGES[_network_kind(spec)]
    for stage in stages:
        if feature_width(spec, stage.name) >= MIN_CAM_WIDTH:
            return stage.name
    return stages[-1].name


def _network_kind(spec: ModelSpec) -> str:
    return "densenet121" if spec.network == "densenet121" else "resnet"  # build_network's rule


def target_class(probabilities: np.ndarray, spec: ModelSpec, class_index: int | None = None) -> int:
    """The class an explanation is about: ``class_index`` if given, else the most probable tumour class.

    That is the predicted class whenever a tumour is predicted (by argmax, or at the operating threshold by
    :func:`components.model.decide`, which also names the most probable tumour type), and, when "notumor" is
    predicted, what speaks most for a tumour in this slice: a clinician asks "why (not) a tumour?", and an
    explanation of "notumor" (evidence spread over healthy tissue) answers neither."""
    n = len(spec.classes)
    if class_index is not None:
        if not 0 <= class_index < n:
            raise ValueError(f"class_index {class_index} is outside 0..{n - 1} ({spec.classes})")
        return int(class_index)
    if n == 1:
        return 0
    tumour = np.asarray(probabilities, dtype=np.float64).reshape(-1).copy()
    tumour[spec.tumour_free_index] = -np.inf
    return int(np.argmax(tumour))


def _prepared(classifier: Classifier, image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(f"expected one 2D slice (gray or colour), got an array of shape {image.shape}")
    return classifier.batch([image])  # (1, C, S, S) float32


def _private_net(net, spec: ModelSpec):
    """A copy of ``net`` for Grad-CAM that shares its weight tensors (read-only here) and nothing else.

    Built on the meta device (no allocation, no draw from torch's global RNG) and given the shared
    tensors with ``load_state_dict(assign=True)``; ``state_dict`` reads only parameters and buffers, so a
    hook that another thread is adding to the shared net meanwhile cannot leak into the copy. A network
    that is not ``build_network(spec)`` is deep-copied instead, with any copied hooks dropped.
    The copy's weights are frozen: gradients flow to the input only. Besides saving work, this avoids a
    torch 2.13 CPU bug: the *weight* gradient of a channels-last stride-2 1×1 conv (the ResNet shortcut) with
    an input of 56 px or more corrupts the heap ("double free or corruption"), and the classifier's net is
    channels-last.
    """
    import copy

    import torch

    from components.model import build_network

    state = net.state_dict()
    try:
        with torch.device("meta"):
            clone = build_network(spec)
        clone.load_state_dict(state, assign=True)
        if any(t.is_meta for t in (*clone.parameters(), *clone.buffers())):
            raise RuntimeError("tensors outside the state dict")
    except RuntimeError:
        clone = copy.deepcopy(net)
        for module in clone.modules():
            for hooks in (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks):
                hooks.clear()
    clone.eval()
    for parameter in clone.parameters():
        parameter.requires_grad_(False)  # a new Parameter object: the shared net's flags are untouched
    return clone


def _cell_upsampler(stage: _Stage):
    """A MONAI ``upsampler`` that places map cell i on input pixel ``stride * i + offset`` (see :class:`_Stage`):
    bilinear between cell centres, the edge cells' values held out to the border."""
    import torch

    def weights(size: int, cells: int) -> torch.Tensor:
        position = ((torch.arange(size, dtype=torch.float64) - stage.offset) / stage.stride).clamp(0, cells - 1)
        low = position.floor().long().clamp(max=cells - 1)
        high = (low + 1).clamp(max=cells - 1)
        frac = position - low
        matrix = torch.zeros(size, cells, dtype=torch.float64)
        matrix[torch.arange(size), low] += 1 - frac
        matrix[torch.arange(size), high] += frac
        return matrix

    def factory(spatial_size):
        height, width = spatial_size

        def upsample(cam: torch.Tensor) -> torch.Tensor:
            rows, cols = weights(height, cam.shape[-2]).to(cam.dtype), weights(width, cam.shape[-1]).to(cam.dtype)
            return rows @ cam @ cols.T

        return upsample

    return factory


def gradcam(classifier: Classifier, image: np.ndarray, class_index: int | None = None, layer: str | None = None) -> np.ndarray:
    """Grad-CAM heatmap (S, S) float32 in [0, 1] for one raw slice, at the model input's resolution.

    MONAI's ``GradCAM`` (gradient of the class logit) on ``layer`` (default :func:`target_layer`), upsampled
    with the layer's true cell geometry (:func:`_cell_upsampler`; MONAI's default resize is off by up to half
    a cell) and scaled to a maximum of 1 (MONAI's default post-processing maps max→0 and min→1, i.e. inverts
    the map, so it is replaced). All zeros when nothing in the layer speaks for the class.
    Runs on a private copy of the network: the shared classifier is left exactly as it was (no hooks, no
    grads, no mode change), so concurrent calls need no lock.
    """
    import torch
    from monai.visualize import GradCAM

    if classifier.spec.members > 1:
        return _ensemble_gradcam(classifier, image, class_index, layer)
    stage = _stage(classifier.spec, layer or target_layer(classifier.spec))
    batch = _prepared(classifier, image)
    net = _private_net(classifier.net, classifier.spec)
    with torch.inference_mode(False), torch.enable_grad():
        x = torch.from_numpy(batch).requires_grad_(True)
        with torch.no_grad():
            probabilities = torch.softmax(net(x) / classifier.spec.temperature, dim=1)[0].numpy()
        index = target_class(probabilities, classifier.spec, class_index)
        cam = GradCAM(nn_module=net, target_layers=stage.name, upsampler=_cell_upsampler(stage), postprocessing=lambda m: m)
        heatmap = cam(x, class_idx=index)[0, 0].detach().numpy().astype(np.float64)
    return _scaled_to_peak(np.nan_to_num(np.clip(heatmap, 0.0, None)))


def _scaled_to_peak(heatmap: np.ndarray) -> np.ndarray:
    """A non-negative heatmap scaled to a maximum of 1 (all zeros stay zeros), float32."""
    peak = heatmap.max()
    return (heatmap / peak if peak > 0 else np.zeros_like(heatmap)).astype(np.float32)


def _ensemble_gradcam(classifier: Classifier, image: np.ndarray, class_index: int | None, layer: str | None) -> np.ndarray:
    """The mean of the members' Grad-CAMs for the class the ensemble explains, scaled to a maximum of 1."""
    index = target_class(classifier.predict_prepared(_prepared(classifier, image))[0][0], classifier.spec, class_index)
    return _scaled_to_peak(np.mean([gradcam(member, image, index, layer) for member in classifier.members()], axis=0))


def lesion_map(classifier: Classifier, image: np.ndarray) -> np.ndarray:
    """The lesion probability (S, S) float32 in [0, 1] that a model with a lesion head (``spec.lesion_head``,
    trained on masks) draws for one raw slice, at the model input's resolution. Unlike Grad-CAM and occlusion it
    is not derived from the decision after the fact: the network was taught where lesions are, and its strongest
    responses feed the decision. Not rescaled: a map near 0 everywhere says no lesion was found."""
    import torch

    if not classifier.spec.lesion_head:
        raise ValueError("this model has no lesion head (train it with train.mask_weight > 0)")
    batch = torch.from_numpy(_prepared(classifier, image))
    with torch.inference_mode():
        cells = torch.sigmoid(classifier.net.classify(batch.contiguous(memory_format=torch.channels_last))[1][0, 0].float())
    size = batch.shape[-1]
    upsample = _cell_upsampler(_stage(classifier.spec, "layer1"))((size, size))  # the map has layer1's grid
    return np.clip(upsample(cells.double()).numpy(), 0.0, 1.0).astype(np.float32)


def _window_starts(size: int, patch: int, stride: int) -> list[int]:
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)  # the last row and column are covered too
    return starts


def occlusion(
    classifier: Classifier,
    image: np.ndarray,
    class_index: int | None = None,
    patch: int | None = None,
    stride: int | None = None,
    batch_size: int = 64,
) -> np.ndarray:
    """Occlusion sensitivity (S, S) float32 in [0, 1]: how much the target class's probability drops when a
    ``patch``² square around a pixel is replaced by the image's mean, averaged over the patches covering it.

    Probabilities are exactly those the service reports (:meth:`Classifier.predict_prepared`: the mirror
    average, the lesion vote and the temperature where the model has them), so the map explains the served
    score, not the classifier head alone. Values are absolute
    probability drops (rises count as 0) and are *not* rescaled: a map that is nearly 0
    everywhere honestly says that no single region carries the decision. Defaults: ``patch`` = S/8 (at least
    3 px), ``stride`` = patch/2; the occluded copies go through the network ``batch_size`` at a time, read-only.
    """
    batch = _prepared(classifier, image)
    size = batch.shape[-1]
    patch = max(3, size // 8) if patch is None else int(patch)
    stride = max(1, patch // 2) if stride is None else int(stride)
    if not 1 <= patch <= size or not 1 <= stride <= patch:
        raise ValueError(f"need 1 <= stride <= patch <= {size}, so every pixel is covered (got patch={patch}, stride={stride})")
    fill = batch[0].mean(axis=(1, 2))[:, None, None]  # each channel's own mean
    windows = [(r, c) for r in _window_starts(size, patch, stride) for c in _window_starts(size, patch, stride)]

    reference = classifier.predict_prepared(batch)[0][0]
    index = target_class(reference, classifier.spec, class_index)
    drops = np.empty(len(windows))
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        occluded = np.repeat(batch, len(chunk), axis=0)
        for k, (r, c) in enumerate(chunk):
            occluded[k, :, r : r + patch, c : c + patch] = fill
        drops[start : start + len(chunk)] = reference[index] - classifier.predict_prepared(occluded)[0][:, index]
    total, coverage = np.zeros((size, size)), np.zeros((size, size))
    for (r, c), drop in zip(windows, np.clip(drops, 0.0, 1.0)):
        total[r : r + patch, c : c + patch] += drop
        coverage[r : r + patch, c : c + patch] += 1
    return np.clip(total / coverage, 0.0, 1.0).astype(np.float32)


# A 5-point approximation of "jet", used only where matplotlib is not installed (it is not a declared dependency).
_JET = np.array([[0.0, 0.0, 0.5], [0.0, 0.5, 1.0], [0.5, 1.0, 0.5], [1.0, 0.5, 0.0], [0.5, 0.0, 0.0]])


def _jet(values: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] for values in [0, 1]: matplotlib's "jet" if available, else the numpy approximation."""
    try:
        from matplotlib import colormaps
    except ImportError:
        points = np.linspace(0.0, 1.0, len(_JET))
        return np.stack([np.interp(values, points, _JET[:, channel]) for channel in range(3)], axis=-1)
    return colormaps["jet"](values)[..., :3]


def overlay_png(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> bytes:
    """PNG bytes (RGB, no metadata chunks) of the slice with the heatmap blended on top, at the heatmap's size.

    The slice is shown as the model saw it: prepared like model input (:func:`components.imaging.prepare`)
    at the heatmap's resolution, so every overlay pixel lines up with the explained pixel. The colour ("jet")
    is blended with a per-pixel opacity of ``alpha × heat``: cold regions show the plain grey slice.
    """
    from PIL import Image

    from components.imaging import prepare

    image, heatmap = np.asarray(image, dtype=np.float64), np.asarray(heatmap, dtype=np.float64)
    image = image.mean(axis=-1) if image.ndim == 3 else image  # a colour (multi-sequence) slice is shown gray
    if image.ndim != 2 or heatmap.ndim != 2:
        raise ValueError(f"expected a 2D slice and a 2D heatmap, got shapes {image.shape} and {heatmap.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if heatmap.shape[0] == heatmap.shape[1]:
        grey = prepare(image, heatmap.shape[0]).astype(np.float64)
    else:
        from skimage.transform import resize

        grey = resize(image, heatmap.shape, order=1, anti_aliasing=True, preserve_range=True)
        low, high = np.percentile(grey, [0.5, 99.5])
        grey = np.clip((grey - low) / (high - low), 0.0, 1.0) if high - low > 1e-6 else np.zeros_like(grey)
    heat = np.clip(np.nan_to_num(heatmap), 0.0, 1.0)
    weight = (alpha * heat)[..., None]
    rgb = (1.0 - weight) * grey[..., None] + weight * _jet(heat)
    buffer = io.BytesIO()
    Image.fromarray(np.round(rgb * 255).astype(np.uint8), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _mask_like(heatmap: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``mask > 0`` resized to the heatmap's shape by nearest neighbour (pixel centres)."""
    mask = np.asarray(mask)
    if heatmap.ndim != 2 or mask.ndim != 2:
        raise ValueError(f"expected a 2D heatmap and a 2D mask, got shapes {heatmap.shape} and {mask.shape}")
    rows = ((np.arange(heatmap.shape[0]) + 0.5) * mask.shape[0] / heatmap.shape[0]).astype(int)
    cols = ((np.arange(heatmap.shape[1]) + 0.5) * mask.shape[1] / heatmap.shape[1]).astype(int)
    return mask[np.ix_(rows, cols)] > 0


def mass_inside(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """Fraction of the heatmap's total mass that lies inside the lesion mask (nonzero = lesion; resized to the
    heatmap by nearest neighbour): how much of the explanation falls on the tumour. Compare it with the mask's
    area fraction, what a uniform map would score. NaN for a heatmap with no mass (nothing was explained)."""
    heatmap = np.asarray(heatmap, dtype=np.float64)
    inside = _mask_like(heatmap, mask)
    if np.any(heatmap < 0) or not np.all(np.isfinite(heatmap)):
        raise ValueError("a heatmap must be finite and non-negative")
    total = heatmap.sum()
    return float(heatmap[inside].sum() / total) if total > 0 else float("nan")


def pointing_game(heatmap: np.ndarray, mask: np.ndarray, tolerance: float = 0.0) -> bool:
    """Whether the heatmap's maximum lies inside the lesion mask (resized as in :func:`mass_inside`), or within
    ``tolerance`` pixels of it (the original protocol allows 15 px at 224 px: a coarse map such as Grad-CAM's
    can only peak on its grid of cell centres, ``stride`` pixels apart).

    Strict: the highest value inside must exceed every value outside, so a flat or all-zero map, or a tie
    between lesion and background, is a miss rather than a lucky hit.
    """
    heatmap = np.asarray(heatmap, dtype=np.float64)
    inside = _mask_like(heatmap, mask)
    if not inside.any() or heatmap.max() <= 0:
        return False
    if tolerance > 0:
        from scipy.ndimage import distance_transform_edt

        inside = distance_transform_edt(~inside) <= tolerance
    outside = heatmap[~inside]
    return bool(heatmap[inside].max() > (outside.max() if outside.size else -np.inf))
