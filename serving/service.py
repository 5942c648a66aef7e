"""The TumorScope endpoint: a scan in (slice, NIfTI volume or DICOM), a labelled, explained prediction out.

Every answer names the model version behind it, the operating threshold and whether a clinician should
review it (and why), and is written to the prediction log (image statistics, output, input hash, latency,
request ID; never a file name or an identifier) for audit and drift monitoring. Bad input gets a 4xx that
says what is wrong (413 too large, 415 unsupported type, 422 unreadable or wrong shape), never a 5xx.

    curl -H "Authorization: Bearer $KEY" -F image=@slice.png http://127.0.0.1:3000/predict
"""

from __future__ import annotations

import os

# Idle OpenMP threads spin by default, starving the request threads of the same worker: on 2 cores a
# passive wait took 8 concurrent clients from 9 to 90 requests/s. Must be set before torch starts OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import base64
import hashlib
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path

import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException
from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from PIL import Image

with bentoml.importing():
    from components.errors import DataError
    from components.fairness import AGE_BANDS
    from components.imaging import slice_stats
    from components.model import EMBEDDING_COLUMNS, Classifier, tumour_probability
    from components.predictions import PredictionLog
    from components.scans import Scan, UnsupportedInput, scan_bytes
    from components.settings import get_settings

from serving.auth import CLIENT_HEADER, AccessGuard
from serving.fhir import diagnostic_report
from serving.guard import UploadGuard

BENTO_MODEL = os.environ.get("TUMORSCOPE_BENTO_MODEL", "tumorscope-classifier")
MAX_UPLOAD_BYTES = int(os.environ.get("TUMORSCOPE_MAX_UPLOAD_BYTES", 50 * 1024 * 1024))
REVIEW_BELOW_CONFIDENCE = float(os.environ.get("TUMORSCOPE_REVIEW_BELOW_CONFIDENCE", 0.7))
WORKERS = int(os.environ.get("TUMORSCOPE_SERVICE_WORKERS", "1"))
SITE_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,32}")
PAGE = Path(__file__).with_name("web") / "index.html"
SETTINGS = get_settings()
# Server mode serves the registry's champion (TUMORSCOPE_SERVE_REGISTERED_MODEL); otherwise the packaged model.
REGISTERED_MODEL = SETTINGS.serve_registered_model


@dataclass(frozen=True)
class ServedModel:
    classifier: Classifier
    name: str
    version: str
    tag: str
    card: dict = field(default_factory=dict)


def refuse(status: HTTPStatus, message: str) -> BentoMLException:
    return BentoMLException(message, error_code=status)


