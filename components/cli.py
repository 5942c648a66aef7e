"""``tumorscope``: one command line for the whole platform.

Heavy libraries (torch, monai, mlflow, prefect, evidently, great_expectations)
are imported inside the commands, so ``tumorscope --help`` answers at once.
Every command runs in the current workspace (the folder holding dvc.yaml).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from components.errors import TumorScopeError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="TumorScope: brain-tumour detection in MRI, from raw slices to a served, monitored model.",
)
Workspace = Annotated[Path, typer.Option("--workdir", "-C", help="Workspace with dvc.yaml and params.yaml.")]


UNREADABLE_SHOWN = 10  # batch prediction names this many unreadable files on stderr; the CSV lists all


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)


def _result(state) -> dict:
    """A finished flow's result, or its failure message as one line (the flow already logged the details)."""
    if state.is_failed():
        _fail(state.message)
    return state.result()


def _enter(workdir: Path) -> Path:
    root = workdir.resolve()
    if not (root / "dvc.yaml").exists():
        _fail(f"{root}: no dvc.yaml here; run from the TumorScope workspace or pass --workdir")
    os.chdir(root)
    from components.settings import apply_runtime_env

    apply_runtime_env(root)
    return root


def _print_summary(summary: dict, root: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    stages = Table(title="Stages", show_header=True)
    for column in ("stage", "status", "seconds"):
        stages.add_column(column)
    for stage in summary.get("stages", []):
        stages.add_row(stage["stage"], stage["status"], str(stage["seconds"]))
    console.print(stages)
    metrics = Table(title="Test metrics (tumour vs no tumour; accuracy over all classes)")
    metrics.add_column("metric")
    metrics.add_column("value", justify="right")
    for name, value in (summary.get("metrics") or {}).items():
        metrics.add_row(name, f"{value:.4f}" if name != "test_images" else f"{value:.0f}")
    console.print(metrics)
    gate, package = summary.get("gate") or {}, summary.get("package") or {}
    verdict = "[green]promoted to champion[/]" if gate.get("promoted") else "[yellow]refused, champion unchanged[/]"
    console.print(f"Gate: {gate.get('model_name')} version {gate.get('candidate_version')} {verdict}")
    for reason in gate.get("reasons", []):
        console.print(f"  - {reason}")
    console.print(
        f"Serving: bento [bold]{package.get('bento')}[/] with {package.get('registered_model')} version {package.get('model_version')}"
    )
    console.print(f"Reports: {root / 'reports'} (validation Data Docs: reports/validation/gx/uncommitted/data_docs/local_site/index.html)")
    console.print(f"MLflow UI: .venv/bin/mlflow ui --backend-store-uri sqlite:///{root / 'mlflow.db'} --host 127.0.0.1")


# Real slice sets need the looser near-duplicate threshold: on masoud-224, 0.97 groups 2,546 images into
# near-duplicate groups and 0.98 only 1,863 (before mirrored copies counted; neighbouring slices correlate 0.97-0.98). The synthetic default
# (0.98 in params.yaml) is stricter because its subjects share one anatomy template.
REAL_DATA_DUPLICATE_CORRELATION = 0.97


ParamsChange = Callable[[dict], str]  # changes params.yaml's content in place; says what it changed


def _rewrite_params(changes: list[ParamsChange]) -> None:
    """params.yaml read, changed by ``changes`` and written back, its comments kept: the values a command sets
    become the workspace's versioned params, so `dvc repro` reproduces them. All or nothing: the result is checked
    first, so a refused change (a value out of range, a conflict) leaves the file as it was."""
    import io

    import yaml as safe_yaml
    from ruamel.yaml import YAML

    from components.config import checked_params

    yaml = YAML()
    params_file = Path("params.yaml")
    params = yaml.load(params_file.read_text())
    said = [change(params) for change in changes]
    written = io.StringIO()
    yaml.dump(params, written)
    checked_params(safe_yaml.safe_load(written.getvalue()), params_file)  # as every stage will read it
    params_file.write_text(written.getvalue())
    for line in said:
        typer.echo(f"params.yaml: {line}")


def _folder(data: Path) -> Path:
    source = data.resolve()
    if not source.is_dir():
        _fail(f"{data}: not a folder")
    return source


def _data_source(data: Path, model_name: str | None) -> ParamsChange:
    """The data source, a registered-model name for it, and the real-data near-duplicate threshold."""
    source = _folder(data)
    slug = re.sub(r"[^a-z0-9]+", "-", f"{source.parent.name}-{source.name}".lower()).strip("-")

    def point(params: dict) -> str:
        params["ingest"]["source"] = str(source)
        params["register"]["model_name"] = model_name or f"tumorscope-{slug}"
        params["ingest"]["duplicate_correlation"] = REAL_DATA_DUPLICATE_CORRELATION
        return (
            f"ingest.source = {source}; register.model_name = {params['register']['model_name']}; "
            f"ingest.duplicate_correlation = {REAL_DATA_DUPLICATE_CORRELATION}"
        )

    return point


def _pretraining_source(data: Path | None) -> ParamsChange:
    """pretrain.source: the set the network learns first, or none (training starts from fresh weights)."""
    source = None if data is None else _folder(data)

    def point(params: dict) -> str:
        params.setdefault("pretrain", {})["source"] = None if source is None else str(source)
        return f"pretrain.source = {source if source is not None else 'null (no pretraining)'}"

    return point


def _preset(preset: str) -> ParamsChange:
    """A data set's tuned settings merged over params.yaml's."""
    from components.config import checked_params, merge_into, preset_overrides

    path, overrides = preset_overrides(preset)

    def merge(params: dict) -> str:
        unknown = sorted(set(overrides) - set(params))
        if unknown:
            _fail(f"{path}: unknown params.yaml sections {unknown}")
        merge_into(params, overrides)
        checked_params(params, path)  # applied last: what is wrong now is named in the preset's terms
        return f"{path.name} applied ({', '.join(f'{k}.*' for k in overrides)})"

    return merge


@app.command()
def run(
    data: Annotated[
        Path | None, typer.Option(help="A folder of class folders to train on instead of the synthetic cohort (written into params.yaml).")
    ] = None,
    model_name: Annotated[str | None, typer.Option(help="Registered model name for --data (default: from the folder name).")] = None,
    preset: Annotated[
        str | None,
        typer.Option(help="Settings tuned for a data set: masoud, lgg (params/<name>.yaml) or a YAML file, merged into params.yaml."),
    ] = None,
    pretrain_data: Annotated[
        Path | None,
        typer.Option(
            help="Another labelled set of brain MRI (other patients) that the network learns first; training starts from "
            "those weights (written into params.yaml as pretrain.source)."
        ),
    ] = None,
    no_pretrain: Annotated[
        bool, typer.Option("--no-pretrain", help="Train from fresh weights again (pretrain.source: null in params.yaml).")
    ] = False,
    force_from: Annotated[str | None, typer.Option(help="Rerun this stage and all later ones even if up to date.")] = None,
    workdir: Workspace = Path("."),
) -> None:
    """Run the whole training pipeline as a Prefect flow over the DVC stages.

    Reads params.yaml and the data source; writes data/, models/, models_calibrated/, reports/, the MLflow
    store (mlflow.db, mlartifacts/) and a built bento (.bentoml/), then prints a summary.
    """
    root = _enter(workdir)
    if pretrain_data is not None and no_pretrain:
        _fail("--pretrain-data and --no-pretrain: choose one")
    from components.config import load_params

    try:
        changes = [_data_source(data, model_name)] if data is not None else []
        if pretrain_data is not None or no_pretrain:
            changes.append(_pretraining_source(pretrain_data))
        if preset is not None:
            changes.append(_preset(preset))
        if changes:
            _rewrite_params(changes)  # checks the result before writing it
        else:
            load_params()  # a value out of range or a conflict (pretrain.source with train.init_weights) fails here, before any stage runs
    except TumorScopeError as error:
        _fail(str(error))
    from flows.training import training

    _print_summary(_result(training(workdir=str(root), force_from=force_from, return_state=True)), root)


@app.command()
def stage(
    name: Annotated[
        str,
        typer.Argument(help="A stage of dvc.yaml, e.g. train (an unknown name lists them all)."),
    ],
    workdir: Workspace = Path("."),
) -> None:
    """Run one DVC stage (and nothing else) with `dvc repro --single-item`; reads and writes what dvc.yaml says."""
    import subprocess

    root = _enter(workdir)
    from flows.training import STAGES, stage_env

    if name not in STAGES:
        _fail(f"unknown stage '{name}' (stages: {', '.join(STAGES)})")
    code = subprocess.call([sys.executable, "-m", "dvc", "repro", "--single-item", name], env=stage_env(root))
    raise typer.Exit(code)


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="Folder to write <label>/*.png, masks/ and metadata.csv into.")] = Path("data/synth-extra"),
    subjects: Annotated[int, typer.Option(min=4)] = 100,
    shift: Annotated[str, typer.Option(help="none, scanner, prevalence or lesion_size.")] = "none",
    seed: int = 7,
    image_size: int = 128,
    slices_per_subject: Annotated[int, typer.Option(min=1, max=8)] = 2,
    volumes: Annotated[bool, typer.Option(help="Also write one 3D NIfTI volume (+ mask) per subject under OUT/volumes/.")] = False,
) -> None:
    """Generate a synthetic cohort (e.g. drifted traffic for monitoring); reads nothing, writes OUT."""
    from components.config import SynthConfig
    from components.synth import run as generate

    try:
        config = SynthConfig(
            out=out,
            subjects=subjects,
            shift=shift,
            seed=seed,
            image_size=image_size,
            slices_per_subject=slices_per_subject,
            volumes=volumes,
        )
    except ValueError as exc:
        _fail(str(exc))
    metadata = generate(config, progress=True)
    typer.echo(f"wrote {len(metadata)} slices to {out}")


