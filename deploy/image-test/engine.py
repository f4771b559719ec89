"""podman and buildah as the image test drives them: host setup, builds, containers.

Every call runs with CONTAINERS_CONF pointing at this directory's containers.conf (runc, cgroupfs,
ulimits the VM allows), so nothing under /etc/containers is changed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# Debian packages. Beside the tools: netavark + aardvark-dns give compose networks DNS (service names resolve),
# iptables lets netavark publish ports, uidmap and fuse-overlayfs are podman's usual companions.
PACKAGES = (
    "podman",
    "buildah",
    "runc",
    "debootstrap",
    "podman-compose",
    "netavark",
    "aardvark-dns",
    "iptables",
    "uidmap",
    "fuse-overlayfs",
    "slirp4netns",
)
# The compose stack's security options (deploy/compose.yaml), applied to every PAE container here.
HARDENED = ("--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges")


def environment() -> dict[str, str]:
    """The process environment with this test's containers.conf."""
    return {**os.environ, "CONTAINERS_CONF": str(HERE / "containers.conf")}


def run(
    args: Sequence[str], *, check: bool = True, timeout: float = 600.0, **kwargs
) -> subprocess.CompletedProcess:
    """Run a command with the test's environment, capturing text output."""
    kwargs.setdefault("capture_output", True)
    return subprocess.run(list(args), env=environment(), text=True, check=check, timeout=timeout, **kwargs)


def missing_packages() -> list[str]:
    """The PACKAGES dpkg does not list as installed (without dpkg: those whose command is missing)."""
    if shutil.which("dpkg-query") is None:
        return [name for name in PACKAGES if shutil.which(name) is None]
    listing = subprocess.run(
        ["dpkg-query", "--show", "--showformat=${Package} ${Status}\n", *PACKAGES],
        capture_output=True,
        text=True,
    ).stdout
    installed = {line.split()[0] for line in listing.splitlines() if line.endswith(" ok installed")}
    return [name for name in PACKAGES if name not in installed]


def install_host_tools() -> list[str]:
    """apt-get install the missing PACKAGES (root); returns what was installed."""
    missing = missing_packages()
    if not missing:
        return []
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SystemExit(f"missing {missing}; install them as root: apt-get install {' '.join(missing)}")
    apt_env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=apt_env)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
        check=True,
        env=apt_env,
        stdout=subprocess.DEVNULL,
    )
    return missing


def base_image() -> str:
    """Tag of the debootstrap base image (built by base-image.sh when not there yet)."""
    result = run(["bash", str(HERE / "base-image.sh")], capture_output=False, stdout=subprocess.PIPE)
    return result.stdout.strip().splitlines()[-1]


def build(
    context: Path,
    tag: str,
    target: str,
    build_args: Mapping[str, str],
    *,
    file: Path | None = None,
    log: Path,
    no_cache: bool = False,
) -> float:
    """`podman build` one target (docker format keeps HEALTHCHECK); returns seconds. Output to `log`."""
    command = [
        "podman",
        "build",
        "--format",
        "docker",
        "--network",
        "host",
        "--target",
        target,
        "--tag",
        tag,
        "--file",
        str(file or context / "Dockerfile"),
    ]
    if no_cache:
        command.append("--no-cache")
    for key, value in build_args.items():
        command += ["--build-arg", f"{key}={value}"]
    start = time.monotonic()
    with log.open("a") as out:
        out.write(f"$ {' '.join(command)} {context}\n")
        out.flush()
        result = subprocess.run(
            [*command, str(context)], env=environment(), stdout=out, stderr=subprocess.STDOUT
        )
    elapsed = time.monotonic() - start
    if result.returncode != 0:
        raise SystemExit(f"podman build --target {target} failed ({result.returncode}); see {log}")
    return elapsed


def inspect_image(tag: str) -> dict:
    """`podman image inspect` of one image."""
    return json.loads(run(["podman", "image", "inspect", tag]).stdout)[0]


def image_size(tag: str) -> int:
    """Uncompressed size of an image in bytes, as `podman images` reports it."""
    return int(inspect_image(tag)["Size"])


@dataclass
class Container:
    """One detached container; `ports` maps container ports to their 127.0.0.1 host ports."""

    name: str
    ports: dict[int, int] = field(default_factory=dict)

    @classmethod
    def start(
        cls,
        name: str,
        image: str,
        command: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        publish: Sequence[int] = (),
        network: str | None = None,
        alias: str | None = None,
        hardened: bool = True,
        extra: Sequence[str] = (),
    ) -> Container:
        """`podman run -d`; published ports get free host ports on 127.0.0.1."""
        run(["podman", "rm", "--force", "--ignore", name])
        args = ["podman", "run", "--detach", "--name", name]
        args += list(HARDENED) if hardened else []
        for port in publish:
            args += ["--publish", f"127.0.0.1::{port}"]
        if network:
            args += ["--network", network]
        if alias:
            args += ["--network-alias", alias]
        for key, value in (env or {}).items():
            args += ["--env", f"{key}={value}"]
        run([*args, *extra, image, *command])
        container = cls(name)
        for port in publish:
            container.ports[port] = container.host_port(port)
        return container

    def host_port(self, port: int) -> int:
        """The 127.0.0.1 port that `port` of this container is published on."""
        out = run(["podman", "port", self.name, str(port)]).stdout.strip().splitlines()[0]
        return int(out.rsplit(":", 1)[1])

    def url(self, port: int = 8000) -> str:
        """HTTP base URL of a published container port."""
        return f"http://127.0.0.1:{self.ports[port]}"

    def exec(self, *command: str) -> subprocess.CompletedProcess:
        """`podman exec` (not checked: callers look at the return code)."""
        return run(["podman", "exec", self.name, *command], check=False)

    def inspect(self) -> dict:
        """`podman container inspect`."""
        return json.loads(run(["podman", "container", "inspect", self.name]).stdout)[0]

    def healthcheck(self) -> bool:
        """Run the image's HEALTHCHECK once now; True when it passes."""
        return run(["podman", "healthcheck", "run", self.name], check=False).returncode == 0

    def logs(self, tail: int = 60) -> str:
        """The last lines of the container's output."""
        result = run(["podman", "logs", "--tail", str(tail), self.name], check=False)
        return result.stdout + result.stderr

    def remove(self) -> None:
        """Stop (SIGTERM, then SIGKILL after 10 s) and remove."""
        run(["podman", "rm", "--force", "--time", "10", "--ignore", self.name], check=False)
