"""Content-Type and Accept rules (RFC 9110 §12.5.1), on header strings alone."""

from __future__ import annotations

import pytest

from service.api.negotiation import JSON, NPY, PNG, choose, media_type
from service.errors import NotAcceptable


def test_media_type_drops_parameters_and_case() -> None:
    assert media_type("Application/JSON; charset=utf-8") == JSON
    assert media_type("") == ""


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, JSON),
        ("", JSON),
        ("*/*", JSON),  # anything: the default
        ("image/png", PNG),
        ("IMAGE/PNG", PNG),
        ("*/*, image/png", PNG),  # a type named explicitly beats a wildcard of equal weight
        ("image/*", PNG),
        ("image/png;q=0.5, application/json", JSON),  # weights decide
        ("application/json;q=0.2, image/png;q=0.9", PNG),
        ("application/json, image/png", JSON),  # equal weights: the client's first explicit type
        ("image/png, application/json", PNG),
        ("text/html, image/png", PNG),  # unknown types are skipped, not taken as a reason for JSON
        ("application/json;q=0, */*", PNG),  # the most specific range sets a type's weight
        ("image/png;q=0, */*;q=0.1", JSON),
        ("image/png;q=2, not-a-range", JSON),  # nothing valid: as if absent
        ("application/json; charset=utf-8", JSON),
    ],
)
def test_choose_follows_weights_then_specificity_then_order(accept: str | None, expected: str) -> None:
    assert choose(accept, (JSON, PNG)) == expected


@pytest.mark.parametrize(
    "accept", ["application/x-npy", "text/html", "*/*;q=0", "image/png;q=0, application/json;q=0"]
)
def test_nothing_acceptable_is_406(accept: str) -> None:
    with pytest.raises(NotAcceptable) as caught:
        choose(accept, (JSON, PNG))
    assert caught.value.status == 406 and "application/json, image/png" in caught.value.message


def test_choose_with_another_offer() -> None:
    assert choose("application/x-npy", (JSON, NPY)) == NPY
    assert choose("*/*", (JSON, NPY)) == JSON
    with pytest.raises(NotAcceptable):
        choose("image/*", (JSON, NPY))
