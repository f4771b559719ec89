"""The service against Redis set up as a managed service is: TLS only for clients (`rediss://`, a
private CA given in the URL) and an ACL user with the least rights the external-Redis component
documents, read from that file, so the documentation is what is tested.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from service.embedded import WorkerThread
from service.launcher import free_port
from service.redis_server import RedisServer
from tests.service.conftest import LiveServer, client, make_settings
from tests.service.payloads import image_bytes, latent_json

COMPONENT = Path(__file__).resolve().parents[2] / "deploy/k8s/components/external-redis/kustomization.yaml"
SECRET = "acl-secret-7f3a9c1d"


def documented_acl() -> list[str]:
    """The `ACL SETUSER ...` line of the component's comments, password filled in, as words."""
    found = re.search(r"^#\s+ACL SETUSER (.+)$", COMPONENT.read_text(), re.M)
    assert found, f"no ACL SETUSER line in {COMPONENT}"
    return found.group(1).replace(">PASSWORD", f">{SECRET}").split()


def certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=folder, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "1", "-subj", "/CN=pae-test-ca")  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1")  # fmt: skip
    (folder / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "1", "-extfile", "san.cnf")  # fmt: skip
    return folder / "ca.crt", folder / "server.crt", folder / "server.key"


@pytest.fixture
def managed(tmp_path: Path) -> Iterator[str]:
    """A redis-server with a TLS port, the documented ACL user, and the default user switched off;
    the URL a client is given."""
    ca, cert, key = certificates(tmp_path)
    tls_port = free_port()
    tls = ["--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key)]
    tls += ["--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]
    server = RedisServer(extra_args=tls)
    server.start()
    try:
        admin = redis.Redis(port=server.port)
        admin.execute_command("ACL", "SETUSER", *documented_acl())
        admin.execute_command("ACL", "SETUSER", "default", "off")
        admin.close()
        yield f"rediss://pae:{SECRET}@127.0.0.1:{tls_port}/0?ssl_ca_certs={ca}"
    finally:
        server.stop()


def test_tls_and_the_documented_acl_user_serve_every_task(managed: str, tiny_repository: Path) -> None:
    settings = make_settings(tiny_repository, managed)
    worker = WorkerThread(settings)
    worker.start()
    try:
        with LiveServer(settings) as server, client(server) as http:
            assert http.get("/readyz").status_code == 200
            made = http.post("/v1/generate", json={"class_label": 1, "seed": 3, "steps": 2})
            encoded = http.post("/v1/encode", files={"file": image_bytes(16, 16, seed=1)})
            z = np.random.default_rng(0).standard_normal((4, 4, 4)).astype(np.float32)
            decoded = http.post("/v1/decode", json=latent_json(z))
            assert [r.status_code for r in (made, encoded, decoded)] == [200] * 3
    finally:
        assert worker.stop(timeout_s=60.0)
    user = redis.Redis.from_url(managed)
    for refused in (user.flushall, lambda: user.keys("*"), lambda: user.set("elsewhere", 1)):
        with pytest.raises(redis.exceptions.NoPermissionError):
            refused()
    user.close()
    with pytest.raises(redis.exceptions.ConnectionError):  # no plain-text clients on the TLS port
        redis.Redis.from_url(managed.split("?")[0].replace("rediss://", "redis://"), socket_timeout=2).ping()