@app.command()
def ingest(
    source: Annotated[Path, typer.Option(help="Class folders, an LGG/kaggle_3m folder, NIfTI volumes, or DICOM (folder or .zip).")],
    format: Annotated[str, typer.Option(help="auto | folders | lgg | nifti | dicom")] = "auto",
    out: Annotated[Path, typer.Option(help="Manifest CSV to write.")] = Path("data/adhoc/manifest.csv"),
) -> None:
    """Ingest data outside the pipeline: reads SOURCE, writes the manifest, quarantine list and derived
    slices/volumes next to OUT. Volume preprocessing follows params.yaml's ingest.volume when present.
    Image paths inside the current folder are written relative to it (as the pipeline's are), others absolute."""
    from pydantic import ValidationError

    from components.config import PARAMS_FILE, IngestConfig, load_params
    from components.ingest import run as ingest_source
    from components.settings import apply_runtime_env

    apply_runtime_env()
    try:
        base = load_params().ingest if PARAMS_FILE.exists() else IngestConfig()
        config = IngestConfig.model_validate(
            base.model_dump()
            | {
                "source": source,
                "format": format,
                "out": out,
                "derived_dir": out.parent / "derived",
                "cache_dir": None,
                "feedback_dir": None,
            }
        )
        ingest_source(config, progress=True)
    except TumorScopeError as exc:
        _fail(str(exc))
    except ValidationError as exc:
        _fail(f"--format: {exc.errors()[0]['msg']}")


