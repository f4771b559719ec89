"""The fault campaign's clients: steady mixed traffic from a closed loop, and a prober that keeps
sending fresh requests and readiness checks whatever the traffic's clients are waiting on."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import httpx

from benchmarks.fault_ledger import REQUEST_TIMEOUT_S
from benchmarks.traffic import TASKS, Call, Requests, Sample, closed_loop, drive

CLIENT_TIMEOUT_S = REQUEST_TIMEOUT_S + 15
"""Longer than any deadline: a request still unanswered then has hung."""


class Traffic:
    """Mixed, verified requests from a background thread until stopped (or `limit_s` passes)."""

    def __init__(self, urls: Sequence[str], requests: Requests, concurrency: int, limit_s: float) -> None:
        self.urls = list(urls)
        self.requests = requests
        self.concurrency = concurrency
        self.limit_s = limit_s
        self.stop_event = threading.Event()
        self.samples: list[Sample] = []
        self.thread = threading.Thread(target=self._run, name="fault-traffic", daemon=True)

    def _make(self, n: int) -> tuple[str, Call]:
        endpoint = TASKS[n % len(TASKS)]
        return endpoint, self.requests.make(endpoint, n)

    def _run(self) -> None:
        self.samples, _ = drive(
            closed_loop(
                self.urls,
                self._make,
                self.concurrency,
                duration_s=self.limit_s,
                timeout_s=CLIENT_TIMEOUT_S,
                stop=self.stop_event,
            )
        )

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def finish(self) -> list[Sample]:
        """Stop sending, wait for the requests in flight to end, and return every sample."""
        self.stop_event.set()
        self.thread.join(CLIENT_TIMEOUT_S + 15)
        if self.thread.is_alive():
            raise RuntimeError("traffic did not stop: a request outlived the client timeout")
        return self.samples

    def __exit__(self, *exc: object) -> None:
        self.finish()


def generate_call(url: str) -> Sample:
    """One blocking generate request, as a Sample (for probes outside the closed-loop traffic)."""
    asked, start = time.time(), time.perf_counter()
    try:
        response = httpx.post(
            f"{url}/v1/generate", json={"class_label": 0, "steps": 1}, timeout=CLIENT_TIMEOUT_S
        )
    except httpx.HTTPError as exc:
        latency = (time.perf_counter() - start) * 1000
        return Sample(0, latency, None, None, f"{type(exc).__name__}: {exc}", asked, "generate")
    latency = (time.perf_counter() - start) * 1000
    error = "" if response.status_code == 200 else response.text[:300]
    return Sample(response.status_code, latency, None, None, error, asked, "generate")


class Prober:
    """Readiness and a fresh generate call to one replica every `every_s`, from a thread of its own.

    The closed-loop clients may all be waiting on jobs queued before a fault; the prober's calls
    show what a new request gets at each moment. They are accounted for with the traffic.
    """

    def __init__(self, url: str, every_s: float = 0.2) -> None:
        self.url = url
        self.every_s = every_s
        self.probes: list[tuple[float, int]] = []
        self.calls: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-prober", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            asked = time.time()
            try:
                self.probes.append((asked, httpx.get(f"{self.url}/readyz", timeout=2).status_code))
            except httpx.HTTPError:
                self.probes.append((asked, 0))
            self.calls.append(generate_call(self.url))
            time.sleep(self.every_s)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(CLIENT_TIMEOUT_S + 5)

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def readiness_between(self, start: float, end: float) -> list[int]:
        """The distinct /readyz statuses seen between two times (epoch seconds)."""
        return sorted({status for t, status in self.probes if start < t < end})

    def ready_again_after(self, t: float) -> float | None:
        """Seconds from `t` to the first ready answer asked after it (None: never)."""
        ready = [asked for asked, status in self.probes if asked >= t and status == 200]
        return round(min(ready) - t, 2) if ready else None
