"""A thread pool that hands each call to the thread that went idle last.

`concurrent.futures.ThreadPoolExecutor` keeps one queue that all its idle threads wait on, so
whichever wakes first takes the next call: once a burst has started all its threads, calls at low
concurrency rotate over every one of them, each waking cold on whichever core is free. For the
direct lane that cost 9 % of the decode requests per second at concurrency 1 after a burst of 32
(313 against 344 req/s, `benchmarks.peers`' client on the 2-core VM). Here idle threads form a
stack, so the hot thread serves a lone request again and again and the others stay asleep; anyio's
worker threads, which a plain FastAPI server runs its handlers on, are reused in the same order.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable

log = logging.getLogger(__name__)


class HotThreads:
    """Up to `size` threads running submitted calls: the most recently idle thread first, a new
    thread while fewer than `size` exist, else the call waits for the first thread to finish.

    A call that raises is logged and its thread goes on; threads are daemons, started on demand,
    and live as long as the process.
    """

    def __init__(self, size: int, name: str) -> None:
        if size < 1:
            raise ValueError(f"a thread pool needs at least one thread, got {size}")
        self.size = size
        self.name = name
        self._lock = threading.Lock()
        self._idle: list[queue.SimpleQueue[Callable[[], None]]] = []
        self._waiting: deque[Callable[[], None]] = deque()
        self._started = 0

    @property
    def started(self) -> int:
        return self._started

    def submit(self, call: Callable[[], None]) -> None:
        with self._lock:
            if self._idle:
                self._idle.pop().put(call)
                return
            if self._started >= self.size:
                self._waiting.append(call)
                return
            self._started += 1
            index = self._started
        inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        inbox.put(call)
        threading.Thread(target=self._serve, args=(inbox,), name=f"{self.name}_{index}", daemon=True).start()

    def _serve(self, inbox: queue.SimpleQueue[Callable[[], None]]) -> None:
        while True:
            call = inbox.get()
            while call is not None:
                try:
                    call()
                except Exception:
                    log.exception("a call on %s's threads raised", self.name)
                with self._lock:
                    if self._waiting:
                        call = self._waiting.popleft()
                    else:
                        self._idle.append(inbox)
                        call = None
