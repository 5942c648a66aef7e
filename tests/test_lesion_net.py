import pytest

torch = pytest.importorskip("torch")


def _spec(**overrides):
    from components.model import ModelSpec

    fields = dict(network="resnet", image_size=64, channels=[8, 16, 16, 32], blocks=[1, 1, 1, 1], classes=["notumor", "tumor"])
    return ModelSpec(**{**fields, "in_channels": 3, "norm": "group", "lesion_head": True, **overrides})


def test_the_lesion_network_keeps_the_resnet_layer_names_and_maps_at_a_quarter_size():
    from components.model import Classifier, build_network

    net = build_network(_spec())
    plain = build_network(_spec(lesion_head=False))
    assert set(plain.state_dict()) - {"fc.weight"} <= set(net.state_dict()), "Grad-CAM layers and weight loading see a ResNet"
    logits, lesion_map = net.classify(torch.rand(2, 3, 64, 64))
    assert logits.shape == (2, 2) and lesion_map.shape == (2, 1, 16, 16)
    probabilities, features = Classifier(_spec(), net).predict_prepared(torch.rand(2, 3, 64, 64).numpy())
    assert probabilities.shape == (2, 2) and features.shape == (2, 32 + 2), "pooled features plus the lesion evidence"


def test_the_lesion_loss_rewards_a_map_on_the_lesion_and_ignores_slices_without_a_mask():
    from components.lesion_net import lesion_loss

    masks = torch.zeros(2, 1, 64, 64)
    masks[:, :, 16:32, 16:32] = 1
    on_lesion = torch.full((2, 1, 16, 16), -6.0)
    on_lesion[:, :, 4:8, 4:8] = 6.0
    elsewhere = on_lesion.roll(6, dims=-1)
    has_mask = torch.tensor([True, True])
    assert lesion_loss(on_lesion, masks, has_mask) < 0.1 < lesion_loss(elsewhere, masks, has_mask)
    none = lesion_loss(elsewhere.requires_grad_(), masks, torch.tensor([False, False]))
    assert none.item() == 0.0
    none.backward()  # still a graph: a batch without masks trains the classifier alone
