"""The endpoint over real HTTP (`bentoml serve` on 127.0.0.1): every input format, every error class, API keys
and scopes, request IDs, the audit record, the batch route, explanations, the model card, FHIR, CORS, a fuzz
run and a short load test."""

from __future__ import annotations

import io
import json
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.dicom_fixtures import PHI, write_series, write_zip
from tests.endpoint import Endpoint, blank_png_bytes, header_only_nifti_bytes, package_tiny_model, png_bytes, start_endpoint, stop
from tests.test_volumes import _head, _save

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory) -> Endpoint:
    served = start_endpoint(tmp_path_factory.mktemp("endpoint"), {"TUMORSCOPE_CORS_ORIGINS": '["http://clinic.example"]'})
    yield served
    stop(served.process)


@pytest.fixture(scope="module")
def scans(tmp_path_factory, endpoint: Endpoint) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("scans")
    write_series(folder / "series", n_slices=6)
    write_series(folder / "two", n_slices=3, series_uid="1.2.826.0.1.3680043.8.498.1")
    write_series(folder / "two", n_slices=3, series_uid="1.2.826.0.1.3680043.8.498.2")
    jpeg = folder / "slice.jpg"
    Image.open(next(endpoint.cohort.glob("notumor/*.png"))).convert("L").save(jpeg, quality=90)
    tiff = folder / "slice.tif"
    Image.open(next(endpoint.cohort.glob("notumor/*.png"))).save(tiff)
    return {
        "png": next(endpoint.cohort.glob("tumor/*.png")),
        "jpeg": jpeg,
        "tiff": tiff,
        "nifti": _save(folder / "head.nii.gz", _head()),
        "dicom_zip": write_zip(folder / "series.zip", folder / "series"),
        "dicom_file": sorted((folder / "series").iterdir())[0],
        "two_series": write_zip(folder / "two.zip", folder / "two"),
    }


def post(endpoint: Endpoint, path: Path | bytes, route: str = "/predict", key: str = "full", **fields) -> httpx.Response:
    content = path.read_bytes() if isinstance(path, Path) else path
    return httpx.post(
        f"{endpoint.url}{route}", files={"image": ("upload", content)}, data=fields, headers=endpoint.auth(key) if key else {}, timeout=60
    )


def logged(endpoint: Endpoint, prediction_id: str) -> dict:
    with sqlite3.connect(endpoint.log) as db:
        db.row_factory = sqlite3.Row
        return dict(db.execute("SELECT * FROM predictions WHERE prediction_id = ?", (prediction_id,)).fetchone())


@pytest.mark.parametrize("kind", ["png", "jpeg", "tiff", "nifti", "dicom_zip", "dicom_file"])
def test_every_input_format_gets_an_answer_with_version_threshold_and_review_flag(endpoint: Endpoint, scans: dict, kind: str):
    response = post(endpoint, scans[kind])
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["label"] in ("notumor", "tumor") and answer["model_version"] == "7"
    assert sum(answer["probabilities"].values()) == pytest.approx(1, abs=1e-4)
    assert 0 < answer["operating_threshold"] < 1 and isinstance(answer["needs_review"], bool)
    expected_kind = {"png": "image", "jpeg": "image", "tiff": "image", "nifti": "nifti"}.get(kind, "dicom")
    assert answer["input_kind"] == expected_kind
    if kind in ("nifti", "dicom_zip"):
        assert answer["slices"] > 1 and 0 <= answer["decisive_slice"]


def test_dicom_is_deidentified_on_arrival_no_header_value_reaches_the_answer_or_log(endpoint: Endpoint, scans: dict):
    answer = post(endpoint, scans["dicom_zip"]).json()
    record = json.dumps(logged(endpoint, answer["prediction_id"]))
    for value in (PHI["PatientName"], PHI["PatientID"]):
        assert str(value) not in json.dumps(answer) and str(value) not in record


