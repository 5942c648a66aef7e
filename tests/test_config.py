from pathlib import Path

import pytest

from components.config import Params, load_params
from components.errors import TumorScopeError
from tests.conftest import PROJECT


def test_project_params_load_into_typed_sections():
    params = load_params(PROJECT / "params.yaml")
    assert isinstance(params, Params)
    assert params.train.epochs >= 1
    assert params.register_.model_name


def test_bad_value_names_key_value_and_expectation(tmp_path: Path):
    bad = tmp_path / "params.yaml"
    bad.write_text((PROJECT / "params.yaml").read_text().replace("epochs: ", "epochs: many #", 1))
    with pytest.raises(TumorScopeError) as error:
        load_params(bad)
    message = str(error.value)
    assert "train.epochs" in message and "'many'" in message and "integer" in message


def test_unknown_key_is_refused(tmp_path: Path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  epochz: 3\n")
    with pytest.raises(TumorScopeError, match="train.epochz"):
        load_params(bad)


def test_missing_params_file_says_where(tmp_path: Path):
    with pytest.raises(TumorScopeError, match="not found"):
        load_params(tmp_path / "params.yaml")


def test_mismatched_network_stages_are_refused(tmp_path: Path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  channels: [8, 16]\n  blocks: [1, 1, 1]\n")
    with pytest.raises(TumorScopeError, match="4"):
        load_params(bad)


def test_a_lesion_vote_without_a_lesion_map_is_refused(tmp_path: Path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  mask_weight: 0\ncalibrate:\n  lesion_vote: true\n")
    with pytest.raises(TumorScopeError, match="calibrate.lesion_vote.*train.mask_weight > 0"):
        load_params(bad)
    bad.write_text("train:\n  mask_weight: 0.5\ncalibrate:\n  lesion_vote: true\n")
    assert load_params(bad).calibrate.lesion_vote


def test_a_preset_merges_nested_keys_into_every_section_it_names(tmp_path):
    from components.config import params_with_preset

    base = tmp_path / "params.yaml"  # a neighbour off its default, so that replacing ingest.volume whole would show
    base.write_text((PROJECT / "params.yaml").read_text().replace("slice_sequences: [t1, flair, t1c]", "slice_sequences: [flair]"))
    preset = tmp_path / "site.yaml"
    preset.write_text("ingest:\n  volume:\n    crop_margin: 9\ncalibrate:\n  specificity_floor: 0.9\n")
    params = params_with_preset(str(preset), base)
    assert params.ingest.volume.crop_margin == 9 and params.ingest.volume.slice_sequences == ["flair"], "the rest kept"
    assert params.calibrate.specificity_floor == 0.9 and params.calibrate.target_sensitivity == 0.95
    preset.write_text("train:\n  specificity_floor: 0.9\n")
    with pytest.raises(TumorScopeError, match=r"site.yaml: train.specificity_floor = 0.9: .*moved to calibrate.specificity_floor"):
        params_with_preset(str(preset), base)


def _resolves(params: dict, dotted: str) -> bool:
    node = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


@pytest.mark.parametrize("preset", [None, "masoud", "lgg"])
def test_every_param_and_path_dvc_yaml_names_is_written_in_params_yaml(preset):
    """DVC reads params.yaml itself, not the typed defaults: a key it tracks that the file leaves to a default
    fails the stage (MissingParamsError), with a preset merged in or not."""
    import re

    import yaml

    from components.config import merge_into, preset_overrides
    from tests.conftest import PROJECT

    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    if preset is not None:
        merge_into(params, preset_overrides(preset)[1])
    dvc = (PROJECT / "dvc.yaml").read_text()
    named = {key for stage in yaml.safe_load(dvc)["stages"].values() for key in stage.get("params", [])}
    named |= set(re.findall(r"\$\{([^}]+)\}", dvc))
    assert named and not sorted(key for key in named if not _resolves(params, key))
