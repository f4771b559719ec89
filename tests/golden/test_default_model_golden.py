"""Golden answers of the shipped default model through the real service.

The committed `fmnist32-tiny` checkpoint is exported with `pae-export` and served (uvicorn, a real
redis-server, a worker on ONNX Runtime); the PNGs of fixed seeds and samplers, and the latents of a fixed
image, must equal the committed files byte for byte. Refactors must not move a pixel; a change that
means to (a new noise generator, say) regenerates the files with `python -m tests.golden.regenerate`
and says so in its commit.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest

from tests.golden.cases import CASES, GOLDEN_DIR, encode_input, golden_name
from tests.service.conftest import client

pytestmark = pytest.mark.timeout(900)


@pytest.mark.parametrize("case", CASES, ids=[golden_name(c) for c in CASES])
def test_generate_matches_the_golden_png(default_live, case: dict) -> None:
    with client(default_live) as http:
        response = http.post("/v1/generate", json=case, headers={"Accept": "image/png"})
    assert response.status_code == 200, response.text
    expected = (GOLDEN_DIR / f"{golden_name(case)}.png").read_bytes()
    assert response.content == expected


def test_encode_and_decode_match_the_golden_files(default_live) -> None:
    with client(default_live) as http:
        encoded = http.post(
            "/v1/encode",
            content=encode_input(),
            headers={"Content-Type": "image/png", "Accept": "application/x-npy"},
        )
        assert encoded.status_code == 200, encoded.text
        assert encoded.content == (GOLDEN_DIR / "encode.npy").read_bytes()
        decoded = http.post(
            "/v1/decode",
            content=encoded.content,
            headers={"Content-Type": "application/x-npy", "Accept": "image/png"},
        )
    assert decoded.status_code == 200, decoded.text
    assert decoded.content == (GOLDEN_DIR / "decode.png").read_bytes()
    latents = np.load(io.BytesIO(encoded.content))
    assert latents.shape == (1, 16, 8, 8) and np.isfinite(latents).all()
    assert base64.b64encode(decoded.content)  # a real PNG body, not an error document


def test_golden_files_exist() -> None:
    names = {p.name for p in Path(GOLDEN_DIR).iterdir()}
    assert {f"{golden_name(c)}.png" for c in CASES} | {"encode.npy", "decode.png"} <= names
