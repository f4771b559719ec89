"""Rewrite the golden files from the current code: `python -m tests.golden.regenerate`.

Only for a change that means to alter the default model's answers; say so in the commit.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import httpx

from export.cli import main as export_main
from service.embedded import WorkerThread
from service.redis_server import RedisServer
from tests.golden.cases import CASES, GOLDEN_DIR, encode_input, golden_name
from tests.golden.conftest import CHECKPOINT
from tests.service.conftest import LiveServer, make_settings


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        repository = Path(tmp)
        assert export_main(["--checkpoint", str(CHECKPOINT), "--repository", str(repository)]) == 0
        store = RedisServer()
        url = store.start()
        settings = make_settings(repository, url, model_name="fmnist32-tiny", max_steps=250)
        worker = WorkerThread(settings, url)
        worker.start()
        GOLDEN_DIR.mkdir(exist_ok=True)
        try:
            with LiveServer(settings) as server, httpx.Client(base_url=server.url, timeout=60) as http:
                for case in CASES:
                    r = http.post("/v1/generate", json=case, headers={"Accept": "image/png"})
                    r.raise_for_status()
                    (GOLDEN_DIR / f"{golden_name(case)}.png").write_bytes(r.content)
                enc = http.post(
                    "/v1/encode",
                    content=encode_input(),
                    headers={"Content-Type": "image/png", "Accept": "application/x-npy"},
                )
                enc.raise_for_status()
                (GOLDEN_DIR / "encode.npy").write_bytes(enc.content)
                dec = http.post(
                    "/v1/decode",
                    content=enc.content,
                    headers={"Content-Type": "application/x-npy", "Accept": "image/png"},
                )
                dec.raise_for_status()
                (GOLDEN_DIR / "decode.png").write_bytes(dec.content)
        finally:
            worker.stop(timeout_s=60.0)
            store.stop()


if __name__ == "__main__":
    main()
