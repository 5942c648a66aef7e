"""Feedback: served slices a clinician has labelled become a training data set.

Every run exports the labelled predictions whose slice was kept by the endpoint into
``<feedback_dir>/<label>/<prediction_id>.png`` with a ``metadata.csv`` of their subgroup
labels. The folder is a DVC output, so new labels make a new data version (its hash in
``dvc.lock``; ``dvc push`` stores it) and ``dvc repro`` retrains from ingest on; when no
label has arrived the output is unchanged and nothing downstream reruns. Ingest adds these
images to the training split only, so the held-out test set stays fixed across retrainings.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from components.config import FeedbackConfig, load_params
from components.errors import TumorScopeError
from components.predictions import PredictionLog
from components.settings import get_settings

METADATA = "metadata.csv"


@dataclass(frozen=True)
class FeedbackResult:
    exported: int
    missing_images: int
    labels: dict[str, int]


def labelled_predictions(log_path: Path) -> pd.DataFrame:
    if not log_path.exists():
        return pd.DataFrame(columns=["prediction_id", "feedback_label", "sex", "site", "age_band"])
    return PredictionLog(log_path).labelled()


def run(config: FeedbackConfig, out: Path) -> FeedbackResult:
    settings = get_settings()
    labelled = labelled_predictions(settings.prediction_log_path)
    if len(labelled) < config.min_labels:
        labelled = labelled.iloc[:0]
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    rows, missing = [], 0
    for record in labelled.itertuples():
        source = settings.image_store_path / f"{record.prediction_id}.png"
        if not source.exists():
            missing += 1  # kept images can be pruned by retention; a label without its image cannot train
            continue
        target = out / record.feedback_label / source.name
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(source, target)
        rows.append({"file": f"{record.feedback_label}/{source.name}", "sex": record.sex, "site": record.site})
    pd.DataFrame(rows, columns=["file", "sex", "site"]).to_csv(out / METADATA, index=False)
    counts = pd.Series([r["file"].split("/")[0] for r in rows]).value_counts().to_dict() if rows else {}
    print(f"feedback: {len(rows)} labelled slices exported to {out} ({counts or 'none yet'}); {missing} labels without a kept image")
    return FeedbackResult(len(rows), missing, counts)


def main() -> None:
    from components.stage import run_stage

    def work() -> FeedbackResult:
        params = load_params()
        if params.ingest.feedback_dir is None:
            raise TumorScopeError("params.yaml: ingest.feedback_dir is not set (the feedback stage writes there)")
        return run(params.feedback, params.ingest.feedback_dir)

    run_stage(work)


if __name__ == "__main__":
    main()
