"""The plain peer: one FastAPI process calling ONNX Runtime in its handlers, no queue, no batching.

    python -m benchmarks.peers.plain --port 8001 --version-dir model_repository/fmnist32-tiny/1

What a user writes first: synchronous handlers, which FastAPI runs on its thread pool, so several
requests compute at once (ONNX Runtime releases the GIL) and each one runs its graph at batch 1.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import uvicorn
from fastapi import Body, FastAPI
from pydantic import BaseModel

from benchmarks.peers.graphs import Graphs, images_answer, latents_answer


class LatentPayload(BaseModel):
    shape: list[int]
    dtype: str
    data: str


def build_app(graphs: Graphs) -> FastAPI:
    app = FastAPI(title="plain FastAPI + ONNX Runtime peer")
    # Handlers are written without return annotations, as a first version usually is (FastAPI
    # would otherwise validate every answer against the annotation).

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.post("/v1/encode")
    def encode(image: Annotated[bytes, Body(media_type="image/png")]):
        return latents_answer(graphs.encode(graphs.image(image)[None]), graphs.config)

    @app.post("/v1/decode")
    def decode(payload: LatentPayload):
        return images_answer(graphs.decode(graphs.latent(payload.model_dump())[None]), graphs.config)

    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--version-dir", type=Path, required=True)
    parser.add_argument("--intra-op-threads", type=int, default=0)
    args = parser.parse_args(argv)
    app = build_app(Graphs(args.version_dir, args.intra_op_threads))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
