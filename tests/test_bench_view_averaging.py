import numpy as np

from tests.conftest import bench_module


def test_views_zoom_turn_shift_and_mirror_about_the_centre():
    import torch

    views = bench_module("view_averaging")
    square = torch.zeros(1, 1, 64, 64)
    square[..., 24:40, 16:32] = 1.0  # left of centre
    area = lambda x: float(x.sum())  # noqa: E731
    assert torch.equal(views.viewed(square, 1.0, 0.0, 0.0, False), square)
    assert torch.equal(views.viewed(square, 1.0, 0.0, 0.0, True), square.flip(-1))
    assert area(views.viewed(square, 1 / 1.1, 0.0, 0.0, False)) > 1.15 * area(square)  # zoom in: 1.21x the area
    assert area(views.viewed(square, 1.1, 0.0, 0.0, False)) < 0.88 * area(square)
    turned = views.viewed(square, 1.0, 8.0, 0.0, False)
    assert abs(area(turned) - area(square)) < 0.05 * area(square) and not torch.allclose(turned, square)
    shifted = views.viewed(square, 1.0, 0.0, 0.1, False)
    assert area(shifted[..., :24]) > area(square[..., :24])  # the grid samples to the right: content moves left


def test_compared_counts_each_view_sets_errors_on_the_same_slices():
    views = bench_module("view_averaging")
    labels = np.array([0, 1, 1, 0])
    right, wrong_on_last = np.eye(2)[labels] * 4, np.eye(2)[[0, 1, 1, 1]] * 8  # confidently wrong on the last slice
    logits = {name: right for name in views.VIEWS} | {"as is": wrong_on_last}
    table = views.compared({"val": (logits, labels), "test": (logits, labels)}).set_index("views")
    assert table.loc["as is", "test errors"] == 1
    assert table.loc["as is + mirror (shipped)", "test errors"] == 1  # the mean of (0, 8) and (4, 0) is still class 1
    assert table.loc["all twelve", "test errors"] == 0
    assert table.loc["all twelve", "val NLL"] < table.loc["as is", "val NLL"]
