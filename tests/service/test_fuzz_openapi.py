"""Fuzz the live service through its own OpenAPI schema with schemathesis: no input may cause a 5xx.

Every operation the schema declares gets schema-conforming (positive) and schema-violating
(negative) cases from schemathesis's Hypothesis strategies, sent over real HTTP to uvicorn with a
real redis-server and worker behind it. The one 5xx a client can legitimately cause is a 504 when
it asks for a deadline shorter than the work (`X-Request-Timeout` below a second); anything else
at or above 500 fails the test. The default run sends about 100 cases; the slow one more than 500.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from service.embedded import WorkerThread
from tests.service.conftest import LiveServer, make_settings

SHORT_DEADLINE_S = 1.0


@pytest.fixture(scope="module")
def server(tiny_repository: Path, redis_url: str) -> Iterator[LiveServer]:
    config = make_settings(tiny_repository, redis_url, queue_max_len=1024)
    worker = WorkerThread(config, redis_url)
    worker.start()
    try:
        with LiveServer(config) as live:
            yield live
    finally:
        worker.stop()


def short_deadline(case: schemathesis.Case) -> bool:
    """Whether the case asked for a deadline under SHORT_DEADLINE_S (a 504 is then its own doing)."""
    raw = (case.headers or {}).get("X-Request-Timeout")
    try:
        return raw is not None and 0 < float(raw) < SHORT_DEADLINE_S
    except (TypeError, ValueError):
        return False


def fuzz_operation(
    server: LiveServer, operation: object, examples: int, session: requests.Session
) -> tuple[collections.Counter, list[str]]:
    """Send `examples` cases of one operation; return the status counts and the failures."""
    counts: collections.Counter = collections.Counter()
    failures: list[str] = []
    strategies = [operation.as_strategy(GenerationMode.POSITIVE)]
    if operation.method.upper() == "POST":
        strategies.append(operation.as_strategy(GenerationMode.NEGATIVE))

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=st.one_of(strategies))
    def run(case: schemathesis.Case) -> None:
        response = case.call(base_url=server.url, session=session, timeout=30)
        counts[response.status_code] += 1
        if response.status_code >= 500 and not (response.status_code == 504 and short_deadline(case)):
            failures.append(f"{case.operation.label} → {response.status_code}: {response.text[:300]}")

    run()
    return counts, failures


def fuzz(server: LiveServer, post_examples: int, get_examples: int) -> dict[str, collections.Counter]:
    """Run every operation's cases; return the status counts per operation label."""
    raw = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    schema = schemathesis.openapi.from_dict(raw)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/encode", "POST /v1/decode", "POST /v1/generate"}
    seen: dict[str, collections.Counter] = {}
    failures: list[str] = []
    with requests.Session() as session:
        for operation in operations:
            examples = post_examples if operation.method.upper() == "POST" else get_examples
            seen[operation.label], failed = fuzz_operation(server, operation, examples, session)
            failures += failed
    assert not failures, "\n".join(failures[:10])
    return seen


def test_fuzz_openapi_quick(server: LiveServer) -> None:
    seen = fuzz(server, post_examples=30, get_examples=3)
    total = sum(sum(c.values()) for c in seen.values())
    assert total >= 100, {label: dict(c) for label, c in seen.items()}
    for label in ("POST /v1/encode", "POST /v1/decode", "POST /v1/generate"):
        assert any(400 <= s < 500 for s in seen[label]), f"{label}: no bad input was generated {seen[label]}"


@pytest.mark.slow
def test_fuzz_openapi_full(server: LiveServer) -> None:
    seen = fuzz(server, post_examples=170, get_examples=10)
    total = sum(sum(c.values()) for c in seen.values())
    print({label: dict(c) for label, c in seen.items()}, "total", total)
    assert total >= 500
    assert seen["POST /v1/generate"][200] > 0, "no valid generate request was generated"
