"""The TumorScope endpoint: one uploaded slice in, a labelled prediction out.

Every answer names the model version behind it and is written to the
prediction log (image statistics and output only: no file name, no identifier)
for drift monitoring. Bad uploads get a 4xx that says what is wrong.

    curl -F image=@slice.png http://127.0.0.1:3000/predict
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path

import bentoml
from bentoml.exceptions import BentoMLException

with bentoml.importing():
    from components.errors import DataError
    from components.fairness import AGE_BANDS
    from components.imaging import read_slice, slice_stats
    from components.model import Classifier, tumour_probability
    from components.predictions import PredictionLog
    from components.settings import get_settings

from serving.guard import UploadGuard

BENTO_MODEL = os.environ.get("TUMORSCOPE_BENTO_MODEL", "tumorscope-classifier")
MAX_UPLOAD_BYTES = int(os.environ.get("TUMORSCOPE_MAX_UPLOAD_BYTES", 20 * 1024 * 1024))
REVIEW_BELOW_CONFIDENCE = float(os.environ.get("TUMORSCOPE_REVIEW_BELOW_CONFIDENCE", 0.7))
SITE_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,32}")
IMAGE_SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}


def _refuse(status: HTTPStatus, message: str) -> BentoMLException:
    return BentoMLException(message, error_code=status)


def read_upload(path: Path) -> bytes:
    """The upload's bytes, refused early when too large, empty or not an image format we read."""
    size = path.stat().st_size
    if size > MAX_UPLOAD_BYTES:
        raise _refuse(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"upload is {size} bytes; the limit is {MAX_UPLOAD_BYTES}")
    data = path.read_bytes()
    if not data:
        raise _refuse(HTTPStatus.UNPROCESSABLE_ENTITY, "upload is empty")
    if not any(data.startswith(signature) for signature in IMAGE_SIGNATURES):
        raise _refuse(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "unsupported file type: send a PNG, JPEG or TIFF slice")
    return data


def checked_subgroups(age_band: str | None, sex: str | None, site: str | None) -> dict:
    """Subgroup labels from closed vocabularies only, so no free text (a name, an ID) reaches the log."""
    allowed = {"age_band": set(AGE_BANDS[1]), "sex": {"F", "M"}}
    values = {"age_band": age_band, "sex": sex, "site": site}
    for field, value in values.items():
        if value is None:
            continue
        if (field in allowed and value not in allowed[field]) or (field == "site" and not SITE_PATTERN.fullmatch(value)):
            expected = sorted(allowed[field]) if field in allowed else "a site code of letters, digits, '-', '_' (≤ 32)"
            raise _refuse(HTTPStatus.UNPROCESSABLE_ENTITY, f"{field}: not one of {expected}")
    return values


def review_reason(confidence: float, stats: dict[str, float]) -> str | None:
    """Why a clinician should look before anyone acts on this answer, if they should."""
    if stats["std"] < 0.02 or stats["foreground"] < 0.02:
        return "image is nearly blank: probably not a brain MRI slice"
    if confidence < REVIEW_BELOW_CONFIDENCE:
        return f"low confidence ({confidence:.2f} < {REVIEW_BELOW_CONFIDENCE})"
    return None


@bentoml.service(resources={"cpu": "1"}, traffic={"timeout": 30})
class TumorScope:
    bento_model = bentoml.models.BentoModel(f"{BENTO_MODEL}:latest")

    def __init__(self) -> None:
        folder = Path(self.bento_model.path)
        self.classifier = Classifier.load(folder)
        identity = json.loads((folder / "model.json").read_text())
        self.model_name = identity.get("registered_model", BENTO_MODEL)
        self.model_version = identity.get("model_version", str(self.bento_model.tag.version))
        self.log = PredictionLog(get_settings().prediction_log_path)

    @bentoml.api
    def predict(self, image: Path, age_band: str | None = None, sex: str | None = None, site: str | None = None) -> dict:
        """Classify one 2D MRI slice (PNG, JPEG or TIFF).

        ``age_band``, ``sex`` and ``site`` are optional subgroup labels (never identifiers);
        they are recorded so monitoring can compare quality across subgroups.
        """
        started = time.perf_counter()
        data = read_upload(image)
        try:
            pixels = read_slice(data, name="upload")
        except DataError as exc:
            raise _refuse(HTTPStatus.UNPROCESSABLE_ENTITY, str(exc)) from None
        subgroups = checked_subgroups(age_band, sex, site)
        probabilities = self.classifier.predict_proba([pixels])[0]
        stats = slice_stats(pixels)
        answer = self._answer(probabilities, stats)
        self._record(answer, data, {**stats, **subgroups}, started)
        return answer

    @bentoml.api
    def feedback(self, prediction_id: str, label: str) -> dict:
        """A clinician confirms or corrects a prediction; the label feeds monitoring and the next data version."""
        if label not in self.classifier.spec.classes:
            raise _refuse(HTTPStatus.UNPROCESSABLE_ENTITY, f"label must be one of {self.classifier.spec.classes}")
        if not self.log.add_feedback(prediction_id, label, datetime.now(UTC).isoformat(timespec="milliseconds")):
            raise _refuse(HTTPStatus.NOT_FOUND, f"no prediction with id {prediction_id!r}")
        return {"prediction_id": prediction_id, "feedback_label": label, "stored": True}

    def _answer(self, probabilities, stats: dict[str, float]) -> dict:
        classes = self.classifier.spec.classes
        confidence = float(probabilities.max())
        reason = review_reason(confidence, stats)
        return {
            "prediction_id": uuid.uuid4().hex,
            "label": classes[int(probabilities.argmax())],
            "probabilities": {name: float(p) for name, p in zip(classes, probabilities)},
            "confidence": confidence,
            "tumour_probability": float(tumour_probability(probabilities[None], self.classifier.spec)[0]),
            "model_name": self.model_name,
            "model_version": self.model_version,
            "needs_review": reason is not None,
            "review_reason": reason,
        }

    def _record(self, answer: dict, data: bytes, stats: dict, started: float) -> None:
        self.log.append(
            {
                **answer,
                **stats,
                "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "predicted_label": answer["label"],
                "input_sha256": hashlib.sha256(data).hexdigest(),
                "needs_review": int(answer["needs_review"]),
                "latency_ms": (time.perf_counter() - started) * 1000,
            }
        )


TumorScope.add_asgi_middleware(UploadGuard, routes={"/predict": "image"}, max_bytes=MAX_UPLOAD_BYTES)