@app.command()
def predict(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            help="Slices (png, jpg, tif), NIfTI volumes (.nii, .nii.gz), DICOM (files, series folders, .zip) or folders of them."
        ),
    ],
    out: Annotated[Path, typer.Option(help="CSV to write.")] = Path("predictions.csv"),
    model: Annotated[
        str, typer.Option(help="'champion' (registry alias) or a calibrated model's folder (models_calibrated).")
    ] = "champion",
    workdir: Workspace = Path("."),
) -> None:
    """Batch prediction: reads images and the model; writes path, predicted_label, confidence, prob_<class>.
    A volume gives a row per brain slice (<file>#z<index>) and a row for the volume (its most suspicious slice).
    Files that cannot be read are listed, with why, in <out>.unreadable.csv, and the exit status is 1."""
    from components.batch import predict_files

    files, out = [path.resolve() for path in inputs], out.resolve()
    existed = out.exists()
    _refuse_unwritable(out)
    _enter(workdir)
    try:
        predicted = predict_files(files, model)
    except TumorScopeError as exc:
        if not existed:
            out.unlink(missing_ok=True)  # the empty file the check made
        _fail(str(exc))
    predicted.rows.to_csv(out, index=False)
    typer.echo(f"wrote {len(predicted.rows)} predictions to {out}")
    if predicted.unreadable:
        _report_unreadable(predicted.unreadable, out.with_name(f"{out.name.removesuffix('.csv')}.unreadable.csv"))


