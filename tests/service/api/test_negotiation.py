"""Content-Type and Accept rules, on header strings alone."""

from __future__ import annotations

import pytest

from service.api.negotiation import JSON, NPY, PNG, choose, media_type


def test_media_type_drops_parameters_and_case() -> None:
    assert media_type("Application/JSON; charset=utf-8") == JSON
    assert media_type("") == ""


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("", JSON),
        ("*/*", JSON),
        ("image/png", PNG),
        ("*/*, image/png", PNG),  # wildcards do not count as a preference
        ("image/png;q=0.5, application/json", PNG),  # the first explicit type wins
        ("application/json, image/png", JSON),
        ("text/html, image/png", JSON),  # a type the route cannot produce keeps the default
        ("application/x-npy", JSON),
    ],
)
def test_choose_takes_the_first_explicit_offered_type(accept: str, expected: str) -> None:
    assert choose(accept, (JSON, PNG)) == expected


def test_choose_with_another_offer() -> None:
    assert choose("application/x-npy", (JSON, NPY)) == NPY
    assert choose("image/png", (JSON, NPY)) == JSON
