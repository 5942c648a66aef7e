"""Validate: Great Expectations gates between ingestion and training.

Three tables are checked: the manifest (schema, IDs, intensities, sizes,
demographic ranges), the class balance and a one-row ingestion summary
(unreadable fraction, class count). A failed gate stops the pipeline before
training with a readable list of what failed; Data Docs HTML lands in the report
folder either way. A suite that evaluated nothing counts as a failure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from components.config import LABEL_CONFLICT, NO_TUMOUR, QUARANTINE_COLUMNS, ValidateConfig, load_params
from components.errors import DataError, TumorScopeError
from components.imaging import portable_path

AXIS_CODES = r"^(?:[RL][AP][SI]|[RL][SI][AP]|[AP][RL][SI]|[AP][SI][RL]|[SI][RL][AP]|[SI][AP][RL])$"  # a valid orientation, e.g. LPS
QC_COLUMNS = ["image_id", "label", "width", "height", "channels", "sequences", "spacing_x", "spacing_y", "spacing_z", "source_orientation",
              "source_spacing", "mean", "std", "p01", "p50", "p99", "foreground"]  # fmt: skip
REQUIRED_COLUMNS = ["image_id", "subject", "label", "path", "width", "height", "mean", "std", "p01", "p50", "p99", "duplicate_group"]


@dataclass
class ValidationOutcome:
    success: bool
    evaluated: int
    failures: list[str] = field(default_factory=list)
    data_docs: str = ""
    quarantined: list[dict] = field(default_factory=list)  # pseudonym and reason; the files are in quarantine.csv


def _manifest_expectations(config: ValidateConfig, manifest: pd.DataFrame) -> list:
    import great_expectations.expectations as gxe

    checks = [
        gxe.ExpectTableRowCountToBeBetween(min_value=config.min_images),
        gxe.ExpectTableColumnsToMatchSet(column_set=REQUIRED_COLUMNS, exact_match=False),
        gxe.ExpectColumnValuesToNotBeNull(column="image_id"),
        gxe.ExpectColumnValuesToBeUnique(column="image_id"),
        gxe.ExpectColumnValuesToNotBeNull(column="subject"),
        gxe.ExpectColumnValuesToNotBeNull(column="label"),
        gxe.ExpectColumnValuesToBeBetween(column="width", min_value=config.min_image_side),
        gxe.ExpectColumnValuesToBeBetween(column="height", min_value=config.min_image_side),
        gxe.ExpectColumnValuesToBeBetween(column="std", min_value=config.min_image_std, max_value=1.0, mostly=0.99),
    ]
    checks += [gxe.ExpectColumnValuesToBeBetween(column=c, min_value=0.0, max_value=1.0) for c in ("mean", "p01", "p50", "p99")]
    if "spacing_x" in manifest.columns:  # slices that ingestion's volume preprocessing cut (LGG's studies are volumes it did not)
        checks += _volume_expectations(config)
    if "age" in manifest.columns:
        checks.append(gxe.ExpectColumnValuesToBeBetween(column="age", min_value=0, max_value=120, mostly=0.95))
    if "sex" in manifest.columns:
        checks.append(gxe.ExpectColumnValuesToMatchRegex(column="sex", regex=r"^(?:F|M|code-\d+)$", mostly=0.95))
    return checks


def _volume_expectations(config: ValidateConfig) -> list:
    """Slices cut from volumes: one voxel spacing for all (resampling worked), a known source
    orientation, and the sequences the model needs."""
    import great_expectations.expectations as gxe

    checks = [
        gxe.ExpectColumnStdevToBeBetween(column=c, max_value=config.max_spacing_spread_mm) for c in ("spacing_x", "spacing_y", "spacing_z")
    ]
    checks += [gxe.ExpectColumnValuesToMatchRegex(column="source_orientation", regex=AXIS_CODES)]
    checks += [gxe.ExpectColumnValuesToBeBetween(column="channels", min_value=max(1, len(config.required_sequences)))]
    checks += [
        gxe.ExpectColumnValuesToMatchRegex(column="sequences", regex=rf"(?:^|\+){name}(?:\+|$)") for name in config.required_sequences
    ]
    return checks


def qc_table(manifest: pd.DataFrame, quarantine: pd.DataFrame, config: ValidateConfig) -> pd.DataFrame:
    """One row per image, read or refused: what QC saw and the verdict (no file names, only pseudonyms)."""
    columns = [c for c in QC_COLUMNS if c in manifest.columns]
    table = manifest[columns].copy()
    table["blank"] = table["std"] < config.min_image_std
    table["status"] = table["blank"].map({True: "blank", False: "ok"})
    refused = pd.DataFrame({"image_id": quarantine["image_id"], "status": "quarantined", "problem": quarantine["problem"]})
    return pd.concat([table, refused], ignore_index=True)


def _balance_expectations(config: ValidateConfig) -> list:
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectColumnValuesToBeBetween(column="fraction", min_value=config.min_class_fraction, max_value=1.0),
        gxe.ExpectColumnDistinctValuesToContainSet(column="label", value_set=[NO_TUMOUR]),
    ]


def _summary_expectations(config: ValidateConfig) -> list:
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectColumnValuesToBeBetween(column="unreadable_fraction", min_value=0.0, max_value=config.max_unreadable_fraction),
        gxe.ExpectColumnValuesToBeBetween(column="label_conflict_fraction", min_value=0.0, max_value=config.max_label_conflict_fraction),
        gxe.ExpectColumnValuesToBeBetween(column="classes", min_value=2),
    ]


def _tables(manifest: pd.DataFrame, quarantine: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The manifest, its class balance, and the share of the source quarantined by kind (a quarantine.csv from before
    the kinds: all unreadable)."""
    balance = manifest["label"].value_counts(normalize=True).rename("fraction").rename_axis("label").reset_index()
    conflicts = int((quarantine["kind"] == LABEL_CONFLICT).sum()) if "kind" in quarantine else 0
    total = len(quarantine) + len(manifest)
    summary = pd.DataFrame({
        "unreadable_fraction": [(len(quarantine) - conflicts) / total], "label_conflict_fraction": [conflicts / total],
        "classes": [manifest["label"].nunique()],
    })  # fmt: skip
    return {"manifest": manifest, "class_balance": balance, "ingest_summary": summary}