def _refuse_unwritable(out: Path) -> None:
    """Refuses an output that cannot be written before hours of predicting, not after (opened for append: an
    existing file keeps its content until the predictions replace it)."""
    try:
        with out.open("a"):
            pass
    except OSError as exc:
        _fail(f"{out}: cannot write the predictions there ({exc.strerror or exc.__class__.__name__})")


def _report_unreadable(unreadable: list, listing: Path) -> None:
    """Names the files left out, and why, on stderr (the first few) and in a CSV (all); exits 1 so a script notices."""
    import pandas as pd

    pd.DataFrame({"path": [exc.path for exc in unreadable], "problem": [exc.problem for exc in unreadable]}).to_csv(listing, index=False)
    for exc in unreadable[:UNREADABLE_SHOWN]:
        typer.secho(f"unreadable: {exc}", err=True, fg=typer.colors.YELLOW)
    more = f" ({len(unreadable) - UNREADABLE_SHOWN} more there)" if len(unreadable) > UNREADABLE_SHOWN else ""
    typer.secho(
        f"{len(unreadable)} file(s) could not be read and have no prediction: listed in {listing}{more}", err=True, fg=typer.colors.RED
    )
    raise typer.Exit(1)


@app.command()
def serve(
    port: int = 3000,
    bento: Annotated[str | None, typer.Option(help="Bento tag (default: the one the last run packaged).")] = None,
    workdir: Workspace = Path("."),
) -> None:
    """Serve the packaged champion with `bentoml serve` on 127.0.0.1; predictions go to data/predictions.sqlite."""
    import json
    import shutil

    root = _enter(workdir)
    package = root / "reports" / "package.json"
    if bento is None and not package.exists():
        _fail("no packaged bento yet: run `tumorscope run` first")
    tag = bento or json.loads(package.read_text())["bento"]
    _refuse_busy_port(port)
    os.environ.setdefault("TUMORSCOPE_PREDICTION_LOG", str(root / "data" / "predictions.sqlite"))
    executable = shutil.which("bentoml", path=str(Path(sys.executable).parent)) or "bentoml"
    os.execv(executable, [executable, "serve", tag, "--host", "127.0.0.1", "--port", str(port)])


def _refuse_busy_port(port: int) -> None:
    """One line instead of bentoml's traceback from deep in its process manager when the port is taken."""
    import socket

    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            _fail(f"127.0.0.1:{port}: cannot serve there ({exc.strerror}; another endpoint?): choose another with --port")