@pytest.mark.parametrize(
    ("content", "status", "message"),
    [
        (b"%PDF-1.7 a report, not a scan", 415, "unsupported file type"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, 422, "not a readable image"),
        (png_bytes(np.zeros((1, 300), np.uint8)), 422, "expected a 2D image"),
        (b"", 422, "empty"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 2_100_000, 413, "limit"),
        (b"\x1f\x8b\x08 not really gzip", 422, "cannot be decompressed"),  # zlib.error, not an OSError
        (blank_png_bytes(14_000, 14_000), 422, "more pixels than any MRI slice"),  # 190 KB, 196 MB decoded
        (header_only_nifti_bytes((2048, 2048, 2048)), 422, "more than any brain MRI"),  # 352 bytes, 8 GB declared
    ],
    ids=["unsupported", "unreadable", "wrong-shape", "empty", "too-large", "corrupt-gzip", "decompression-bomb", "volume-bomb"],
)
def test_bad_input_gets_its_4xx_with_a_clear_message(endpoint: Endpoint, content: bytes, status: int, message: str):
    response = post(endpoint, content)
    assert response.status_code == status and message in response.text, response.text
    assert httpx.get(f"{endpoint.url}/readyz", timeout=5).status_code == 200


def test_two_series_in_one_zip_and_a_misnamed_field_are_refused(endpoint: Endpoint, scans: dict):
    response = post(endpoint, scans["two_series"])
    assert response.status_code == 422 and "2 image series" in response.text
    misnamed = httpx.post(f"{endpoint.url}/predict", files={"file": ("x.png", b"x")}, headers=endpoint.auth(), timeout=30)
    assert misnamed.status_code == 400 and "field named 'image'" in misnamed.text


def test_keys_are_required_and_scoped(endpoint: Endpoint, scans: dict):
    assert post(endpoint, scans["png"], key="").status_code == 401
    assert httpx.post(f"{endpoint.url}/predict", files={"image": b"x"}, headers={"X-API-Key": "ts_00000000_" + "a" * 43}).status_code == 401
    assert post(endpoint, scans["png"], key="predict_only").status_code == 200
    assert post(endpoint, scans["png"], route="/explain", key="predict_only").status_code == 403
    feedback = httpx.post(f"{endpoint.url}/feedback", json={"prediction_id": "x", "label": "tumor"}, headers=endpoint.auth("predict_only"))
    assert feedback.status_code == 403 and "feedback" in feedback.text
    assert httpx.post(f"{endpoint.url}/reload", json={}, headers=endpoint.auth("full")).status_code == 403
    assert httpx.post(f"{endpoint.url}/reload", json={}, headers=endpoint.auth("admin"), timeout=60).status_code == 200
    with_header = httpx.post(
        f"{endpoint.url}/predict", files={"image": scans["png"].read_bytes()}, headers={"X-API-Key": endpoint.keys["full"]}
    )
    assert with_header.status_code == 200
    assert httpx.get(f"{endpoint.url}/model").status_code == 200, "the model card is public"
    stored = json.loads((endpoint.folder / "api_keys.json").read_text())
    assert all(endpoint.keys[name] not in json.dumps(stored) for name in endpoint.keys), "only hashes are stored"


def test_a_revoked_key_stops_working_without_a_restart(endpoint: Endpoint, scans: dict):
    from serving.auth import KeyStore

    store = KeyStore(endpoint.folder / "api_keys.json")
    key = store.create("short-lived", ["predict"])
    assert httpx.post(f"{endpoint.url}/predict", files={"image": scans["png"].read_bytes()}, headers={"X-API-Key": key}).status_code == 200
    time.sleep(0.01)
    assert store.revoke(key.split("_")[1])
    assert httpx.post(f"{endpoint.url}/predict", files={"image": scans["png"].read_bytes()}, headers={"X-API-Key": key}).status_code == 401


def test_request_id_and_audit_record(endpoint: Endpoint, scans: dict):
    response = httpx.post(
        f"{endpoint.url}/predict",
        files={"image": ("Doe_John_MRN123.png", scans["png"].read_bytes())},
        headers={**endpoint.auth(), "X-Request-ID": "req-0001-abcdef"},
        timeout=30,
    )
    assert response.headers["x-request-id"] == "req-0001-abcdef"
    record = logged(endpoint, response.json()["prediction_id"])
    assert record["request_id"] == "req-0001-abcdef" and record["client"] == endpoint.key_ids["full"]
    assert record["model_version"] == "7" and len(record["input_sha256"]) == 64 and record["latency_ms"] > 0
    assert "Doe" not in json.dumps(record) and "MRN123" not in json.dumps(record)
    generated = post(endpoint, scans["png"]).headers["x-request-id"]
    assert len(generated) == 32 and generated != "req-0001-abcdef"


