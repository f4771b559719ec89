"""The API key check: with API_KEY set, a route that depends on `require_key` needs the bearer token.

Probes, /metrics and the API's own description stay open (see `service.api.health`): they hold no
model output, cost no compute, and must answer Kubernetes and Prometheus without a secret.
"""

from __future__ import annotations

import hmac

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param

from service.api.state import AppState, State
from service.errors import ServiceError
from service.settings import Settings

bearer = HTTPBearer(auto_error=False, description="API key (when the server sets API_KEY)")


def has_key(settings: Settings, authorization: str | None) -> bool:
    """Whether an Authorization header carries `Bearer <API_KEY>` (always true without API_KEY)."""
    key = settings.api_key
    if key is None:
        return True
    scheme, credentials = get_authorization_scheme_param(authorization)
    # Constant-time comparison: the time to reject must not reveal how much of the key matched.
    return scheme.lower() == "bearer" and hmac.compare_digest(credentials.encode(), key.encode())


async def require_key(
    request: Request, state: State, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
) -> None:
    """Dependency: 401 unless the request carries `Authorization: Bearer <API_KEY>` (when one is set)."""
    check_key(state, request, credentials)


def check_key(state: AppState, request: Request, credentials: HTTPAuthorizationCredentials | None) -> None:
    """401 unless the request carries the API key (when one is set); `credentials` from `bearer`."""
    if has_key(state.settings, request.headers.get("authorization")):
        return
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise ServiceError("missing API key: send 'Authorization: Bearer <key>'", status=401)
    raise ServiceError("invalid API key", status=401)
