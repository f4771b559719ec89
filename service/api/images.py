"""Decoding uploaded images for /v1/encode: off the event loop, in a bounded pool, within the deadline.

Decompressing and resizing a large image takes tens to hundreds of milliseconds of CPU. On the
event loop that would stall every other request of the replica; on an unbounded pool a burst of
large uploads would queue work nobody can finish in time. So each replica decodes in
IMAGE_DECODE_THREADS threads, refuses new encode requests (429, before their body is read) while
the pool already holds BACKLOG_PER_THREAD images per thread, and gives up waiting (504) when a
request's deadline passes; images not yet started are then never decoded. Small images, which
decode in well under a millisecond, are done inline: a thread hop would cost more.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
from PIL import Image

from service import codecs
from service.broker_protocol import now_ms
from service.errors import DeadlineExceeded

BACKLOG_PER_THREAD = 4


class ImageDecoder:
    """One replica's image-decoding pool and the count of images it holds (queued or running)."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.capacity = threads * BACKLOG_PER_THREAD
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pae-decode")
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        return self._held

    def refusal(self) -> str | None:
        """Why the pool takes no new request now (it is full), checked before a body is read."""
        if self._held < self.capacity:
            return None
        return (
            f"image decoding is saturated ({self._held} images waiting or decoding; "
            f"IMAGE_DECODE_THREADS={self.threads}); retry later"
        )

    def _release(self, _future: Future[np.ndarray]) -> None:
        with self._lock:
            self._held -= 1

    async def finish(self, images: Sequence[Image.Image], size: int, deadline_ms: int) -> list[np.ndarray]:
        """Decode images whose headers `codecs.open_image` accepted into model inputs, in order."""
        out: list[np.ndarray | None] = [None] * len(images)
        pending: dict[int, asyncio.Future[np.ndarray]] = {}
        for i, img in enumerate(images):
            if img.width * img.height <= codecs.INLINE_PIXELS:
                out[i] = codecs.finish_image(img, size)
                continue
            with self._lock:
                self._held += 1
            work = self._pool.submit(codecs.finish_image, img, size)
            work.add_done_callback(self._release)
            pending[i] = asyncio.wrap_future(work)
        if pending:
            timeout = max(deadline_ms - now_ms(), 1) / 1000
            try:
                done = await asyncio.wait_for(asyncio.gather(*pending.values()), timeout)
            except TimeoutError:
                raise DeadlineExceeded(
                    "decoding the uploaded images did not finish within the request's deadline"
                ) from None
            for i, array in zip(pending, done, strict=True):
                out[i] = array
        return [array for array in out if array is not None]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
