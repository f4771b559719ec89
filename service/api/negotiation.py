"""Media types in and out: what a request's Content-Type says and which answer format Accept picks.

Kept apart from the handlers so the rule is written once and can be tested on header strings alone.
"""

from __future__ import annotations

from collections.abc import Sequence

from service.codecs import NPY_MEDIA_TYPE

JSON = "application/json"
PNG = "image/png"
NPY = NPY_MEDIA_TYPE
MULTIPART = "multipart/form-data"
IMAGE_TYPES: tuple[str, ...] = ("image/png", "image/jpeg", "image/webp")
_WILDCARDS = ("*/*", "application/*", "image/*")


def media_type(content_type: str) -> str:
    """The bare, lower-case media type of a Content-Type header (parameters dropped); "" when absent."""
    return content_type.split(";")[0].strip().lower()


def choose(accept: str, offered: Sequence[str]) -> str:
    """The answer format for an Accept header among `offered`, whose first entry is the default.

    The client's first explicit media type wins when it is offered; wildcards, an absent header or
    a type this endpoint cannot produce keep the default.
    """
    for part in accept.split(","):
        kind = media_type(part)
        if kind and kind not in _WILDCARDS:
            return kind if kind in offered else offered[0]
    return offered[0]