def test_batch_route_answers_each_file_and_reports_bad_ones_in_place(endpoint: Endpoint, scans: dict):
    files = [("images", ("a", scans["png"].read_bytes())), ("images", ("b", b"not a scan")), ("images", ("c", scans["nifti"].read_bytes()))]
    response = httpx.post(f"{endpoint.url}/predict_batch", files=files, headers=endpoint.auth(), timeout=60)
    assert response.status_code == 200, response.text
    first, bad, volume = response.json()
    assert first["input_kind"] == "image" and volume["input_kind"] == "nifti"
    assert bad["status"] == 415 and "unsupported" in bad["error"]

    answers: list = []
    threads = [
        threading.Thread(
            target=lambda: answers.append(
                httpx.post(
                    f"{endpoint.url}/predict_batch",
                    files=[("images", ("a", scans["png"].read_bytes()))],
                    headers=endpoint.auth(),
                    timeout=60,
                )
            )
        )
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.status_code for r in answers] == [200] * 8 and all(len(r.json()) == 1 for r in answers)


def test_explain_returns_the_heatmap_and_an_overlay_png(endpoint: Endpoint, scans: dict):
    response = post(endpoint, scans["png"], route="/explain")
    assert response.status_code == 200, response.text
    answer = response.json()
    heatmap = np.asarray(answer["heatmap"])
    assert heatmap.shape == (48, 48) and 0 <= heatmap.min() and heatmap.max() <= 1 and heatmap.max() > 0
    import base64

    overlay = Image.open(io.BytesIO(base64.b64decode(answer["overlay_png"])))
    assert overlay.format == "PNG" and overlay.mode == "RGB"
    assert logged(endpoint, answer["prediction_id"])["predicted_label"] == answer["label"]
    assert answer["method"] == "occlusion", "the faithful method is the default"
    gradcam = post(endpoint, scans["png"], route="/explain", method="grad-cam").json()
    assert gradcam["method"] == "grad-cam" and np.asarray(gradcam["heatmap"]).shape == (48, 48)
    lesion = post(endpoint, scans["png"], route="/explain", method="lesion-map").json()
    assert lesion["method"] == "lesion-map" and np.asarray(lesion["heatmap"]).shape == (48, 48)
    assert post(endpoint, scans["png"], route="/explain", method="shap").status_code == 422


def test_a_lesion_map_from_a_model_without_a_lesion_head_is_a_clear_422(endpoint: Endpoint, scans: dict):
    def serve_newly_packaged(lesion_head: bool) -> None:
        package_tiny_model(endpoint.cohort, endpoint.folder / "bentoml", lesion_head)
        assert httpx.post(f"{endpoint.url}/reload", json={}, headers=endpoint.auth("admin"), timeout=60).status_code == 200

    serve_newly_packaged(lesion_head=False)
    try:
        refused = post(endpoint, scans["png"], route="/explain", method="lesion-map")
        assert refused.status_code == 422 and "no lesion map" in refused.text and "occlusion" in refused.text
        assert post(endpoint, scans["png"], route="/explain", method="grad-cam").status_code == 200
    finally:
        serve_newly_packaged(lesion_head=True)  # the module's other tests share this endpoint
    assert post(endpoint, scans["png"], route="/explain", method="lesion-map").status_code == 200


def test_model_route_gives_version_thresholds_and_card(endpoint: Endpoint):
    model = httpx.get(f"{endpoint.url}/model", timeout=10).json()
    assert model["model_name"] == "tumorscope-test" and model["model_version"] == "7"
    assert set(model["thresholds"]) == {"operating_threshold", "temperature", "review_below_confidence"}
    assert model["card"]["intended_use"].startswith("test model")


def test_fhir_diagnostic_report_validates_as_fhir_r4(endpoint: Endpoint, scans: dict):
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport

    answer = post(endpoint, scans["png"], fhir="true").json()
    report = DiagnosticReport.model_validate(answer["fhir"])
    assert report.status == "preliminary" and report.identifier[0].value == answer["prediction_id"]
    assert report.subject is None, "the endpoint never knows the patient"
    assert len(report.contained) == 1 + len(answer["probabilities"])


