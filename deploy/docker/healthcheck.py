#!/usr/bin/env python3
"""Container HEALTHCHECK for both roles of the PAE image.

The image has no curl (fewer packages to patch), so this probes with the standard library. The role
comes from the file the entrypoint writes: an API container is alive when `/healthz` answers 200, a
worker when its metrics endpoint answers (it has no HTTP API of its own).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from pathlib import Path


def probe_url(role: str, env: dict[str, str]) -> str:
    """The URL that proves a process of `role` is alive."""
    if role == "api":
        return f"http://127.0.0.1:{env.get('PORT', '8000')}/healthz"
    if role == "worker":
        return f"http://127.0.0.1:{env.get('WORKER_METRICS_PORT', '9100')}/metrics"
    raise ValueError(f"unknown role {role!r} in the role file; expected 'api' or 'worker'")


def main() -> int:
    """Exit 0 when the role's endpoint answers 200, 1 otherwise (Docker's healthy/unhealthy)."""
    role_file = Path(os.environ.get("TMPDIR", "/tmp")) / "pae-role"
    try:
        role = role_file.read_text().strip()
        url = probe_url(role, dict(os.environ))
    except (OSError, ValueError) as exc:
        print(f"healthcheck: cannot tell the container's role from {role_file}: {exc}", file=sys.stderr)
        return 1
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            if response.status == 200:
                return 0
            print(f"healthcheck: {url} answered {response.status}", file=sys.stderr)
    except (urllib.error.URLError, OSError) as exc:
        print(f"healthcheck: {url} unreachable: {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
