"""The API key check: with API_KEY set, a route that depends on `require_key` needs the bearer token.

Probes, /metrics and the API's own description stay open (see `service.api.health`): they hold no
model output, cost no compute, and must answer Kubernetes and Prometheus without a secret.
"""

from __future__ import annotations

import hmac

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.state import State
from service.errors import ServiceError

bearer = HTTPBearer(auto_error=False, description="API key (when the server sets API_KEY)")


async def require_key(
    state: State, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
) -> None:
    """Dependency: 401 unless the request carries `Authorization: Bearer <API_KEY>` (when one is set)."""
    key = state.settings.api_key
    if key is None:
        return
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise ServiceError("missing API key: send 'Authorization: Bearer <key>'", status=401)
    # Constant-time comparison: the time to reject must not reveal how much of the key matched.
    if not hmac.compare_digest(credentials.credentials.encode(), key.encode()):
        raise ServiceError("invalid API key", status=401)