@app.command()
def monitor(
    retrain: Annotated[bool, typer.Option(help="Start the training flow when drift is detected.")] = True,
    cooldown_hours: Annotated[float | None, typer.Option(help="Override monitor.cooldown_hours for this check.")] = None,
    service_url: Annotated[
        str | None, typer.Option(help="A running endpoint to reload after a promotion (or TUMORSCOPE_SERVICE_URL).")
    ] = None,
    workdir: Workspace = Path("."),
) -> None:
    """Run the monitoring flow once: reads the prediction log and data/reference.csv, writes reports/monitoring/."""
    root = _enter(workdir)
    os.environ.setdefault("TUMORSCOPE_PREDICTION_LOG", str(root / "data" / "predictions.sqlite"))
    from flows.monitoring import monitoring

    state = monitoring(workdir=str(root), retrain=retrain, cooldown_hours=cooldown_hours, service_url=service_url, return_state=True)
    decision = _result(state)
    typer.echo(("retrained: " if decision["retrained"] else "no retraining: ") + "; ".join(decision["reasons"]))
    typer.echo(f"report: {decision.get('report_html') or '(none)'}")


@app.command()
def retrain(workdir: Workspace = Path(".")) -> None:
    """Run the training flow from the train stage on, even if DVC thinks it current; the gate decides on promotion."""
    root = _enter(workdir)
    from flows.training import training

    _print_summary(_result(training(workdir=str(root), force_from="train", return_state=True)), root)


@app.command()
def rollback(workdir: Workspace = Path(".")) -> None:
    """Move the champion alias back to the previous champion (from .tumorscope/promotions.jsonl) and rebuild the bento."""
    import subprocess

    root = _enter(workdir)
    from components.config import load_params
    from components.register import rollback as roll_back
    from flows.training import stage_env

    try:
        entry = roll_back(load_params().register_.model_name)
    except TumorScopeError as exc:
        _fail(str(exc))
    typer.echo(f"champion of {entry['model_name']}: version {entry['from_version']} -> {entry['to_version']}; rebuilding the bento")
    raise typer.Exit(subprocess.call([sys.executable, "-m", "components.package"], env=stage_env(root)))


@app.command()
def tune(
    trials: Annotated[int | None, typer.Option(help="Trials to add to the study (default: tune.trials in params.yaml).")] = None,
    apply: Annotated[bool, typer.Option(help="Write the best values into params.yaml's train section.")] = False,
    workdir: Workspace = Path("."),
) -> None:
    """Optuna study over tune.space, each trial scored by subject-grouped cross-validation (SQLite, MLflow child runs)."""
    root = _enter(workdir)
    from flows.tuning import tuning

    _result(tuning(workdir=str(root), trials=trials, apply=apply, return_state=True))


keys = typer.Typer(no_args_is_help=True, help="API keys of the endpoint (stored hashed; a key is shown once).")
app.add_typer(keys, name="keys")


def _key_store():
    from components.settings import get_settings
    from serving.auth import KeyStore

    return KeyStore(get_settings().api_keys_path)


@keys.command("create")
def create_key(
    name: Annotated[str, typer.Option(help="Who uses it: a system or a team, never a patient.")],
    scope: Annotated[list[str], typer.Option(help="predict, explain, feedback, admin (repeat the option).")],
    workdir: Workspace = Path("."),
) -> None:
    """Make a key; it is printed once and only its hash is kept. Once a key exists, the endpoint requires one."""
    _enter(workdir)
    try:
        key = _key_store().create(name, scope)
    except ValueError as exc:
        _fail(str(exc))
    typer.echo(key)


@keys.command("list")
def list_keys(workdir: Workspace = Path(".")) -> None:
    """The keys' ids, names and scopes (never the keys)."""
    _enter(workdir)
    for stored in _key_store().keys().values():
        typer.echo(f"{stored.key_id}  {stored.name:24s}  {','.join(stored.scopes):32s}  created {stored.created}")


@keys.command("revoke")
def revoke_key(key_id: str, workdir: Workspace = Path(".")) -> None:
    """Remove a key by its id; a running endpoint refuses it from the next request on."""
    _enter(workdir)
    if not _key_store().revoke(key_id):
        _fail(f"no key with id {key_id}")
    typer.echo(f"revoked {key_id}")


if __name__ == "__main__":
    app()
