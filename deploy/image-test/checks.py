"""What the image test asks of a running PAE service, over HTTP on 127.0.0.1.

The answers are compared byte for byte with tests/golden/fmnist32-tiny: the same requests that the
golden test sends to the service run from the repository (`make run`'s code path), so equal bytes
mean the image answers exactly what `make run` answers.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from engine import Container

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.golden.cases import CASES, GOLDEN_DIR, encode_input, golden_name  # noqa: E402

NPY = "application/x-npy"


@dataclass
class Report:
    """Named pass/fail results, printed as they come; `summary()` is the closing count line."""

    results: list[tuple[str, bool, str]] = field(default_factory=list)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        """Record one result and print it."""
        self.results.append((name, bool(ok), detail))
        print(f"{'PASS' if ok else 'FAIL'} {name}" + (f" — {detail}" if detail else ""), flush=True)
        return bool(ok)

    def attempt(self, name: str, probe: Callable[[], tuple[bool, str]]) -> bool:
        """Record `probe()`'s verdict; an exception is a failure with its message."""
        try:
            ok, detail = probe()
        except Exception as exc:  # a failed probe must not stop the other checks
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        return self.check(name, ok, detail)

    @property
    def failed(self) -> int:
        """How many checks failed."""
        return sum(not ok for _, ok, _ in self.results)

    def summary(self) -> str:
        """'N passed, N failed', the line CI reads."""
        return f"{len(self.results) - self.failed} passed, {self.failed} failed"


def wait_ready(url: str, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> float:
    """Seconds until GET /readyz answers 200; raises TimeoutError (or RuntimeError if `alive` turns false)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        if not alive():
            raise RuntimeError(f"{url}: the container exited before it was ready")
        time.sleep(0.5)
    raise TimeoutError(f"{url}/readyz did not answer 200 within {timeout_s:.0f} s")


def not_ready_without_redis(url: str, timeout_s: float) -> tuple[bool, str]:
    """Once the API answers at all, /readyz says 503 and names Redis (it is not there yet)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/readyz", timeout=5)
        except httpx.HTTPError:
            time.sleep(0.5)
            continue
        return response.status_code == 503 and "redis" in response.text.lower(), (
            f"{response.status_code} {response.text[:160]}"
        )
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s")


def generate_matches_golden(url: str, cases: list[dict] = CASES) -> tuple[bool, str]:
    """POST each golden generate case (Accept: image/png); all PNGs equal the committed ones."""
    mismatched = []
    with httpx.Client(base_url=url, timeout=120) as http:
        for case in cases:
            response = http.post("/v1/generate", json=case, headers={"Accept": "image/png"})
            expected = (GOLDEN_DIR / f"{golden_name(case)}.png").read_bytes()
            if response.status_code != 200 or response.content != expected:
                mismatched.append(f"{golden_name(case)} ({response.status_code})")
    detail = f"{len(cases) - len(mismatched)}/{len(cases)} PNGs byte-identical to tests/golden"
    return not mismatched, detail + (f"; differ: {', '.join(mismatched)}" if mismatched else "")


def encode_decode_match_golden(url: str) -> tuple[bool, str]:
    """The golden encode (PNG → .npy) and decode (.npy → PNG) answers, byte for byte."""
    with httpx.Client(base_url=url, timeout=120) as http:
        encoded = http.post(
            "/v1/encode", content=encode_input(), headers={"Content-Type": "image/png", "Accept": NPY}
        )
        decoded = http.post(
            "/v1/decode", content=encoded.content, headers={"Content-Type": NPY, "Accept": "image/png"}
        )
    same_latent = encoded.status_code == 200 and encoded.content == (GOLDEN_DIR / "encode.npy").read_bytes()
    same_png = decoded.status_code == 200 and decoded.content == (GOLDEN_DIR / "decode.png").read_bytes()
    detail = f"encode {encoded.status_code} {'==' if same_latent else '!='} golden, "
    detail += f"decode {decoded.status_code} {'==' if same_png else '!='} golden"
    return same_latent and same_png, detail


def metric_total(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` in a Prometheus text exposition."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(?:{{(.*)}})? ([0-9.eE+-]+|NaN)$", line)
        if not match:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(1) or ""))
        if all(found.get(key) == value for key, value in labels.items()):
            total += float(match.group(2))
    return total


def api_metrics_count_requests(url: str) -> tuple[bool, str]:
    """/metrics of an API counts the generate requests it answered with 200."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    served = metric_total(text, "pae_requests_total", endpoint="generate", status="200")
    return served > 0, f"pae_requests_total{{endpoint=generate,status=200}} = {served:g}"


def worker_metrics_count_batches(url: str) -> tuple[bool, str]:
    """A worker's own /metrics counts the generate batches it ran."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    batches = metric_total(text, "pae_batch_size_count", task="generate")
    return batches > 0, f"pae_batch_size_count{{task=generate}} = {batches:g}"


def generate_png(url: str) -> tuple[bool, str]:
    """A generate answers 200 with a PNG (for runtimes whose float rounding differs from ORT's)."""
    response = httpx.post(f"{url}/v1/generate", json=CASES[0], headers={"Accept": "image/png"}, timeout=120)
    is_png = response.content.startswith(b"\x89PNG\r\n\x1a\n")
    return response.status_code == 200 and is_png, f"{response.status_code}, {len(response.content)} bytes"


def one_generate(url: str) -> tuple[bool, str]:
    """The first golden case through one API (used once per compose replica)."""
    return generate_matches_golden(url, CASES[:1])


def security_options(container: Container) -> tuple[bool, str]:
    """What compose.yaml asks, seen from inside the container: uid 10001, no effective capability,
    no-new-privileges, and a root file system that refuses writes (while /tmp takes them)."""
    status = dict(
        line.split(":\t", 1)
        for line in container.exec("cat", "/proc/self/status").stdout.splitlines()
        if ":\t" in line
    )
    uid = container.exec("id", "-u").stdout.strip()
    root_refuses = container.exec("touch", "/home/pae/probe").returncode != 0
    tmp_takes = container.exec("touch", "/tmp/probe").returncode == 0
    read_only = container.inspect()["HostConfig"]["ReadonlyRootfs"]
    caps, nnp = status.get("CapEff", "?").strip(), status.get("NoNewPrivs", "?").strip()
    ok = uid == "10001" and int(caps, 16) == 0 and nnp == "1" and read_only and root_refuses and tmp_takes
    detail = f"uid {uid}, CapEff {caps}, NoNewPrivs {nnp}, read-only root {read_only} "
    return ok, detail + f"(write to /home/pae refused: {root_refuses}, /tmp writable: {tmp_takes})"
