#!/bin/sh
# Entrypoint of the PAE image: one image, two roles.
#   api    [pae-serve args]   HTTP API on 0.0.0.0:$PORT (needs REDIS_URL to share a queue with workers;
#                             without it pae-serve runs its embedded Redis and an in-process worker)
#   worker [pae-worker args]  batch worker; /metrics on $WORKER_METRICS_PORT
#   anything else             executed as given (e.g. `pae-export --help`, `python -c ...`)
# The role is written to $TMPDIR/pae-role so the image's HEALTHCHECK knows which endpoint to probe.
set -eu

role_file="${TMPDIR:-/tmp}/pae-role"

# A multiprocess metrics directory must start empty: files left by a previous run of the container
# would be summed into the new process's counters.
reset_multiproc_dir() {
    if [ -n "${PROMETHEUS_MULTIPROC_DIR:-}" ]; then
        mkdir -p "${PROMETHEUS_MULTIPROC_DIR}"
        find "${PROMETHEUS_MULTIPROC_DIR}" -mindepth 1 -delete
    fi
}

case "${1:-api}" in
    api)
        [ "$#" -gt 0 ] && shift
        printf 'api\n' > "${role_file}"
        reset_multiproc_dir
        exec pae-serve --host 0.0.0.0 --port "${PORT:-8000}" "$@"
        ;;
    worker)
        shift
        printf 'worker\n' > "${role_file}"
        # A worker serves its own registry; multiprocess mode is only for the API's uvicorn workers.
        unset PROMETHEUS_MULTIPROC_DIR
        exec pae-worker "$@"
        ;;
    *)
        exec "$@"
        ;;
esac
