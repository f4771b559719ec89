"""The request deadline from REQUEST_TIMEOUT_S and X-Request-Timeout."""

from __future__ import annotations

import pytest

from service.api.jobs import request_deadline
from service.api.state import AppState
from service.broker import now_ms
from service.errors import BadInput


def test_deadline_defaults_to_the_setting_and_a_header_can_only_shorten_it(state: AppState) -> None:
    limit_ms = state.settings.request_timeout_s * 1000
    before = now_ms()
    assert before + limit_ms <= request_deadline(state, None) <= now_ms() + limit_ms
    assert request_deadline(state, "0.5") <= now_ms() + 500
    assert request_deadline(state, str(10 * state.settings.request_timeout_s)) <= now_ms() + limit_ms


@pytest.mark.parametrize(
    ("header", "message"), [("soon", "a number"), ("0", "> 0"), ("-1", "> 0"), ("inf", "> 0")]
)
def test_bad_timeout_header_is_422_naming_it(state: AppState, header: str, message: str) -> None:
    with pytest.raises(BadInput) as caught:
        request_deadline(state, header)
    assert caught.value.status == 422
    assert "X-Request-Timeout" in caught.value.message and message in caught.value.message
