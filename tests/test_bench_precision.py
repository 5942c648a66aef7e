from tests.conftest import bench_module


def test_the_bench_times_bf16_against_fp32_convolutions():
    """bench/precision.py's ratio means something only if its two steps run the convolutions in the two precisions
    and both update the network."""
    import torch

    from components.model import ModelSpec, build_network

    spec = ModelSpec(network="resnet", image_size=32, channels=[4, 8, 8, 8], blocks=[1, 1, 1, 1], classes=["a", "b"], norm="group")
    net = build_network(spec)
    optimiser = torch.optim.SGD(net.parameters(), lr=0.1)
    images, labels = torch.rand(4, 1, 32, 32), torch.tensor([0, 1, 0, 1])
    first_conv = next(module for module in net.modules() if isinstance(module, torch.nn.Conv2d))
    seen: list[torch.dtype] = []
    first_conv.register_forward_hook(lambda _, __, output: seen.append(output.dtype))
    for bf16 in (True, False):
        before = first_conv.weight.detach().clone()
        bench_module("precision").training_step(net, optimiser, images, labels, bf16)
        assert not torch.equal(before, first_conv.weight)
    assert seen == [torch.bfloat16, torch.float32]
