"""A real `bentoml serve` of the endpoint on 127.0.0.1, with a tiny model and API keys, for the serving tests.

The model is a small MONAI ResNet trained for a few seconds on a synthetic cohort (so its heatmaps and its
embedding summary mean something), saved in a fresh BentoML store exactly as the package stage saves one.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from tests.conftest import PROJECT, workspace_env

SCOPES = {"full": ["predict", "explain", "feedback"], "predict_only": ["predict"], "admin": ["admin"]}


@dataclass
class Endpoint:
    url: str
    keys: dict[str, str]
    key_ids: dict[str, str]
    folder: Path
    cohort: Path
    process: subprocess.Popen

    def auth(self, key: str = "full") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[key]}"}

    @property
    def log(self) -> Path:
        return self.folder / "predictions.sqlite"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train_tiny_model(cohort: Path, bento_home: Path, lesion_head: bool = True) -> None:
    """A 48 px ResNet, by default with a lesion head (untrained: the map is only served), fitted for a few epochs on the cohort's
    slices, saved to the BentoML store with a card."""
    import bentoml
    import torch

    from components.imaging import read_slice
    from components.model import Classifier, EmbeddingProjection, ModelSpec, build_network

    os.environ["BENTOML_HOME"] = str(bento_home)
    torch.manual_seed(0)
    paths = sorted(p for p in cohort.glob("*/*.png") if p.parent.name in ("tumor", "notumor"))
    spec = ModelSpec(
        network="resnet",
        image_size=48,
        channels=[8, 16, 16, 16],
        blocks=[1, 1, 1, 1],
        classes=["notumor", "tumor"],
        norm="group",
        lesion_head=lesion_head,
    )
    classifier = Classifier(spec, build_network(spec))
    images = classifier.batch([read_slice(p) for p in paths])
    labels = torch.tensor([int(p.parent.name == "tumor") for p in paths])
    net = classifier.net.train()
    optimiser = torch.optim.AdamW(net.parameters(), lr=3e-3)
    x = torch.from_numpy(images)
    for _ in range(25):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(net(x), labels).backward()
        optimiser.step()
    classifier = Classifier(spec, net.eval())
    classifier.projection = EmbeddingProjection.fit(classifier.predict_prepared(images)[1], images=images)
    card = {
        "intended_use": "test model: synthetic data only",
        "limitations": ["not for clinical use"],
        "metrics": {"accuracy": 0.5},
        "calibration": {"val_sensitivity_at_threshold": 0.97, "val_specificity_at_threshold": 0.9},
    }
    identity = {"registered_model": "tumorscope-test", "model_version": "7", "run_id": "none"}
    with bentoml.models.create("tumorscope-classifier", labels=identity) as model:
        torch.save(classifier.net.state_dict(), model.path_of("model.pt"))
        Path(model.path_of("model.json")).write_text(json.dumps({**spec.model_dump(), **identity}))
        Path(model.path_of("embedding.json")).write_text(classifier.projection.model_dump_json())
        Path(model.path_of("model_card.json")).write_text(json.dumps(card))


def package_tiny_model(cohort: Path, bento_home: Path, lesion_head: bool = True) -> None:
    """``train_tiny_model`` in its own process: the test process keeps no BentoML store of its own."""
    code = f"from tests.endpoint import train_tiny_model; from pathlib import Path; " \
        f"train_tiny_model(Path({str(cohort)!r}), Path({str(bento_home)!r}), {lesion_head})"  # fmt: skip
    subprocess.run([sys.executable, "-c", code], cwd=PROJECT, check=True)


def serve_command(port: int, target: str = "serving.service:TumorScope") -> list[str]:
    return [str(Path(sys.executable).parent / "bentoml"), "serve", target, "--host", "127.0.0.1", "--port", str(port)]


def start_endpoint(folder: Path, extra_env: dict[str, str] | None = None, workers: int = 1) -> Endpoint:
    from components.config import SynthConfig
    from components.synth import run as synthesise
    from serving.auth import KeyStore

    cohort = folder / "synth"
    synthesise(SynthConfig(out=cohort, subjects=24, slices_per_subject=2, image_size=64, seed=5))
    bento_home = folder / "bentoml"
    package_tiny_model(cohort, bento_home)
    store = KeyStore(folder / "api_keys.json")
    keys = {name: store.create(f"test-{name}", scopes) for name, scopes in SCOPES.items()}
    key_ids = {name: key.split("_")[1] for name, key in keys.items()}
    port = free_port()
    env = workspace_env(folder) | {
        "BENTOML_HOME": str(bento_home),
        "TUMORSCOPE_PREDICTION_LOG": str(folder / "predictions.sqlite"),
        "TUMORSCOPE_API_KEYS": str(folder / "api_keys.json"),
        "TUMORSCOPE_MAX_UPLOAD_BYTES": "2000000",
        "TUMORSCOPE_SERVICE_WORKERS": str(workers),
        **(extra_env or {}),
    }
    log = (folder / "serve.log").open("wb")
    process = subprocess.Popen(serve_command(port), cwd=PROJECT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return Endpoint(url, keys, key_ids, folder, cohort, process)
        except httpx.HTTPError:
            time.sleep(0.5)
    stop(process)
    raise RuntimeError("bentoml serve did not become ready:\n" + (folder / "serve.log").read_text()[-3000:])


def stop(process: subprocess.Popen) -> None:
    import signal

    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def png_bytes(array: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def blank_png_bytes(width: int, height: int) -> bytes:
    """A black 8-bit PNG of any declared size, compressed row by row: a 14,000 x 14,000 one is 190 KB here and
    196 MB once decoded (a decompression bomb), without this process ever holding the pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row = zlib.compressobj(9), b"\x00" * (width + 1)  # filter byte 0, then the row
    stream = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", stream) + chunk(b"IEND", b"")


def header_only_nifti_bytes(shape: tuple[int, ...]) -> bytes:
    """An uncompressed NIfTI-1 file that declares ``shape`` (uint8) and holds no voxels: a header-size bomb."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_dtype(np.uint8)
    header.set_data_shape(shape)
    return header.binaryblock + b"\x00" * 4
