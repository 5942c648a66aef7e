from tests.conftest import bench_module


def test_the_bench_compares_two_builds_of_one_distribution():
    """bench/augment.py's ratio means something only if its textbook build draws what the stage's does."""
    import torch

    from components.dataset import augment_batch

    def shares(augment) -> torch.Tensor:
        torch.manual_seed(3)
        square = torch.zeros(3000, 1, 64, 64)
        square[:, :, 16:48, 16:48] = 0.5
        out = augment(square)
        centre = out[:, 0, 28:36, 28:36]  # inside the square whatever the pose
        noisy = centre.std(dim=(1, 2)) > 0.01
        contrasted = (centre.mean(dim=(1, 2)) - 0.5).abs() > 0.005
        leftward = out[:, 0, :, :32].sum((1, 2)) > out[:, 0, :, 32:].sum((1, 2)) + 0.5  # posed off centre
        return torch.stack([noisy, contrasted, leftward]).float().mean(1)

    stage, textbook = shares(augment_batch), shares(bench_module("augment").textbook_augment)
    assert (stage > 0.2).all() and (stage < 0.5).all()
    torch.testing.assert_close(stage, textbook, atol=0.04, rtol=0)
