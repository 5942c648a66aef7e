"""Classification quality on clinician feedback, behind a small interface of our own (Evidently's API moves).

``classification_quality(frame)`` reads the feedback label and the predicted label of
served predictions, scores tumour versus no tumour (the clinical question, for two classes
or four), and returns the named metrics with the Evidently snapshot that shows them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from components.config import NO_TUMOUR

TUMOUR, METRICS = "tumour", ("Accuracy", "Precision", "Recall", "F1Score", "TPR", "TNR", "FPR", "FNR")


@dataclass
class QualityResult:
    samples: int
    metrics: dict[str, float]  # accuracy, sensitivity (TPR), specificity (TNR), ...
    snapshot: object = None

    def save(self, html: Path, json_path: Path) -> None:
        self.snapshot.save_html(str(html))
        self.snapshot.save_json(str(json_path))


def classification_quality(frame: pd.DataFrame, target: str = "feedback_label", prediction: str = "predicted_label") -> QualityResult:
    from evidently import BinaryClassification, DataDefinition, Dataset, Report
    from evidently.presets import ClassificationPreset

    binary = pd.DataFrame(
        {
            "target": frame[target].ne(NO_TUMOUR).map({True: TUMOUR, False: NO_TUMOUR}),
            "prediction": frame[prediction].ne(NO_TUMOUR).map({True: TUMOUR, False: NO_TUMOUR}),
        }
    )
    definition = DataDefinition(
        classification=[BinaryClassification(target="target", prediction_labels="prediction", pos_label=TUMOUR)],
        categorical_columns=["target", "prediction"],
    )
    snapshot = Report([ClassificationPreset()]).run(
        current_data=Dataset.from_pandas(binary, data_definition=definition), reference_data=None
    )
    values = {}
    for metric in snapshot.dict()["metrics"]:
        name = metric["config"]["type"].rsplit(":", 1)[-1]
        if name in METRICS and isinstance(metric["value"], int | float):
            values[name] = float(metric["value"])
    named = {
        "accuracy": values.get("Accuracy"),
        "sensitivity": values.get("TPR"),
        "specificity": values.get("TNR"),
        "f1": values.get("F1Score"),
    }
    return QualityResult(len(frame), named, snapshot)
