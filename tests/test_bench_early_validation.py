from tests.conftest import bench_module


def test_the_bench_validates_at_each_size_and_times_every_task_in_turn():
    """bench/early_validation.py's ratio means something only if its two validation batches reach the network at
    the two sizes, and every task is timed the same number of times."""
    import torch

    from components.model import ModelSpec, build_network

    bench = bench_module("early_validation")
    spec = ModelSpec(network="resnet", image_size=32, channels=[4, 8, 8, 8], blocks=[1, 1, 1, 1], classes=["a", "b"], norm="group")
    net = build_network(spec).eval()
    seen: list[int] = []
    net.register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0].shape[-1]))
    for size in (32, 16):
        bench.validation_batch(net, torch.rand(4, 1, 32, 32), size, bf16=False)
    assert seen == [32, 16]
    calls = {"a": 0, "b": 0}
    seconds = bench.median_seconds({name: lambda name=name: calls.__setitem__(name, calls[name] + 1) for name in calls}, repeats=3)
    assert calls == {"a": 4, "b": 4} and set(seconds) == {"a", "b"}, "one warm-up run, then the repeats"
