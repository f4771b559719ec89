"""Media types in and out: what a request's Content-Type says and which answer format Accept picks.

Kept apart from the handlers so the rule is written once and can be tested on header strings alone.
The answer format follows RFC 9110 §12.5.1: each offered type gets the weight (q) of the most
specific range that matches it (`image/png` over `image/*` over `*/*`); the heaviest wins, a tie
goes to the type the client named explicitly, then to the endpoint's default; q=0 refuses a type;
and when the client accepts none of the offered types the answer is 406. No Accept header (or one
holding no valid range) means "anything", so the default.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from service.codecs import NPY_MEDIA_TYPE
from service.errors import NotAcceptable

JSON = "application/json"
PNG = "image/png"
NPY = NPY_MEDIA_TYPE
MULTIPART = "multipart/form-data"
IMAGE_TYPES: tuple[str, ...] = ("image/png", "image/jpeg", "image/webp")


def media_type(content_type: str) -> str:
    """The bare, lower-case media type of a Content-Type header (parameters dropped); "" when absent."""
    return content_type.split(";")[0].strip().lower()


class MediaRange(NamedTuple):
    kind: str  # "image/png", "image/*" or "*/*"
    q: float
    position: int  # order in the header

    @property
    def specificity(self) -> int:
        return 0 if self.kind == "*/*" else 1 if self.kind.endswith("/*") else 2

    def matches(self, media: str) -> bool:
        return self.kind in ("*/*", media) or (self.specificity == 1 and media.startswith(self.kind[:-1]))


def _weight(params: list[str]) -> float | None:
    """The q parameter (1 when absent); None when it is not a qvalue (0 to 1, three decimals)."""
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            value = value.strip()
            try:
                q = float(value)
            except ValueError:
                return None
            decimals = value.partition(".")[2]
            return q if 0.0 <= q <= 1.0 and len(decimals) <= 3 and value[:1].isdigit() else None
    return 1.0


def parse_accept(accept: str) -> list[MediaRange]:
    """The valid media ranges of an Accept header; malformed ranges are skipped."""
    ranges = []
    for position, part in enumerate(accept.split(",")):
        kind, *params = part.split(";")
        kind = kind.strip().lower()
        main, slash, sub = kind.partition("/")
        q = _weight(params)
        if slash and main and sub and q is not None and (main != "*" or sub == "*"):
            ranges.append(MediaRange(kind, q, position))
    return ranges


def choose(accept: str | None, offered: Sequence[str]) -> str:
    """The answer format for an Accept header among `offered` (its first entry is the default).

    Raises NotAcceptable (406) when the header accepts none of them.
    """
    ranges = parse_accept(accept or "")
    if not ranges:
        return offered[0]
    best: tuple[float, int, int] | None = None
    chosen = offered[0]
    for rank, media in enumerate(offered):
        matching = [r for r in ranges if r.matches(media)]
        if not matching:
            continue
        top = max(r.specificity for r in matching)
        decisive = min((r for r in matching if r.specificity == top), key=lambda r: r.position)
        if decisive.q <= 0:
            continue
        explicit = decisive.position if top == 2 else len(ranges)
        key = (decisive.q, -explicit, -rank)
        if best is None or key > best:
            best, chosen = key, media
    if best is None:
        shown = accept if len(accept) <= 100 else accept[:99] + "…"
        raise NotAcceptable(
            f"Accept: {shown} allows none of the formats this answer comes in: {', '.join(offered)}"
        )
    return chosen
