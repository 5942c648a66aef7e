"""The lesion-size curve: lesions land inside the brain at the asked size; the summary reads the curve right."""

from __future__ import annotations

import numpy as np
import pandas as pd

from components.lesion_curve import brain_of, insert_lesion, lesion_curve, smallest_detected
from components.model import Classifier, ModelSpec, build_network


def _slice(size: int = 128) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    head = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size * 0.4) ** 2
    return np.where(head, 0.4 + 0.05 * np.sin(xx / 5), 0.0).astype(np.float32)


def test_a_lesion_changes_only_the_brain_and_grows_with_its_diameter():
    image, rng = _slice(), np.random.default_rng(0)
    changed = {d: np.abs(insert_lesion(image, d, rng) - image) > 0.02 for d in (4.0, 16.0, 32.0)}
    assert not any((mask & ~brain_of(image)).any() for mask in changed.values())
    areas = [mask.sum() for mask in changed.values()]
    assert 0 < areas[0] < areas[1] < areas[2]
    assert insert_lesion(np.zeros((64, 64), np.float32), 8.0, rng) is None, "no brain, no room"


def test_smallest_detected_is_the_start_of_the_run_of_detected_sizes():
    curve = pd.DataFrame({"diameter_mm": [0, 2, 4, 8, 16], "detection_rate": [0.05, 0.95, 0.5, 0.92, 1.0]})
    assert smallest_detected(curve) == 8, "a lucky small size below a missed one does not count"
    assert np.isnan(smallest_detected(curve.assign(detection_rate=[0.0, 0.1, 0.2, 0.3, 0.4])))


def test_curve_has_the_false_positive_row_and_a_rate_per_size():
    import torch

    torch.manual_seed(0)
    spec = ModelSpec(network="resnet", image_size=32, channels=[8, 8, 8, 8], blocks=[1, 1, 1, 1], classes=["notumor", "tumor"])
    curve = lesion_curve(Classifier(spec, build_network(spec)), [_slice(64)] * 4, diameters=(4.0, 16.0))
    assert curve["diameter_mm"].tolist() == [0.0, 4.0, 16.0] and curve["slices"].tolist() == [4, 4, 4]
    assert curve["detection_rate"].between(0, 1).all()


def test_a_colour_slice_gets_the_same_lesion_in_every_sequence_at_its_own_level():
    gray = _slice()
    colour = np.stack([gray, gray * 0.5, gray], axis=-1)  # a dimmer second sequence
    lesioned = insert_lesion(colour, 16.0, np.random.default_rng(0))
    assert lesioned.shape == colour.shape
    changed = np.abs(lesioned - colour) > 0.01
    assert changed[..., 0].any() and np.array_equal(changed[..., 0], changed[..., 2]), "one lesion, every sequence"
    assert (np.abs(lesioned - colour)[..., 1].max()) < (np.abs(lesioned - colour)[..., 0].max()), "scaled per sequence"
    np.testing.assert_allclose(insert_lesion(gray, 16.0, np.random.default_rng(0)), lesioned[..., 0], atol=1e-6)
