"""Fuzz the live service through its own OpenAPI schema with schemathesis: no input may cause a
5xx, and every answer must be what the schema says (status, content type, headers, body schema).

Every operation the schema declares gets schema-conforming (positive) and schema-violating
(negative) cases from schemathesis's Hypothesis strategies, sent over real HTTP to uvicorn with a
real redis-server and worker behind it; each answer goes through schemathesis's conformance checks.
The one 5xx a client can legitimately cause is a 504 when it asks for a deadline shorter than the
work (`X-Request-Timeout` below a second); anything else at or above 500 fails the test. The
default run sends over 1 000 cases to the POST endpoints (the whole budget goes to them; there is
no stateful phase to starve them); the slow one over 3 000.
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
from schemathesis.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.failures import FailureGroup

from service.embedded import WorkerThread
from tests.service.conftest import LiveServer, make_settings

SHORT_DEADLINE_S = 1.0
CONFORMANCE = [
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


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
        try:
            case.validate_response(response, checks=CONFORMANCE)
        except (AssertionError, FailureGroup) as exc:
            failures.append(f"{case.operation.label} → {response.status_code} breaks the schema: {exc}")

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


POSTS = ("POST /v1/encode", "POST /v1/decode", "POST /v1/generate")


def test_fuzz_openapi(server: LiveServer) -> None:
    seen = fuzz(server, post_examples=340, get_examples=3)
    posts = sum(sum(seen[label].values()) for label in POSTS)
    print({label: dict(c) for label, c in seen.items()}, "POST cases", posts)
    assert posts >= 1000, {label: dict(c) for label, c in seen.items()}
    for label in POSTS:
        assert any(400 <= s < 500 for s in seen[label]), f"{label}: no bad input was generated {seen[label]}"
    assert seen["POST /v1/generate"][200] > 0, "no valid generate request was generated"


@pytest.mark.slow
def test_fuzz_openapi_long(server: LiveServer) -> None:
    seen = fuzz(server, post_examples=1100, get_examples=20)
    posts = sum(sum(seen[label].values()) for label in POSTS)
    print({label: dict(c) for label, c in seen.items()}, "POST cases", posts)
    assert posts >= 3000