def test_out_of_distribution_input_is_flagged_for_review(endpoint: Endpoint):
    rng = np.random.default_rng(0)
    photo = (rng.random((96, 96, 3)) * 255).astype(np.uint8)  # colour noise: nothing like a brain slice
    photo[::8] = 255
    answer = post(endpoint, png_bytes(photo)).json()
    assert answer["needs_review"] and "out of distribution" in answer["review_reason"]
    blank = post(endpoint, png_bytes(np.zeros((96, 96), np.uint8))).json()
    assert blank["needs_review"] and "blank" in blank["review_reason"]


def test_cors_preflight_allows_only_the_configured_origin(endpoint: Endpoint):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    allowed = httpx.options(f"{endpoint.url}/predict", headers={"Origin": "http://clinic.example", **preflight})
    assert allowed.headers.get("access-control-allow-origin") == "http://clinic.example"
    refused = httpx.options(f"{endpoint.url}/predict", headers={"Origin": "http://evil.example", **preflight})
    assert "access-control-allow-origin" not in refused.headers


def test_fuzzed_requests_never_get_a_5xx(endpoint: Endpoint):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    route = st.sampled_from(["/predict", "/explain", "/predict_batch", "/feedback"])
    field = st.sampled_from(["image", "images", "age_band", "sex", "site", "fhir", "prediction_id", "label", "x"])
    payload = st.one_of(st.binary(max_size=2048), st.just(b"\x89PNG\r\n\x1a\n"), st.text(max_size=64).map(str.encode))
    statuses: list[int] = []

    @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        route=route, files=st.lists(st.tuples(field, payload), max_size=3), form=st.dictionaries(field, st.text(max_size=40), max_size=3)
    )
    def one_request(route: str, files: list, form: dict) -> None:
        multipart = [(name, ("f", content)) for name, content in files] or None
        response = httpx.post(f"{endpoint.url}{route}", files=multipart, data=form, headers=endpoint.auth(), timeout=60)
        statuses.append(response.status_code)
        assert response.status_code < 500, (route, files, form, response.text)

    one_request()
    json_bodies = [b"{", b"[]", b'{"prediction_id": 5, "label": null}', b'{"image": "x"}', b"\xff\xfe"]
    for body in json_bodies:
        for route in ("/predict", "/feedback", "/predict_batch"):
            response = httpx.post(f"{endpoint.url}{route}", content=body, headers={**endpoint.auth(), "Content-Type": "application/json"})
            assert response.status_code < 500, (route, body, response.text)
    assert len(statuses) == 50 and httpx.get(f"{endpoint.url}/readyz").status_code == 200


def test_load_concurrent_clients_get_no_errors(endpoint: Endpoint, scans: dict):
    """8 clients for 8 s on /predict; prints throughput and latency percentiles."""
    image, latencies, failures = scans["png"].read_bytes(), [], []
    deadline = time.monotonic() + 8

    def client() -> None:
        with httpx.Client(headers=endpoint.auth(), timeout=60) as http:
            while time.monotonic() < deadline:
                started = time.perf_counter()
                response = http.post(f"{endpoint.url}/predict", files={"image": ("slice.png", image)})
                latencies.append(time.perf_counter() - started)
                if response.status_code != 200:
                    failures.append(response.status_code)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ordered = sorted(latencies)
    print(
        f"\nload: {len(latencies)} requests in 8 s, p50 {1000 * ordered[len(ordered) // 2]:.0f} ms, p99 {1000 * ordered[int(0.99 * len(ordered))]:.0f} ms"
    )
    assert failures == [] and len(latencies) > 20


def test_a_file_field_given_as_a_url_is_refused_and_never_fetched(endpoint: Endpoint):
    """BentoML would fetch a text value of a file field as a URL (server-side request forgery); the guard refuses."""
    import http.server

    hits: list[str] = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/internal-secret"
    try:
        as_form = httpx.post(f"{endpoint.url}/predict", data={"image": url}, headers=endpoint.auth(), timeout=30)
        as_json = httpx.post(f"{endpoint.url}/predict", json={"image": url}, headers=endpoint.auth(), timeout=30)
        as_text_part = httpx.post(
            f"{endpoint.url}/predict", files={"other": ("f", b"x")}, data={"image": url}, headers=endpoint.auth(), timeout=30
        )
        as_batch = httpx.post(f"{endpoint.url}/predict_batch", json={"images": [url]}, headers=endpoint.auth(), timeout=30)
    finally:
        server.shutdown()
    assert [r.status_code for r in (as_form, as_json, as_text_part, as_batch)] == [415, 415, 400, 415]
    assert hits == []
