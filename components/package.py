"""Package: the registry's champion, built into a Bento with the serving code.

The Bento model holds the champion's weights, spec and model card, labelled with
its registered name and version, so a built Bento answers with the version it
serves (and describes it) even when no MLflow store is reachable.
"""

from __future__ import annotations

import json
from pathlib import Path

from components.config import PackageConfig, load_params
from components.errors import TumorScopeError
from components.registry import CHAMPION

BENTOFILE, PACKAGE_FILE = Path("serving/bentofile.yaml"), Path("reports/package.json")


def save_champion(config: PackageConfig, model_name: str) -> dict:
    """Copy the champion from MLflow into the BentoML model store."""
    import bentoml
    import torch

    from components.registry import client, load_version, version_by_alias

    champion = version_by_alias(client(), model_name, CHAMPION)
    if champion is None:
        raise TumorScopeError(f"registry: {model_name} has no '{CHAMPION}' yet: no model has passed the gate")
    from components.model_card import build_card, publish

    classifier = load_version(champion)
    identity = {"registered_model": model_name, "model_version": str(champion.version), "run_id": champion.run_id}
    card = build_card(model_name, champion.version, client().get_run(champion.run_id))
    with bentoml.models.create(config.bento_model, labels=identity, metadata={"classes": classifier.spec.classes}) as model:
        torch.save(classifier.net.state_dict(), model.path_of("model.pt"))
        Path(model.path_of("model.json")).write_text(json.dumps({**classifier.spec.model_dump(), **identity}, indent=2))
        if classifier.projection is not None:
            Path(model.path_of("embedding.json")).write_text(classifier.projection.model_dump_json())
        publish(card, Path(model.path))
    return {**identity, "bento_model": str(model.tag)}


def run(config: PackageConfig, model_name: str) -> dict:
    import bentoml

    if not BENTOFILE.exists():
        raise TumorScopeError(f"{BENTOFILE}: not found; run from the project workspace")
    packaged = save_champion(config, model_name)
    bento = bentoml.bentos.build_bentofile(str(BENTOFILE), build_ctx=".", labels={"model_version": packaged["model_version"]})
    packaged["bento"] = str(bento.tag)
    PACKAGE_FILE.parent.mkdir(parents=True, exist_ok=True)
    PACKAGE_FILE.write_text(json.dumps(packaged, indent=2))
    print(f"packaged {model_name} version {packaged['model_version']} as bento {bento.tag}")
    return packaged


def main() -> None:
    from components.stage import run_stage

    def work() -> dict:
        params = load_params()
        return run(params.package, params.register_.model_name)

    run_stage(work)


if __name__ == "__main__":
    main()
