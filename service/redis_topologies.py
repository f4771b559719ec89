"""Replicated and sharded Redis on 127.0.0.1, from the same `RedisServer` the rest of the stack starts:
a primary with a replica watched by sentinels (what a failover is measured on), and a Redis Cluster
of several primaries (what the hash-tagged keys are tested on).

Every process is started through the launcher (service/launcher.py), in its own session and under
the given lifetime, and readiness is read over raw sockets (service/redis_server.py), so these work
where no Redis client is installed.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from service.launcher import LOOPBACK, LaunchError, Started, find_binary, free_port, port_is_free
from service.redis_server import RedisServer, info_field, redis_command


class SentinelServer(RedisServer):
    """A redis-server in sentinel mode watching the primary on the loopback `primary_port`.

    A sentinel rewrites its configuration file as it learns the topology, so the file is written
    into the server's own data folder at each start.
    """

    def __init__(
        self,
        primary_port: int,
        *,
        master: str = "pae",
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 10_000,
        auth_pass: str | None = None,
        **options: object,
    ) -> None:
        super().__init__(**options)
        self.primary_port = primary_port
        self.master = master
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.auth_pass = auth_pass

    def argv(self, port: int, data_dir: Path) -> list[str]:
        lines = [
            f"port {port}",
            f"bind {LOOPBACK}",
            f"dir {data_dir}",
            "daemonize no",
            "loglevel warning",
            f"sentinel monitor {self.master} {LOOPBACK} {self.primary_port} {self.quorum}",
            f"sentinel down-after-milliseconds {self.master} {self.down_after_ms}",
            f"sentinel failover-timeout {self.master} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {self.master} 1",
        ]
        if self.auth_pass:
            lines.append(f"sentinel auth-pass {self.master} {self.auth_pass}")
        config = data_dir / "sentinel.conf"
        config.write_text("\n".join(lines) + "\n")
        return [self.binary, str(config), "--sentinel"]

    def view(self) -> dict[str, str]:
        """What this sentinel knows of its primary (`INFO sentinel`): status, address, the number of
        replicas and of sentinels it sees (itself included); empty when it does not answer."""
        line = info_field(self.port, "sentinel", "master0") if self.port else None
        return dict(item.split("=", 1) for item in line.split(",")) if line else {}


class SentinelGroup(Started):
    """A primary, `replicas` replicas and `sentinels` sentinels on 127.0.0.1, append-only files on
    (as deployed), for the failover test and benchmark.

    `down_after_ms` is how long the sentinels wait before they call the primary down: Sentinel's
    default is 30 s, the Kubernetes component uses 5 s, and 1 s keeps a measured failover short.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        replicas: int = 1,
        sentinels: int = 3,
        master: str = "pae",
        down_after_ms: int = 1000,
        password: str | None = None,
        lifetime_s: float | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.master = master
        self.password = password
        # No diskless-sync delay: a primary waits 5 s by default for more replicas to sync at once.
        common = {
            "password": password,
            "appendonly": True,
            "lifetime_s": lifetime_s,
            "extra_args": ["--repl-diskless-sync-delay", "0"],
        }
        self.primary = RedisServer(workdir=run_dir / "primary", name="redis-primary", **common)
        self.replica_count = replicas
        self.replicas: list[RedisServer] = []
        self.sentinel_count = sentinels
        self.down_after_ms = down_after_ms
        self.lifetime_s = lifetime_s
        self.sentinels: list[SentinelServer] = []
        self._common = common

    @property
    def servers(self) -> list[RedisServer]:
        """Every process of the group: primary, replicas, sentinels."""
        return [self.primary, *self.replicas, *self.sentinels]

    @property
    def addresses(self) -> str:
        """The sentinels as REDIS_SENTINELS wants them: `host:port,host:port,...`."""
        return ",".join(f"{LOOPBACK}:{s.port}" for s in self.sentinels)

    def start(self, timeout_s: float = 30.0) -> None:
        """Primary, then replicas (in sync), then sentinels; returns once every sentinel sees the
        primary, every replica and every other sentinel."""
        self.primary.start()
        for i in range(self.replica_count):
            replica = RedisServer(
                workdir=self.run_dir / f"replica{i}",
                name=f"redis-replica{i}",
                replica_of=self.primary.port,
                **self._common,
            )
            replica.start()
            self.replicas.append(replica)
        self._wait(timeout_s, "replicas in sync", self._replicas_in_sync)
        for i in range(self.sentinel_count):
            sentinel = SentinelServer(
                self.primary.port,
                master=self.master,
                quorum=self.sentinel_count // 2 + 1,
                down_after_ms=self.down_after_ms,
                auth_pass=self.password,
                name=f"sentinel{i}",
                lifetime_s=self.lifetime_s,
            )
            sentinel.start()
            self.sentinels.append(sentinel)
        self._wait(timeout_s, "sentinels agreed on the topology", self._sentinels_agree)

    def _replicas_in_sync(self) -> bool:
        return all(
            info_field(r.port, "replication", "master_link_status", self.password) == "up"
            for r in self.replicas
        )

    def _sentinels_agree(self) -> bool:
        want = {"status": "ok", "slaves": str(self.replica_count), "sentinels": str(self.sentinel_count)}
        return all(want.items() <= s.view().items() for s in self.sentinels)

    def _wait(self, timeout_s: float, what: str, done) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > deadline:
                raise LaunchError(f"Redis with sentinels: not {what} within {timeout_s:.0f} s")
            time.sleep(0.1)

    def primary_port(self) -> int | None:
        """The primary's port as the first sentinel that answers reports it."""
        for sentinel in self.sentinels:
            address = sentinel.view().get("address")
            if address:
                return int(address.rsplit(":", 1)[1])
        return None

    def server_on(self, port: int) -> RedisServer:
        """The server (primary or replica) started on `port`."""
        return next(s for s in [self.primary, *self.replicas] if s.port == port)

    def wait_for_new_primary(self, old_port: int, timeout_s: float = 60.0) -> int:
        """Until every sentinel reports a primary other than `old_port` and it accepts writes; its port."""

        def moved() -> bool:
            ports = {sentinel.view().get("address") for sentinel in self.sentinels}
            if len(ports) != 1 or None in ports or ports == {f"{LOOPBACK}:{old_port}"}:
                return False
            port = int(next(iter(ports)).rsplit(":", 1)[1])
            return info_field(port, "replication", "role", self.password) == "master"

        self._wait(timeout_s, "failed over", moved)
        return self.primary_port() or 0

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.stop()


