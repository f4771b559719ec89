"""Mixed encode / decode / generate requests whose every answer is checked against its own input,
with the expected results computed by a local ONNX Runtime session: a reply delivered to the wrong
caller, or a job mixed up in a batch, fails the check."""

from __future__ import annotations

import asyncio
import base64
import io
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx
import numpy as np
from PIL import Image

from model.sampling import SamplerConfig
from service.codecs import decode_image, to_uint8
from service.runtimes.onnxruntime import OnnxRuntime
from tests.service.payloads import image_bytes, latent_json


def pixels(png_b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(png_b64))).convert("RGB")).transpose(2, 0, 1)


@dataclass
class MixedRequests:
    """`count` requests, a third of each task in shuffled order, and what each must answer."""

    runtime: OnnxRuntime
    count: int
    steps: int
    kinds: list[str] = field(default_factory=list)
    requests: list[tuple[str, dict]] = field(default_factory=list)
    expected: list[object] = field(default_factory=list)

    def __post_init__(self) -> None:
        rng = random.Random(0)
        self.kinds = [("encode", "decode", "generate")[i % 3] for i in range(self.count)]
        rng.shuffle(self.kinds)
        for i, kind in enumerate(self.kinds):
            if kind == "encode":
                data = image_bytes(24, 20, seed=i)
                image = decode_image(data, 16, 10**6)[None].astype(np.float32) / 255
                self.expected.append(self.runtime.encode(image)[0])
                self.requests.append(("/v1/encode", {"files": {"file": data}}))
            elif kind == "decode":
                z = np.random.default_rng(i).standard_normal((4, 4, 4)).astype(np.float32)
                self.expected.append(to_uint8(self.runtime.decode(z[None]))[0])
                self.requests.append(("/v1/decode", {"json": latent_json(z)}))
            else:
                self.expected.append((i % 3, 1000 + i))
                body = {"class_label": i % 3, "seed": 1000 + i, "steps": self.steps, "cfg_scale": 2.0}
                self.requests.append(("/v1/generate", {"json": {**body, "sampler": "euler"}}))

    async def send(self, urls: Sequence[str], timeout_s: float = 90.0) -> list[httpx.Response]:
        """Every request at once, request i to urls[i mod len(urls)]."""
        limits = httpx.Limits(max_connections=self.count)
        async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as http:
            return await asyncio.gather(
                *(
                    http.post(f"{urls[i % len(urls)]}{path}", **kwargs)
                    for i, (path, kwargs) in enumerate(self.requests)
                )
            )

    def check(self, responses: Sequence[httpx.Response]) -> None:
        """Every answer is a 200 holding its own request's result."""
        cfg = SamplerConfig(sampler="euler", steps=self.steps, cfg_scale=2.0)
        generated = [(i, e) for i, e in enumerate(self.expected) if self.kinds[i] == "generate"]
        labels = np.array([e[0] for _, e in generated])
        seeds = np.array([e[1] for _, e in generated])
        images = to_uint8(self.runtime.generate(labels, seeds, cfg))
        reference = dict(zip([i for i, _ in generated], images, strict=True))
        for i, response in enumerate(responses):
            kind = self.kinds[i]
            assert response.status_code == 200, (
                f"request {i} ({kind}): {response.status_code} {response.text}"
            )
            body = response.json()
            if kind == "encode":
                got = np.frombuffer(base64.b64decode(body["data"]), "<f4").reshape(body["shape"])[0]
                assert np.abs(got - self.expected[i]).max() < 1e-6, f"encode {i} got another caller's result"
            elif kind == "decode":
                assert np.array_equal(pixels(body["images"][0]["png"]), self.expected[i]), f"decode {i}"
            else:
                assert body["images"][0]["seed"] == self.expected[i][1]
                assert np.array_equal(pixels(body["images"][0]["png"]), reference[i]), f"generate {i}"
