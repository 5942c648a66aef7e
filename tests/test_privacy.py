"""No identifier survives a run: the whole pipeline on identifier-bearing DICOMs, then every byte it wrote
(data, reports, models, MLflow store, Prefect and BentoML homes, the bento) and its console output are
scanned for the original values."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.conftest import QUICK_REPORTS, make_workspace, workspace_env
from tests.dicom_fixtures import PHI, fixed_uid, write_series

pytestmark = pytest.mark.slow

PATIENTS = 10


def _patient_id(i: int) -> str:
    return f"MRN-{4711000 + i}"


def _series_uid(i: int) -> str:
    return fixed_uid("privacy-series", str(i))


def _dicom_export(root: Path) -> Path:
    """Ten patients, one 4-slice series each, with the planted identifiers and patient-specific pixels."""
    from scipy import ndimage

    for i in range(PATIENTS):
        label = ["notumor", "tumor"][i % 2]
        paths = write_series(root / label / f"export{i}", n_slices=4, series_uid=_series_uid(i), patient_id=_patient_id(i))
        texture = ndimage.gaussian_filter(np.random.default_rng(i).random((64, 64)), 3)
        head = np.hypot(*np.mgrid[-32:32, -32:32]) < 26
        for k, path in enumerate(paths):
            ds = pydicom.dcmread(path)
            pixels = head * ((texture - texture.min()) / np.ptp(texture) * 1500 + 500 + 100 * k + 400 * (i % 2) * (np.arange(64) > 32))
            ds.PixelData = pixels.astype(np.int16).tobytes()
            ds.save_as(path)
    return root


def _identifiers() -> list[str]:
    values = [str(v) for v in PHI.values()]
    values += [_patient_id(i) for i in range(PATIENTS)] + [_series_uid(i) for i in range(PATIENTS)]
    values += [part for v in (PHI["PatientName"], PHI["ReferringPhysicianName"]) for part in v.split("^") if len(part) > 3]
    return values


def test_the_planted_identifiers_cannot_turn_up_by_chance():
    """A run writes tens of megabytes: thousands of timestamps with six-digit fractions, compressed images, Data
    Docs. A digit-only value under eight characters can match a timestamp, and a word of four or five letters can
    occur in that much output by chance; only a leak may find a planted value."""
    assert not [value for value in _identifiers() if len(value) < 6 or (value.isdigit() and len(value) < 8)]


def test_no_identifier_reaches_any_output_of_a_run_on_identifier_bearing_dicoms(tmp_path: Path):
    source = _dicom_export(tmp_path / "hospital-export")
    params = QUICK_REPORTS | {
        "ingest": {"source": str(source), "format": "dicom", "volume": {"spacing": [0.3125, 0.3125, 2.0], "slices_take_volume_label": True}},
        "validate": {"min_images": 10, "min_image_side": 16},
        "split": {"folds": 0, "val_fraction": 0.2, "test_fraction": 0.2},
        "features": {"image_size": 32},
        "train": {"image_size": 32, "epochs": 1, "batch_size": 8, "channels": [8, 8, 16, 16], "patience": 1},
        "register": {"model_name": "tumorscope-dicom", "min_accuracy": 0, "min_sensitivity": 0, "min_specificity": 0, "min_auc": 0,
                     "min_subgroup_sensitivity": 0, "tolerance": 1.0},
    }  # fmt: skip
    root = make_workspace(tmp_path / "workspace", params)
    command = [sys.executable, "-m", "components.cli", "run", "--workdir", str(root)]
    result = subprocess.run(command, cwd=root, env=workspace_env(root), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "gate" in result.stdout.lower()

    written = [p for p in root.rglob("*") if p.is_file() and ".git" not in p.parts]
    assert any(p.name == "mlflow.db" for p in written) and any(p.suffix == ".png" for p in written)
    leaks = _scan(written, root)
    console = result.stdout + result.stderr
    leaks += [f"console: {value}" for value in _identifiers() if value in console]
    assert not leaks, "identifiers found:\n" + "\n".join(leaks[:20])
    # the scanner itself works: it finds every planted value in the export the run started from
    found_in_source = {leak.split(": ", 1)[1] for leak in _scan([p for p in source.rglob("*") if p.is_file()], source)}
    planted = {str(v) for k, v in PHI.items() if k not in ("PatientID", "SeriesInstanceUID")}  # each series got its own
    assert planted <= found_in_source


def _scan(files: list[Path], root: Path) -> list[str]:
    leaks = []
    for path in files:
        content, name = path.read_bytes(), str(path.relative_to(root))
        leaks += [f"{name}: {value}" for value in _identifiers() if value.encode() in content or value in name]
    return leaks
