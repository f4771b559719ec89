"""What the peer servers run per request: the repository's encoder and decoder graphs in ONNX
Runtime with the service's session options, and the request/answer formats of the service's
/v1/encode (raw image in, JSON latents out) and /v1/decode (JSON latents in, JSON base64 PNG out).

The code is what a user writes first with Pillow and numpy, not the service's hardened codecs (no
size limits, no bomb guard): the comparison is about how requests reach the graphs, and a peer
doing less per request only makes the service's job harder. The ONNX Runtime options are the
service's own (`session_options`: bounded, non-spinning thread pools), so all servers run the same
graphs the same way.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

from export.repository import ModelConfig
from service.runtimes.onnxruntime import session_options


class Graphs:
    """The encoder and decoder of one model-repository version, loaded once per server."""

    def __init__(self, version_dir: Path, intra_op_threads: int) -> None:
        self.config = ModelConfig.load(version_dir)
        opts = session_options(intra_op_threads, 1)
        self.sessions = {
            name: ort.InferenceSession(
                str(version_dir / f"{name}.onnx"), opts, providers=["CPUExecutionProvider"]
            )
            for name in ("encoder", "decoder")
        }
        self.inputs = {name: s.get_inputs()[0].name for name, s in self.sessions.items()}

    def run(self, name: str, batch: np.ndarray) -> np.ndarray:
        return self.sessions[name].run(None, {self.inputs[name]: batch})[0]

    def image(self, data: bytes) -> np.ndarray:
        """Image bytes → uint8 3×size×size (RGB, short side resized, centre-cropped)."""
        size = self.config.image_size
        img = Image.open(io.BytesIO(data)).convert("RGB")
        if img.size != (size, size):
            img = ImageOps.fit(img, (size, size), Image.Resampling.BICUBIC)
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)

    def encode(self, images: np.ndarray) -> np.ndarray:
        """B×3×H×W uint8 → B×d×h×w float32 latents."""
        return self.run("encoder", images.astype(np.float32) / 255.0)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """B×d×h×w float32 → B×3×H×W uint8 images."""
        images = self.run("decoder", np.ascontiguousarray(latents, dtype=np.float32))
        return np.rint(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)

    def latent(self, payload: dict) -> np.ndarray:
        """The /v1/decode JSON body → one d×h×w latent."""
        raw = base64.b64decode(payload["data"])
        return np.frombuffer(raw, dtype="<f4").reshape(payload["shape"]).reshape(self.config.latent_shape)


def latents_answer(latents: np.ndarray, config: ModelConfig) -> dict[str, object]:
    data = base64.b64encode(np.ascontiguousarray(latents, dtype="<f4").tobytes()).decode()
    return {"shape": list(latents.shape), "dtype": "float32", "data": data, "model": config.name}


def images_answer(images: np.ndarray, config: ModelConfig) -> dict[str, object]:
    pngs = []
    for image in images:
        out = io.BytesIO()
        Image.fromarray(image.transpose(1, 2, 0)).save(out, format="PNG")
        pngs.append({"png": base64.b64encode(out.getvalue()).decode()})
    return {"images": pngs, "model": config.name}