def champion_from_registry(name: str, served: ServedModel | None = None) -> ServedModel:
    """The version holding the champion alias, from the MLflow tracking server (or store); ``served`` itself
    when it is that version already (nothing is downloaded)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from components.registry import CHAMPION, client, load_version, version_by_alias

    version = version_by_alias(client(), name, CHAMPION)
    if version is None:
        raise RuntimeError(f"registry: {name} has no '{CHAMPION}' (no model has passed the gate yet)")
    if served is not None and served.name == name and served.version == str(version.version):
        return served
    try:
        card = mlflow.artifacts.load_dict(f"runs:/{version.run_id}/tumorscope/model_card.json")
    except (MlflowException, OSError):
        card = {}
    return ServedModel(load_version(version), name, str(version.version), f"models:/{name}/{version.version}", card)


def packaged_model(folder: Path, tag: str) -> ServedModel:
    identity = json.loads((folder / "model.json").read_text())
    card_file = folder / "model_card.json"
    card = json.loads(card_file.read_text()) if card_file.exists() else {}
    name, version = identity.get("registered_model", BENTO_MODEL), identity.get("model_version", tag.split(":")[-1])
    return ServedModel(Classifier.load(folder), name, version, tag, card)


def checked_subgroups(age_band: str | None, sex: str | None, site: str | None) -> dict:
    """Subgroup labels from closed vocabularies only, so no free text (a name, an ID) reaches the log."""
    allowed = {"age_band": set(AGE_BANDS[1]), "sex": {"F", "M"}}
    values = {"age_band": age_band, "sex": sex, "site": site}
    for name, value in values.items():
        if value is None:
            continue
        if (name in allowed and value not in allowed[name]) or (name == "site" and not SITE_PATTERN.fullmatch(value)):
            expected = sorted(allowed[name]) if name in allowed else "a site code of letters, digits, '-', '_' (≤ 32)"
            raise refuse(HTTPStatus.UNPROCESSABLE_ENTITY, f"{name}: not one of {expected}")
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


def review_reason(confidence: float, stats: dict[str, float], unfamiliar: bool) -> str | None:
    """Why a clinician should look before anyone acts on this answer, if they should: the input is not what
    the model knows (blank, no contrast, unlike every training image), or the model is unsure."""
    if stats["std"] < 0.02 or stats["foreground"] < 0.02:
        return "image is nearly blank: probably not a brain MRI slice"
    if stats["p99"] - stats["p01"] < 0.1:
        return "very low contrast: image quality too low to judge"
    if unfamiliar:
        return "out of distribution: unlike the images the model was trained on (wrong modality or not a brain MRI?)"
    if confidence < REVIEW_BELOW_CONFIDENCE:
        return f"low confidence ({confidence:.2f} < {REVIEW_BELOW_CONFIDENCE})"
    return None


def read_input(path: Path) -> tuple[Scan, bytes]:
    """The upload as model slices, or the 4xx that says why not."""
    size = path.stat().st_size
    if size > MAX_UPLOAD_BYTES:
        raise refuse(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"upload is {size} bytes; the limit is {MAX_UPLOAD_BYTES}")
    data = path.read_bytes()
    try:
        return scan_bytes(data, SETTINGS.secret_key()), data
    except UnsupportedInput as exc:
        raise refuse(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, exc.problem) from None
    except DataError as exc:
        raise refuse(HTTPStatus.UNPROCESSABLE_ENTITY, exc.problem) from None


def request_headers(ctx: bentoml.Context | None) -> tuple[str, str]:
    """(request ID, calling key's id) as set by the access guard."""
    if ctx is None:
        return "", ""
    headers = ctx.request.headers
    return headers.get("x-request-id", ""), headers.get(CLIENT_HEADER, "")


web = FastAPI(title="TumorScope pages")


# TUMORSCOPE_SERVICE_WORKERS: processes, each with its own model copy (bench/server_mode.py measures 2 vs 1)
@bentoml.service(resources={"cpu": "1"}, traffic={"timeout": 60}, workers=WORKERS)
@bentoml.asgi_app(web, path="/")
class TumorScope:
    if not REGISTERED_MODEL:
        bento_model = bentoml.models.BentoModel(f"{BENTO_MODEL}:latest")

    def __init__(self) -> None:
        import torch

        # one forward pass at a time per worker, each with the worker's share of the cores: concurrent
        # requests queue instead of fighting over threads (the batch route batches them instead)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // WORKERS))
        self.lock = threading.Lock()
        self.served = champion_from_registry(REGISTERED_MODEL) if REGISTERED_MODEL else packaged_model(
            Path(self.bento_model.path), str(self.bento_model.tag)
        )  # fmt: skip
        self.log = PredictionLog(SETTINGS.prediction_log_path)
        self.image_store = SETTINGS.image_store_path if SETTINGS.keep_images else None

    # --- routes ------------------------------------------------------------------------------------------

    @bentoml.api
    def predict(
        self,
        image: Path,
        age_band: str | None = None,
        sex: str | None = None,
        site: str | None = None,
        fhir: bool = False,
        ctx: bentoml.Context = None,
    ) -> dict:
        """Classify one scan: a 2D slice (PNG, JPEG, TIFF), a NIfTI volume (.nii, .nii.gz) or DICOM (one file,
        or a zip of one series; de-identified on arrival). A volume is answered by its most suspicious
        brain-bearing slice (`decisive_slice`). ``age_band``, ``sex`` and ``site`` are optional subgroup labels
        (never identifiers) for fairness monitoring; ``fhir`` adds an HL7 FHIR R4 DiagnosticReport."""
        started = time.perf_counter()
        scan, data = read_input(image)
        subgroups = checked_subgroups(age_band, sex, site)
        answer, pixels = self._classify(scan)
        self._keep(answer["prediction_id"], pixels)
        self._record(answer, data, pixels, subgroups, started, ctx)
        if fhir:
            answer["fhir"] = diagnostic_report(answer)
        return answer

    # max_latency_ms is the dispatcher's budget before it answers 503, not a batching window (it tunes that itself)
    @bentoml.api(batchable=True, max_batch_size=32, max_latency_ms=20_000)
    def predict_batch(self, images: list[Path]) -> list[dict]:
        """Classify several scans in one request (repeat the `images` field); concurrent requests are merged
        into one forward pass (adaptive batching). A bad file gets an `error` entry, the others their answers."""
        started = time.perf_counter()
        read: list[tuple[Scan, bytes] | dict] = []
        for path in images:
            try:
                read.append(read_input(path))
            except BentoMLException as exc:
                read.append({"error": exc.message, "status": int(exc.error_code)})
        scans = [item for item in read if isinstance(item, tuple)]
        classified = iter(self._classify_many([scan for scan, _ in scans]))
        answers = []
        for item in read:
            if isinstance(item, dict):
                answers.append(item)
                continue
            answer, pixels = next(classified)
            self._keep(answer["prediction_id"], pixels)
            self._record(answer, item[1], pixels, {}, started, None)
            answers.append(answer)
        return answers

    @bentoml.api
    def explain(self, image: Path, method: str = "occlusion", ctx: bentoml.Context = None) -> dict:
        """The prediction with a heatmap of what in the image drove the tumour score: the raw heatmap at the
        model's input size, values in [0, 1], and a PNG of it over the slice (base64). ``method``: ``occlusion``
        (the drop in P(tumour) when a patch is hidden; about a second) or ``grad-cam`` (fast, one value per
        feature-map cell). Occlusion is the default because it is the faithful one here: on the default model,
        Grad-CAM put 0.1 % of its mass inside test lesions where occlusion put 14 % (reports/explanations).
        ``lesion-map``: where a model trained on lesion masks (``train.mask_weight``) sees a lesion."""
        from components.explain import gradcam, lesion_map, occlusion, overlay_png

        methods = {"grad-cam": gradcam, "occlusion": occlusion, "lesion-map": lesion_map}
        if method not in methods:
            raise refuse(HTTPStatus.UNPROCESSABLE_ENTITY, "method must be 'grad-cam', 'occlusion' or 'lesion-map'")
        if method == "lesion-map" and not self.served.classifier.spec.lesion_head:
            raise refuse(HTTPStatus.UNPROCESSABLE_ENTITY, "this model has no lesion map (it was trained without masks): use 'occlusion'")
        started = time.perf_counter()
        scan, data = read_input(image)
        answer, pixels = self._classify(scan)
        served = self.served
        with self.lock:
            heatmap = methods[method](served.classifier, pixels)
        self._keep(answer["prediction_id"], pixels)
        self._record(answer, data, pixels, {}, started, ctx)
        return {
            **answer,
            "method": method,
            "heatmap": np.round(heatmap, 4).tolist(),
            "overlay_png": base64.b64encode(overlay_png(pixels, heatmap)).decode(),
        }

    @bentoml.api
    def feedback(self, prediction_id: str, label: str) -> dict:
        """A clinician confirms or corrects a prediction; the label feeds monitoring and the next data version."""
        classes = self.served.classifier.spec.classes
        if label not in classes:
            raise refuse(HTTPStatus.UNPROCESSABLE_ENTITY, f"label must be one of {classes}")
        if not self.log.add_feedback(prediction_id, label, datetime.now(UTC).isoformat(timespec="milliseconds")):
            raise refuse(HTTPStatus.NOT_FOUND, f"no prediction with id {prediction_id!r}")
        return {"prediction_id": prediction_id, "feedback_label": label, "stored": True}

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
                self.served = packaged_model(Path(latest.path), str(latest.tag))
        return {"model_name": self.served.name, "model_version": self.served.version, "previous_version": previous}

    @web.get("/model")
    def model(self) -> dict:
        """What answers: name, version, alias or bento tag, classes, thresholds, and the model card."""
        served = self.served
        spec = served.classifier.spec
        return {
            "model_name": served.name,
            "model_version": served.version,
            "alias": "champion" if REGISTERED_MODEL else None,
            "source": served.tag,
            "classes": spec.classes,
            "thresholds": {
                "operating_threshold": spec.operating_threshold,
                "temperature": spec.temperature,
                "review_below_confidence": REVIEW_BELOW_CONFIDENCE,
            },
            "card": served.card,
        }

    @web.get("/", response_class=HTMLResponse)
    def page(self) -> str:
        """The clinician page: upload a scan, see the answer and its heatmap, read the model card, give feedback."""
        return PAGE.read_text()

    # --- helpers -----------------------------------------------------------------------------------------

    def _classify(self, scan: Scan) -> tuple[dict, np.ndarray]:
        return self._classify_many([scan])[0]

    def _classify_many(self, scans: list[Scan]) -> list[tuple[dict, np.ndarray]]:
        """Each scan's answer and the slice that decided it (a volume's most suspicious slice), from one
        forward pass over all their slices."""
        if not scans:
            return []
        served = self.served  # one model for the whole request, even if a reload swaps it meanwhile
        with self.lock:
            probabilities, features = served.classifier.predict([s for scan in scans for s in scan.slices])
        tumour = tumour_probability(probabilities, served.classifier.spec)
        results, start = [], 0
        for scan in scans:
            stop = start + len(scan.slices)
            decisive = start + int(tumour[start:stop].argmax())
            embedding = served.classifier.embeddings(features[decisive : decisive + 1])[0]
            pixels = scan.slices[decisive - start]
            stats = slice_stats(pixels)
            unfamiliar = served.classifier.is_unfamiliar(features[decisive : decisive + 1], pixels)
            answer = self._answer(served, probabilities[decisive], stats, unfamiliar)
            answer.update({"input_kind": scan.kind, "slices": len(scan.slices), "decisive_slice": scan.indices[decisive - start]})
            answer["_monitoring"] = {**stats, **dict(zip(EMBEDDING_COLUMNS, embedding.tolist())), "qc_flags": qc_flags(stats)}
            results.append((answer, pixels))
            start = stop
        return results

    def _answer(self, served: ServedModel, probabilities: np.ndarray, stats: dict[str, float], unfamiliar: bool) -> dict:
        spec = served.classifier.spec
        label = served.classifier.decide(probabilities[None])[0]
        confidence = float(probabilities[spec.classes.index(label)])
        reason = review_reason(confidence, stats, unfamiliar)
        return {
            "prediction_id": uuid.uuid4().hex,
            "label": label,
            "probabilities": {name: float(p) for name, p in zip(spec.classes, probabilities)},
            "confidence": confidence,
            "tumour_probability": float(tumour_probability(probabilities[None], spec)[0]),
            "operating_threshold": spec.operating_threshold,
            "model_name": served.name,
            "model_version": served.version,
            "needs_review": reason is not None,
            "review_reason": reason,
        }

    def _keep(self, prediction_id: str, pixels: np.ndarray) -> None:
        """The slice as decoded pixels in a fresh PNG (no metadata from the upload survives), named by the random
        prediction ID: what a clinician's feedback turns into training data. Gray slices keep 16 bits; colour
        (one sequence per channel) is 8-bit RGB, PNG's only colour depth that every reader takes."""
        if self.image_store is None:
            return
        self.image_store.mkdir(parents=True, exist_ok=True)
        stored = (pixels * 255).round().astype(np.uint8) if pixels.ndim == 3 else (pixels * 65535).astype(np.uint16)
        Image.fromarray(stored).save(self.image_store / f"{prediction_id}.png")

    def _record(self, answer: dict, data: bytes, pixels: np.ndarray, subgroups: dict, started: float, ctx) -> None:
        """The audit and monitoring record: no file name, no header value, no identifier."""
        monitoring = answer.pop("_monitoring")
        request_id, client = request_headers(ctx)
        self.log.append(
            {
                **answer,
                **monitoring,
                **subgroups,
                "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "predicted_label": answer["label"],
                "input_sha256": hashlib.sha256(data).hexdigest(),
                "needs_review": int(answer["needs_review"]),
                "latency_ms": (time.perf_counter() - started) * 1000,
                "request_id": request_id,
                "client": client,
            }
        )


UPLOAD_ROUTES = {"/predict": "image", "/explain": "image", "/predict_batch": "images"}
TumorScope.add_asgi_middleware(
    UploadGuard,
    routes=UPLOAD_ROUTES,
    max_bytes=MAX_UPLOAD_BYTES,
    json_routes=("/feedback", "/reload"),
    text_fields={"/predict": ("age_band", "sex", "site", "fhir"), "/explain": ("method",)},
)
TumorScope.add_asgi_middleware(AccessGuard, store_path=SETTINGS.api_keys_path, required=SETTINGS.auth == "required")
if SETTINGS.cors_origins:
    from starlette.middleware.cors import CORSMiddleware

    TumorScope.add_asgi_middleware(
        CORSMiddleware,
        allow_origins=SETTINGS.cors_origins,
        allow_methods=["GET", "POST"],
        allow_headers=["Authorization", "X-API-Key", "X-Request-ID", "Content-Type"],
        expose_headers=["X-Request-ID"],
    )
