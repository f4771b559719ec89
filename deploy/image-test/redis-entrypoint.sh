#!/bin/sh
# Like the official redis image's entrypoint: `redis-server ARGS` runs with the container settings
# (listen on every interface of the container, no protected mode, data in /data); anything else runs as given.
set -eu
if [ "${1:-}" = "redis-server" ]; then
    shift
    exec redis-server /etc/redis/container.conf "$@"
fi
exec "$@"
