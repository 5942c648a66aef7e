"""The train stage's distribution logic: each rank's own partition, and how a node joins a multi-node job."""

from __future__ import annotations

import pandas as pd
import pytest

from components.config import TrainConfig
from components.errors import TumorScopeError
from components.settings import get_settings
from components.train import rank_partition, torchrun_command


def test_rank_partitions_are_equal_sized_and_cover_every_row():
    rows = pd.DataFrame({"image_id": [f"im{i}" for i in range(11)]})
    shares = [rank_partition(rows, rank, 3, shuffle=True, seed=7) for rank in range(3)]
    assert [len(share) for share in shares] == [4, 4, 4]  # padded by repetition: DDP needs equal steps per rank
    seen = pd.concat(shares)["image_id"]
    assert set(seen) == set(rows["image_id"]) and seen.duplicated().sum() == 1
    assert rank_partition(rows, 0, 1, shuffle=True, seed=7) is rows


def test_train_shares_are_shuffled_reproducibly_and_val_shares_keep_order():
    rows = pd.DataFrame({"image_id": range(20)})
    first = rank_partition(rows, 0, 2, shuffle=True, seed=1)["image_id"].tolist()
    assert first == rank_partition(rows, 0, 2, shuffle=True, seed=1)["image_id"].tolist()
    assert first != sorted(first)
    assert rank_partition(rows, 1, 2, shuffle=False, seed=1)["image_id"].tolist() == list(range(1, 20, 2))


def test_linear_lr_scaling_follows_the_world_size():
    assert TrainConfig(devices=2, num_nodes=2, lr_scaling="linear", learning_rate=0.001).effective_learning_rate == pytest.approx(0.004)
    assert TrainConfig(devices=2, num_nodes=2, learning_rate=0.001).effective_learning_rate == pytest.approx(0.001)


@pytest.fixture
def settings_env(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def test_one_node_trains_in_process(settings_env):
    assert torchrun_command(TrainConfig(devices=2)) is None


def test_multi_node_needs_the_rendezvous_endpoint(settings_env):
    settings_env.delenv("TUMORSCOPE_RDZV_ENDPOINT", raising=False)
    with pytest.raises(TumorScopeError, match="TUMORSCOPE_RDZV_ENDPOINT"):
        torchrun_command(TrainConfig(num_nodes=2))


def test_multi_node_joins_through_torchrun_and_not_twice(settings_env):
    settings_env.setenv("TUMORSCOPE_RDZV_ENDPOINT", "node0:29400")
    command = torchrun_command(TrainConfig(num_nodes=3, devices=2))
    assert command[1:3] == ["-m", "torch.distributed.run"]
    assert ["--nnodes", "3"] == command[3:5] and "--rdzv-endpoint" in command and "node0:29400" in command
    settings_env.setenv("TORCHELASTIC_RUN_ID", "job")
    assert torchrun_command(TrainConfig(num_nodes=3)) is None
