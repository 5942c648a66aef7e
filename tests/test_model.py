from pathlib import Path

import numpy as np
import pytest

from components.errors import TumorScopeError
from components.model import Classifier, ModelSpec, build_network


def test_save_load_round_trip_predicts_the_same(tmp_path: Path):
    import torch

    torch.manual_seed(0)
    spec = ModelSpec(network="resnet", image_size=32, channels=[8, 8, 16, 16], blocks=[1, 1, 1, 1], classes=["notumor", "tumor"])
    classifier = Classifier.from_weights(spec, build_network(spec).state_dict())
    classifier.save(tmp_path, {"run_id": "r1"})
    loaded = Classifier.load(tmp_path)
    images = [np.random.default_rng(i).random((50, 40)).astype(np.float32) for i in range(3)]
    first, second = classifier.predict_proba(images), loaded.predict_proba(images)
    assert first.shape == (3, 2)
    np.testing.assert_allclose(first.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(first, second, atol=1e-6)


def test_loading_from_an_empty_folder_is_a_clear_error(tmp_path: Path):
    with pytest.raises(TumorScopeError, match="no trained model"):
        Classifier.load(tmp_path)


def test_a_spec_saved_before_norm_was_recorded_rebuilds_the_batch_norm_network():
    legacy = ModelSpec.model_validate_json(
        '{"network": "resnet", "image_size": 32, "channels": [8, 8, 16, 16], "blocks": [1, 1, 1, 1], "classes": ["notumor", "tumor"]}'
    )
    assert legacy.norm == "batch"
    assert "bn1.running_mean" in build_network(legacy).state_dict()
    current = ModelSpec(**{**legacy.model_dump(), "norm": "group"})
    assert "bn1.running_mean" not in build_network(current).state_dict()


def test_embedding_summary_is_fitted_saved_and_reloaded(tmp_path: Path):
    import torch

    from components.model import EMBEDDING_COLUMNS, EmbeddingProjection

    torch.manual_seed(1)
    spec = ModelSpec(network="resnet", image_size=32, channels=[8, 8, 16, 16], blocks=[1, 1, 1, 1], classes=["notumor", "tumor"])
    classifier = Classifier.from_weights(spec, build_network(spec).state_dict())
    images = [np.random.default_rng(i).random((40, 40)).astype(np.float32) for i in range(12)]
    probabilities, features = classifier.predict(images)
    assert probabilities.shape == (12, 2) and features.shape == (12, 16), "features are the last linear layer's input"
    assert np.isnan(classifier.embeddings(features)).all(), "no projection yet: unknown, not zero"
    classifier.projection = EmbeddingProjection.fit(features)
    summary = classifier.embeddings(features)
    assert summary.shape == (12, len(EMBEDDING_COLUMNS)) and abs(summary[:, 0].mean()) < 1e-6
    classifier.save(tmp_path)
    np.testing.assert_allclose(Classifier.load(tmp_path).embeddings(features), summary, atol=1e-6)


def test_operating_threshold_keeps_a_margin_above_the_target_sensitivity():
    from components.model import threshold_for_sensitivity

    rng = np.random.default_rng(0)
    scores = rng.random(400)
    threshold = threshold_for_sensitivity(scores, np.ones(400, bool), target=0.9)
    validation_sensitivity = (scores >= threshold).mean()
    assert 0.92 <= validation_sensitivity <= 0.96, "above 0.9 by the Wilson margin, not far above"
    assert threshold_for_sensitivity(scores[:5], np.ones(5, bool), target=0.9) == scores[:5].min(), "few positives: miss none"


def test_specificity_floor_threshold_lets_through_only_the_allowed_alarms():
    from components.model import threshold_for_specificity

    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.2, 0.1, 0.05, 0.01, 0.3, 0.95])
    is_tumour = np.array([True, True, True, True, False, False, False, False, False, False])
    threshold = threshold_for_specificity(scores, is_tumour, floor=0.8)  # 6 negatives: one alarm allowed
    assert 0.3 < threshold <= 0.31 and ((scores >= threshold) & ~is_tumour).sum() == 1
    assert threshold_for_specificity(scores, is_tumour, floor=0.99) > 0.95, "no alarm allowed: above the highest negative"
    tens = np.r_[np.full(10, 0.5, np.float32), np.linspace(0.1, 0.4, 10, dtype=np.float32)]  # float32, as the model's
    tied = threshold_for_specificity(tens, np.zeros(20, bool), floor=0.9)  # (1 - 0.9) * 20 rounds just under 2
    assert (tens >= tied).sum() == 0, "ten tied at the cut: all or none, and two alarms cannot be had"
    assert threshold_for_specificity(np.r_[tens[10:], 1, 1], np.zeros(12, bool), floor=0.95) < 1, "confident alarms: still below 1"


def test_temperature_scaling_lowers_the_calibration_error_of_an_overconfident_model():
    from components.model import expected_calibration_error, fit_temperature

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 4000)
    logits = np.where(labels[:, None] == np.arange(2), 1.0, 0.0) + rng.normal(0, 1.2, (4000, 2))
    overconfident = logits * 4  # right ranking, far too sure
    log_probs = overconfident - np.log(np.exp(overconfident).sum(axis=1, keepdims=True))
    temperature = fit_temperature(log_probs, labels)
    calibrated = np.exp(log_probs / temperature)
    calibrated /= calibrated.sum(axis=1, keepdims=True)
    assert temperature > 2
    assert expected_calibration_error(calibrated, labels) < expected_calibration_error(np.exp(log_probs), labels) / 3