CLUSTER_BUS_OFFSET = 10000
"""A cluster node also listens on its port + 10000 (the cluster bus), so its port is at most 55535."""


def cluster_port(tries: int = 100) -> int:
    """A free loopback port whose cluster-bus port is valid and free as well. The kernel's free
    ports run to 60999 here, so a plain free port failed the node's start about one time in five."""
    for _ in range(tries):
        port = free_port()
        if port + CLUSTER_BUS_OFFSET <= 65535 and port_is_free(port + CLUSTER_BUS_OFFSET):
            return port
    raise LaunchError(f"no free port with a free cluster-bus port (+{CLUSTER_BUS_OFFSET}) in {tries} tries")


class LocalCluster(Started):
    """A Redis Cluster of `primaries` primaries (no replicas) on 127.0.0.1, slots spread evenly by
    `redis-cli --cluster create`."""

    def __init__(self, primaries: int = 3, lifetime_s: float | None = None) -> None:
        if primaries < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 primaries")
        args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        args += ["--cluster-node-timeout", "5000"]
        self.nodes = [
            RedisServer(name=f"cluster{i}", lifetime_s=lifetime_s, extra_args=args) for i in range(primaries)
        ]

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes if node.port is not None]

    def start(self, timeout_s: float = 60.0) -> None:
        for node in self.nodes:
            if node.port is None:
                node.port = cluster_port()
            node.start()
        cli = find_binary("redis-cli", "Debian's redis-tools (installed with redis-server)")
        hosts = [f"{LOOPBACK}:{port}" for port in self.ports]
        created = subprocess.run(
            [cli, "--cluster", "create", *hosts, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if created.returncode != 0:
            raise LaunchError(f"redis-cli --cluster create failed:\n{created.stdout}\n{created.stderr}")
        deadline = time.monotonic() + timeout_s
        while not all(info == b"ok" for info in self._states()):
            if time.monotonic() > deadline:
                raise LaunchError(f"the cluster on {hosts} did not reach cluster_state:ok")
            time.sleep(0.1)

    def _states(self) -> list[bytes | None]:
        states = []
        for port in self.ports:
            info = redis_command(port, "CLUSTER", "INFO") or b""
            line = next((x for x in info.splitlines() if x.startswith(b"cluster_state:")), b"")
            states.append(line.split(b":", 1)[1] if line else None)
        return states

    def owner(self, key: str) -> int:
        """The port of the primary that holds `key`'s slot."""
        slot = int(redis_command(self.ports[0], "CLUSTER", "KEYSLOT", key) or b"-1")
        for line in (redis_command(self.ports[0], "CLUSTER", "NODES") or b"").decode().splitlines():
            fields = line.split()
            for part in fields[8:]:
                low, _, high = part.partition("-")
                if low.isdigit() and int(low) <= slot <= int(high or low):
                    return int(fields[1].split("@")[0].rsplit(":", 1)[1])
        raise LaunchError(f"no node of the cluster owns slot {slot} of {key!r}")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
