import json
from pathlib import Path

import pytest

from components.errors import TumorScopeError
from components.register import CHAMPION, rollback
from components.settings import get_settings


@pytest.fixture
def registry(tmp_path: Path, monkeypatch):
    """A real MLflow SQLite registry with three versions, v3 champion, and the promotion log that got there."""
    import mlflow

    monkeypatch.setenv("TUMORSCOPE_ROOT", str(tmp_path))
    monkeypatch.setenv("TUMORSCOPE_MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    get_settings.cache_clear()
    client = mlflow.MlflowClient(get_settings().tracking_uri)
    client.create_registered_model("m")
    for _ in range(3):
        client.create_model_version("m", source=(tmp_path / "model").as_uri())
    client.set_registered_model_alias("m", CHAMPION, "3")
    log = tmp_path / ".tumorscope" / "promotions.jsonl"
    log.parent.mkdir()
    log.write_text("".join(json.dumps({"model_name": "m", "candidate_version": v, "promoted": True}) + "\n" for v in ("1", "2", "3")))
    yield client
    get_settings.cache_clear()


def test_rollback_walks_back_one_champion_at_a_time(registry):
    assert rollback("m")["to_version"] == "2"
    assert registry.get_model_version_by_alias("m", CHAMPION).version == 2
    assert rollback("m")["to_version"] == "1"
    with pytest.raises(TumorScopeError, match="no earlier champion"):
        rollback("m")


def test_rollback_without_a_champion_is_a_clear_error(registry):
    registry.delete_registered_model_alias("m", CHAMPION)
    with pytest.raises(TumorScopeError, match="no 'champion'"):
        rollback("m")
