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
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path

import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException
from PIL import Image

with bentoml.importing():
    from components.errors import DataError
    from components.fairness import AGE_BANDS
    from components.imaging import read_slice, slice_stats
    from components.model import EMBEDDING_COLUMNS, Classifier, tumour_probability
    from components.predictions import PredictionLog
    from components.settings import get_settings

from serving.guard import UploadGuard

BENTO_MODEL = os.environ.get("TUMORSCOPE_BENTO_MODEL", "tumorscope-classifier")
MAX_UPLOAD_BYTES = int(os.environ.get("TUMORSCOPE_MAX_UPLOAD_BYTES", 20 * 1024 * 1024))
REVIEW_BELOW_CONFIDENCE = float(os.environ.get("TUMORSCOPE_REVIEW_BELOW_CONFIDENCE", 0.7))
SITE_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,32}")
IMAGE_SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}


@dataclass(frozen=True)
class ServedModel:
    classifier: Classifier
    name: str
    version: str
    tag: str


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


def qc_flags(stats: dict[str, float]) -> str:
    """Comma-separated quality flags of an input slice (empty when none), kept in the prediction log."""
    flags = []
    if stats["std"] < 0.02 or stats["foreground"] < 0.02:
        flags.append("blank")
    if stats["p99"] - stats["p01"] < 0.1:
        flags.append("low_contrast")
    if min(stats["width"], stats["height"]) < 64:
        flags.append("small")
    return ",".join(flags)


def review_reason(confidence: float, stats: dict[str, float]) -> str | None:
    """Why a clinician should look before anyone acts on this answer, if they should."""
    if stats["std"] < 0.02 or stats["foreground"] < 0.02:
        return "image is nearly blank: probably not a brain MRI slice"
    if confidence < REVIEW_BELOW_CONFIDENCE:
        return f"low confidence ({confidence:.2f} < {REVIEW_BELOW_CONFIDENCE})"
    return None


# Server mode serves the registry's champion (TUMORSCOPE_SERVE_REGISTERED_MODEL); otherwise the packaged model.
REGISTERED_MODEL = get_settings().serve_registered_model


def champion_from_registry(name: str, served: ServedModel | None = None) -> ServedModel:
    """The version holding the champion alias, from the MLflow tracking server (or store); ``served`` itself
    when it is that version already (nothing is downloaded)."""
    from components.registry import CHAMPION, client, load_version, version_by_alias

    version = version_by_alias(client(), name, CHAMPION)
    if version is None:
        raise RuntimeError(f"registry: {name} has no '{CHAMPION}' (no model has passed the gate yet)")
    if served is not None and served.name == name and served.version == str(version.version):
        return served
    return ServedModel(load_version(version), name, str(version.version), f"models:/{name}/{version.version}")


# TUMORSCOPE_SERVICE_WORKERS: processes, each with its own model copy (bench/server_mode.py measures 2 vs 1)
@bentoml.service(resources={"cpu": "1"}, traffic={"timeout": 30}, workers=int(os.environ.get("TUMORSCOPE_SERVICE_WORKERS", "1")))
class TumorScope:
    if not REGISTERED_MODEL:
        bento_model = bentoml.models.BentoModel(f"{BENTO_MODEL}:latest")

    def __init__(self) -> None:
        if REGISTERED_MODEL:
            self.served = champion_from_registry(REGISTERED_MODEL)
        else:
            self._use(Path(self.bento_model.path), str(self.bento_model.tag))
        settings = get_settings()
        self.log = PredictionLog(settings.prediction_log_path)
        self.image_store = settings.image_store_path if settings.keep_images else None

    def _use(self, folder: Path, tag: str) -> None:
        """Load a model folder and swap it in as one assignment, so requests in flight keep a whole model."""
        identity = json.loads((folder / "model.json").read_text())
        name, version = identity.get("registered_model", BENTO_MODEL), identity.get("model_version", tag.split(":")[-1])
        self.served = ServedModel(Classifier.load(folder), name, version, tag)

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
        served = self.served  # one model for the whole request, even if a reload swaps it meanwhile
        probabilities, features = served.classifier.predict([pixels])
        embedding = dict(zip(EMBEDDING_COLUMNS, served.classifier.embeddings(features)[0].tolist()))
        stats = slice_stats(pixels)
        answer = self._answer(served, probabilities[0], stats)
        self._keep(answer["prediction_id"], pixels)
        self._record(answer, data, {**stats, **embedding, **subgroups, "qc_flags": qc_flags(stats)}, started)
        return answer

    @bentoml.api(route="/reload")
    def reload(self) -> dict:
        """Serve the current champion (after a retraining promoted one) without a restart: the registry's alias
        in server mode, else the newest packaged model. In-flight requests finish on the model they started with."""
        previous = self.served.version
        if REGISTERED_MODEL:
            self.served = champion_from_registry(REGISTERED_MODEL, self.served)
        else:
            latest = bentoml.models.get(f"{BENTO_MODEL}:latest")
            if str(latest.tag) != self.served.tag:
                self._use(Path(latest.path), str(latest.tag))
        return {"model_name": self.served.name, "model_version": self.served.version, "previous_version": previous}

    @bentoml.api
    def feedback(self, prediction_id: str, label: str) -> dict:
        """A clinician confirms or corrects a prediction; the label feeds monitoring and the next data version."""
        classes = self.served.classifier.spec.classes
        if label not in classes:
            raise _refuse(HTTPStatus.UNPROCESSABLE_ENTITY, f"label must be one of {classes}")
        if not self.log.add_feedback(prediction_id, label, datetime.now(UTC).isoformat(timespec="milliseconds")):
            raise _refuse(HTTPStatus.NOT_FOUND, f"no prediction with id {prediction_id!r}")
        return {"prediction_id": prediction_id, "feedback_label": label, "stored": True}

    def _keep(self, prediction_id: str, pixels) -> None:
        """The slice as decoded pixels in a fresh 16-bit PNG (no metadata from the upload survives), named by
        the random prediction ID: what a clinician's feedback turns into training data."""
        if self.image_store is None:
            return
        self.image_store.mkdir(parents=True, exist_ok=True)
        Image.fromarray((pixels * 65535).astype(np.uint16)).save(self.image_store / f"{prediction_id}.png")

    def _answer(self, served: ServedModel, probabilities, stats: dict[str, float]) -> dict:
        classes = served.classifier.spec.classes
        confidence = float(probabilities.max())
        reason = review_reason(confidence, stats)
        return {
            "prediction_id": uuid.uuid4().hex,
            "label": classes[int(probabilities.argmax())],
            "probabilities": {name: float(p) for name, p in zip(classes, probabilities)},
            "confidence": confidence,
            "tumour_probability": float(tumour_probability(probabilities[None], served.classifier.spec)[0]),
            "model_name": served.name,
            "model_version": served.version,
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
