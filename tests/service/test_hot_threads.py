"""HotThreads: the most recently idle thread takes the next call; calls beyond its size wait."""

from __future__ import annotations

import threading
import time

import pytest

from service.hot_threads import HotThreads


def run(pool: HotThreads, call) -> None:
    done = threading.Event()

    def wrapped() -> None:
        try:
            call()
        finally:
            done.set()

    pool.submit(wrapped)
    assert done.wait(5)


def test_after_a_burst_sequential_calls_stay_on_one_thread() -> None:
    pool = HotThreads(4, "test")
    release, started = threading.Event(), threading.Semaphore(0)
    finished = threading.Barrier(5)

    def held() -> None:
        started.release()
        release.wait(5)
        finished.wait(5)

    for _ in range(4):
        pool.submit(held)
    for _ in range(4):
        assert started.acquire(timeout=5)
    release.set()
    finished.wait(5)
    time.sleep(0.05)  # every thread back on the idle stack
    assert pool.started == 4
    names: list[str] = []
    for _ in range(20):
        run(pool, lambda: names.append(threading.current_thread().name))
        time.sleep(0.005)  # the next request comes after this one's answer went out
    assert len(set(names)) == 1, names
    assert pool.started == 4


def test_calls_beyond_the_size_wait_and_all_run() -> None:
    pool = HotThreads(2, "test")
    gate = threading.Event()
    ran: list[int] = []
    lock = threading.Lock()
    all_done = threading.Semaphore(0)

    def call(i: int) -> None:
        gate.wait(5)
        with lock:
            ran.append(i)
        all_done.release()

    for i in range(10):
        pool.submit(lambda i=i: call(i))
    assert pool.started == 2
    gate.set()
    for _ in range(10):
        assert all_done.acquire(timeout=5)
    assert sorted(ran) == list(range(10))


def test_a_raising_call_is_logged_and_its_thread_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    pool = HotThreads(1, "test")

    def boom() -> None:
        raise RuntimeError("boom")

    pool.submit(boom)
    names: list[str] = []
    run(pool, lambda: names.append(threading.current_thread().name))
    assert names == ["test_1"] and pool.started == 1
    assert "boom" in caplog.text


def test_a_pool_needs_a_thread() -> None:
    with pytest.raises(ValueError, match="at least one"):
        HotThreads(0, "test")