def _quiet_context(root: Path):
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="file", project_root_dir=str(root))
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    context.variables.save()
    return context


def check(config: ValidateConfig, manifest: pd.DataFrame, quarantine: pd.DataFrame) -> ValidationOutcome:
    """Run the three suites in one checkpoint; Data Docs go under ``config.report_dir``."""
    import great_expectations as gx

    context = _quiet_context(config.report_dir)
    source = context.data_sources.add_or_update_pandas("tumorscope")
    expectations = {
        "manifest": _manifest_expectations(config, manifest),
        "class_balance": _balance_expectations(config),
        "ingest_summary": _summary_expectations(config),
    }
    tables = _tables(manifest, quarantine)
    definitions = []
    for name, checks in expectations.items():
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
        suite = context.suites.add_or_update(gx.ExpectationSuite(name=f"{name}_suite", expectations=checks))
        definitions.append(context.validation_definitions.add_or_update(gx.ValidationDefinition(name=name, data=batch, suite=suite)))
    outcome = ValidationOutcome(success=True, evaluated=0)
    for name, definition in zip(expectations, definitions):
        result = definition.run(batch_parameters={"dataframe": tables[name]}, result_format="SUMMARY")
        outcome.evaluated += result.statistics["evaluated_expectations"]
        outcome.failures += [_explain(name, r) for r in result.results if not r.success]
        outcome.success &= bool(result.success)
    docs = context.build_data_docs()
    outcome.data_docs = next(iter(docs.values()), "")
    if outcome.evaluated == 0:
        outcome.success = False
        outcome.failures.append("no expectation was evaluated: the suite is broken")
    return outcome


def _explain(table: str, result) -> str:
    config = result.expectation_config
    kwargs = {k: v for k, v in config.kwargs.items() if k not in ("batch_id", "result_format")}
    sample = result.result.get("partial_unexpected_list") or result.result.get("observed_value")
    return f"{table}: {config.type} {kwargs} failed (found: {sample})"


def run(config: ValidateConfig) -> ValidationOutcome:
    if not config.manifest.exists():
        raise DataError(config.manifest, "manifest not found: run the ingest stage first")
    manifest = pd.read_csv(config.manifest)
    quarantine_file = config.manifest.with_name("quarantine.csv")
    quarantine = pd.read_csv(quarantine_file) if quarantine_file.exists() else pd.DataFrame(columns=QUARANTINE_COLUMNS)
    config.report_dir.mkdir(parents=True, exist_ok=True)
    qc_table(manifest, quarantine, config).to_csv(config.report_dir / "qc.csv", index=False)
    outcome = check(config, manifest, quarantine)
    outcome.quarantined = [{"image_id": r.image_id, "problem": r.problem} for r in quarantine.itertuples()]
    # relative: result.json is a DVC dependency of the split stage, and an absolute link differs between clones
    stored = outcome.__dict__ | {"data_docs": portable_path(Path(outcome.data_docs.removeprefix("file://")), config.report_dir)}
    (config.report_dir / "result.json").write_text(json.dumps(stored, indent=2))
    print(f"validation: {outcome.evaluated} expectations, {len(outcome.failures)} failed; Data Docs: {outcome.data_docs}")
    if not outcome.success:
        details = "\n  ".join(outcome.failures)
        raise TumorScopeError(f"{config.manifest}: data validation failed, training stopped:\n  {details}")
    return outcome


def main() -> None:
    from components.stage import run_stage

    run_stage(lambda: run(load_params().validate_))


if __name__ == "__main__":
    main()