def test_decide_uses_the_operating_threshold_then_the_most_probable_tumour_type():
    from components.model import ModelSpec, decide

    spec = ModelSpec(network="resnet", image_size=32, channels=[8] * 4, blocks=[1] * 4, classes=["glioma", "notumor", "pituitary"])
    probabilities = np.array([[0.2, 0.7, 0.1], [0.25, 0.6, 0.15], [0.1, 0.3, 0.6]])
    assert decide(probabilities, spec).tolist() == ["notumor", "notumor", "pituitary"]
    assert decide(probabilities, spec.model_copy(update={"operating_threshold": 0.35})).tolist() == ["notumor", "glioma", "pituitary"]


def test_a_three_sequence_model_answers_colour_and_gray_slices_and_flip_averaging_is_mirror_invariant():
    import torch

    torch.manual_seed(0)
    spec = ModelSpec(
        network="resnet", image_size=32, channels=[8, 8, 16, 16], blocks=[1, 1, 1, 1], classes=["notumor", "tumor"],
        in_channels=3, flip_averaging=True,
    )  # fmt: skip
    classifier = Classifier.from_weights(spec, build_network(spec).state_dict())
    rng = np.random.default_rng(1)
    colour = rng.random((48, 48, 3)).astype(np.float32)
    probabilities = classifier.predict_proba([colour, colour[:, ::-1], colour.mean(-1)])
    assert probabilities.shape == (3, 2)
    np.testing.assert_allclose(probabilities[0], probabilities[1], atol=1e-5)  # a slice and its mirror: one answer
    plain = Classifier(spec.model_copy(update={"flip_averaging": False}), classifier.net)
    assert not np.allclose(plain.predict_proba([colour])[0], plain.predict_proba([colour[:, ::-1]])[0], atol=1e-5)


def test_a_lesion_vote_averages_p_tumour_and_keeps_the_tumour_types_proportions():
    from components.model import with_lesion_vote

    probabilities = np.array([[0.2, 0.6, 0.2], [0.0, 1.0, 0.0], [0.3, 0.1, 0.6]])  # glioma, notumor, pituitary
    voted = with_lesion_vote(probabilities, np.array([0.9, 0.5, 0.0]), tumour_free_index=1)
    np.testing.assert_allclose(1 - voted[:, 1], [0.65, 0.25, 0.45])
    np.testing.assert_allclose(voted.sum(1), 1)
    assert voted[0, 0] == pytest.approx(voted[0, 2]) and voted[2, 2] == pytest.approx(2 * voted[2, 0])
    np.testing.assert_allclose(voted[1], [0.125, 0.75, 0.125])  # a map-only alarm: no type preferred


def test_a_voting_lesion_model_serves_the_vote_then_its_temperature():
    import torch

    torch.manual_seed(3)
    spec = ModelSpec(
        network="resnet",
        image_size=32,
        channels=[8, 8, 16, 16],
        blocks=[1, 1, 1, 1],
        classes=["notumor", "tumor"],
        norm="group",
        lesion_head=True,
    )
    net = build_network(spec).eval()
    images = np.random.default_rng(0).random((6, 1, 32, 32)).astype(np.float32)
    with torch.inference_mode():
        logits, lesion_map = net.classify(torch.from_numpy(images))
    head = torch.softmax(logits, 1)[:, 1].numpy()
    lesion = torch.sigmoid(lesion_map.flatten(1).amax(1)).numpy()
    voting = Classifier(spec.model_copy(update={"lesion_vote": True}), net)
    np.testing.assert_allclose(voting.predict_prepared(images)[0][:, 1], (head + lesion) / 2, atol=1e-5)
    np.testing.assert_allclose(Classifier(spec, net).predict_prepared(images)[0][:, 1], head, atol=1e-5)
    voted = np.stack([1 - (head + lesion) / 2, (head + lesion) / 2], axis=1)
    hot = Classifier(spec.model_copy(update={"lesion_vote": True, "temperature": 2.0}), net).predict_prepared(images)[0]
    np.testing.assert_allclose(hot, torch.softmax(torch.log(torch.from_numpy(voted)) / 2, 1).numpy(), atol=1e-5)
    plain_hot = Classifier(spec.model_copy(update={"temperature": 2.0}), net).predict_prepared(images)[0]
    np.testing.assert_allclose(plain_hot, torch.softmax(logits / 2, 1).numpy(), atol=1e-5)  # softmax(logits / T), as before


def test_an_ensemble_answers_with_its_networks_mean_probability_and_travels_as_one_model(tmp_path):
    import torch

    torch.manual_seed(1)
    spec = ModelSpec(network="resnet", image_size=32, channels=[8, 8, 16, 16], blocks=[1, 1, 1, 1], classes=["notumor", "tumor"],
                     norm="group", members=3)  # fmt: skip
    ensemble = Classifier(spec, build_network(spec))
    images = np.random.default_rng(2).random((5, 1, 32, 32)).astype(np.float32)
    probabilities, features = ensemble.predict_prepared(images)
    members = [member.predict_prepared(images) for member in ensemble.members()]
    assert len(members) == 3 and not np.allclose(members[0][0], members[1][0]), "three networks, each its own"
    np.testing.assert_allclose(probabilities, np.mean([p for p, _ in members], axis=0), atol=1e-5)
    np.testing.assert_allclose(features, np.concatenate([f for _, f in members], axis=1))
    ensemble.save(tmp_path / "model")
    loaded = Classifier.load(tmp_path / "model")
    assert loaded.spec.members == 3
    np.testing.assert_allclose(loaded.predict_prepared(images)[0], probabilities, atol=1e-6)
