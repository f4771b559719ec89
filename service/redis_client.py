"""The service's connection to Redis: one server, a primary found through Sentinel, or a Redis Cluster.

Which one the settings say (`service.settings`): `REDIS_URL` alone is one server (a managed
service's primary endpoint included); `REDIS_SENTINELS` asks those sentinels for the current
primary of `REDIS_SENTINEL_MASTER` and follows it through failovers; `REDIS_CLUSTER` treats
`REDIS_URL` as any node of a cluster and routes each key to its shard. The broker's commands are
the same in all three, because every key of a model version shares one hash tag
(`service.broker_protocol`).

All three bound their connections and, past that bound, make a command wait up to
REDIS_POOL_TIMEOUT_S for a free one instead of failing at once: redis-py's default pool raises
MaxConnectionsError immediately past its size, which 200 concurrent requests reached.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError

from service.settings import Settings

RedisClient = Redis | RedisCluster
"""What the broker talks to; both expose the same commands, pipelines and scripts."""

HEALTH_CHECK_S = 1
SENTINEL_TIMEOUT_S = 1.0
"""How long one sentinel may take to answer "which is the primary": short, since the next sentinel
is asked when one does not answer, and a failover is the time when some do not."""


def connection_options(max_connections: int) -> dict[str, Any]:
    """What every connection to a data node shares, whichever way it was found.

    After a Redis restart or failover, connections that sat in the pool through it are dead, and
    each one would fail the first request that drew it (a 503 well after Redis was back). So a
    connection idle for more than HEALTH_CHECK_S is PINGed before use and reconnected if the PING
    fails, and a command whose connection breaks is sent once more on a fresh one. A resent enqueue
    whose first attempt had in fact run adds its jobs twice under the same job ids: both run, the
    dispatcher keeps the first reply and ignores the repeat.

    A READONLY answer means the server behind the address was demoted to a replica (a managed
    service's failover moves its endpoint's DNS name to the new primary): the connection is dropped
    and the command sent once more on a new one, which resolves the name again.
    """
    return {
        "max_connections": max_connections,
        "socket_connect_timeout": 5.0,
        "socket_timeout": 30.0,
        "health_check_interval": HEALTH_CHECK_S,
        "retry": Retry(NoBackoff(), 1),
        "retry_on_error": [ReadOnlyError],
    }


class BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's primary discovery (each new connection asks the sentinels where the primary is;
    a READONLY answer drops the connection) with BlockingConnectionPool's bounded wait."""


class BoundedCluster(RedisCluster):
    """A RedisCluster whose commands wait up to `pool_timeout_s` for a free connection.

    Its per-node pools raise MaxConnectionsError the moment they are exhausted; a semaphore of the
    same size in front of every command and pipeline turns that into the bounded wait the other
    modes have.
    """

    def __init__(self, *args: Any, pool_timeout_s: float = 5.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = asyncio.Semaphore(kwargs.get("max_connections", 100))
        self._pool_timeout_s = pool_timeout_s

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        try:
            await asyncio.wait_for(self._slots.acquire(), self._pool_timeout_s)
        except TimeoutError:
            raise RedisConnectionError("No connection available.") from None
        try:
            yield
        finally:
            self._slots.release()

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self.slot():
            return await super().execute_command(*args, **kwargs)

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        if shard_hint:
            raise ValueError("shard_hint is not supported in cluster mode")
        return BoundedPipeline(self, transaction)


class BoundedPipeline(ClusterPipeline):
    """A cluster pipeline that holds one of its client's connection slots while it runs."""

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        async with self.cluster_client.slot():
            return await super().execute(raise_on_error, allow_redirections)


def describe(settings: Settings) -> str:
    """Where the settings point, for logs: no password, no user name."""
    if settings.redis_sentinels:
        hosts = ",".join(f"{h}:{p}" for h, p in settings.redis_sentinels)
        return f"primary {settings.redis_sentinel_master!r} of sentinels {hosts}"
    if settings.redis_url is None:
        return "no Redis configured"
    parts = urlsplit(settings.redis_url)
    where = f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"
    return f"cluster seed {where}" if settings.redis_cluster else where


@asynccontextmanager
async def open_redis(settings: Settings, max_connections: int) -> AsyncIterator[RedisClient]:
    """A client for the Redis the settings name, with at most `max_connections` connections (per
    node for a cluster), closed with everything it opened when the block ends.

    Nothing connects here: the first command does, so a process can start while Redis is down.
    """
    timeout_s = settings.redis_pool_timeout_s
    options = connection_options(max_connections)
    if settings.redis_sentinels:
        sentinel = Sentinel(
            settings.redis_sentinels,
            sentinel_kwargs={
                "password": settings.redis_sentinel_password,
                "socket_timeout": SENTINEL_TIMEOUT_S,
                "socket_connect_timeout": SENTINEL_TIMEOUT_S,
            },
        )
        client: RedisClient = sentinel.master_for(
            settings.redis_sentinel_master,
            connection_pool_class=BlockingSentinelPool,
            timeout=timeout_s,
            username=settings.redis_username,
            password=settings.redis_password,
            **options,
        )
        try:
            yield client
        finally:
            await client.aclose()
            await sentinel.aclose()
        return
    if settings.redis_url is None:
        raise ValueError("no Redis configured: set REDIS_URL or REDIS_SENTINELS")
    if settings.redis_cluster:
        # The cluster client retries at its own level, following the topology (MOVED, failed nodes).
        options.pop("retry")
        options.pop("retry_on_error")
        client = BoundedCluster.from_url(settings.redis_url, pool_timeout_s=timeout_s, **options)
    else:
        pool = BlockingConnectionPool.from_url(settings.redis_url, timeout=timeout_s, **options)
        client = Redis.from_pool(pool)
    try:
        yield client
    finally:
        await client.aclose()
