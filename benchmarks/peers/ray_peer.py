"""The Ray Serve peer: one replica behind Ray Serve's HTTP proxy, batching with `@serve.batch`.

    python -m benchmarks.peers.ray_peer --port 8002 --version-dir model_repository/fmnist32-tiny/1

Ray Serve's documented pattern: a FastAPI ingress deployment whose handlers decode the request and
await a `@serve.batch` method, which runs the graph on the whole batch. Batch size and wait are the
service's defaults (16 images, 5 ms) and `max_ongoing_requests` admits the benchmark's highest
concurrency, so batches can fill. It gets as many replicas as the service's worker gets compute
threads (`Settings.batch_threads`: one per core with single-threaded sessions), Ray's way of
computing several batches at once. Ray is an optional extra (`pip install -e '.[peers]'`).
"""

# No `from __future__ import annotations`: Ray ships the deployment class to its replica with
# cloudpickle, which keeps only the globals the code uses, so FastAPI there could not resolve the
# `Request` annotation from a string.
import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from fastapi import FastAPI, Request

from service.settings import Settings

MAX_BATCH = 16
BATCH_WAIT_S = 0.005
MAX_ONGOING = 256


def build(version_dir: Path, intra_op_threads: int, replicas: int):  # -> ray.serve Application
    import numpy as np
    from ray import serve

    from benchmarks.peers.graphs import Graphs, images_answer, latents_answer

    app = FastAPI(title="Ray Serve peer")

    @serve.deployment(
        num_replicas=replicas, max_ongoing_requests=MAX_ONGOING, ray_actor_options={"num_cpus": 0}
    )
    @serve.ingress(app)
    class Peer:
        def __init__(self) -> None:
            self.graphs = Graphs(version_dir, intra_op_threads)

        @app.get("/healthz")
        async def healthz(self):
            return {"status": "ok"}

        @app.post("/v1/encode")
        async def encode(self, request: Request):
            image = self.graphs.image(await request.body())
            return latents_answer((await self.encode_batch(image))[None], self.graphs.config)

        @app.post("/v1/decode")
        async def decode(self, request: Request):
            latent = self.graphs.latent(await request.json())
            return images_answer((await self.decode_batch(latent))[None], self.graphs.config)

        @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=BATCH_WAIT_S)
        async def encode_batch(self, images: list) -> list:
            return list(self.graphs.encode(np.stack(images)))

        @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=BATCH_WAIT_S)
        async def decode_batch(self, latents: list) -> list:
            return list(self.graphs.decode(np.stack(latents)))

    return Peer.bind()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--version-dir", type=Path, required=True)
    parser.add_argument("--intra-op-threads", type=int, default=0)
    parser.add_argument("--num-cpus", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        import ray
        from ray import serve
    except ImportError:
        sys.exit("Ray Serve is not installed: pip install -e '.[peers]'")
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    replicas = Settings(ort_intra_op_threads=args.intra_op_threads).batch_threads
    serve.run(
        build(args.version_dir.resolve(), args.intra_op_threads, replicas), name="peer", route_prefix="/"
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    ray.shutdown()  # stops the local cluster (its raylet ends the actors); serve.shutdown() drains for minutes


if __name__ == "__main__":
    main()
