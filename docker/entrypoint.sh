#!/bin/sh
# Entry point of the saffu image. The first argument selects the role, one of:
#   ray-head    a Ray head node (GCS 6379, Ray client server 10001, dashboard 8265)
#   ray-worker  a Ray worker node that joins RAY_HEAD_ADDRESS (default ray-head:6379)
#   mlflow      an MLflow tracking server on PostgreSQL, serving artifacts from /mlflow/artifacts
#   sweep       `python sweep.py -m` against the Ray cluster and the MLflow server;
#               further arguments are Hydra overrides
# Any other command runs as given, e.g. `bash` or `python sweep.py --help`.
set -eu

role="${1:-ray-head}"

# Ray 2.60 turns token authentication on by itself only in some start paths (a first
# `ray.init()`, or an existing ~/.ray/auth_token), so every node states the mode explicitly:
# RAY_AUTH_MODE=token with the shared RAY_AUTH_TOKEN, or RAY_AUTH_MODE=disabled on purpose.
require_ray_auth() {
    case "${RAY_AUTH_MODE:-}" in
        token)
            if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -z "${RAY_AUTH_TOKEN_PATH:-}" ]; then
                echo "entrypoint: RAY_AUTH_MODE=token but RAY_AUTH_TOKEN and RAY_AUTH_TOKEN_PATH are missing." \
                    "Generate a token with: python -c 'import secrets; print(secrets.token_hex(32))'" >&2
                exit 2
            fi
            ;;
        disabled)
            echo "entrypoint: RAY_AUTH_MODE=disabled: anyone who reaches this node's ports can run code on the cluster" >&2
            ;;
        *)
            echo "entrypoint: invalid RAY_AUTH_MODE '${RAY_AUTH_MODE:-}': set it to token (with RAY_AUTH_TOKEN) or disabled" >&2
            exit 2
            ;;
    esac
}

# The health check reads the role from this file. A container that runs another command has none.
record_role() {
    printf '%s\n' "$1" > /tmp/saffu-role
}

case "$role" in
    ray-head)
        shift
        require_ray_auth
        record_role ray-head
        # The node listens on the container's network, and compose publishes only the client
        # and dashboard ports, on the host's loopback.
        # shellcheck disable=SC2086
        exec ray start --head --block --disable-usage-stats \
            --port=6379 --ray-client-server-port=10001 \
            --dashboard-host=0.0.0.0 --dashboard-port=8265 \
            ${RAY_NUM_CPUS:+--num-cpus="$RAY_NUM_CPUS"} "$@"
        ;;
    ray-worker)
        shift
        require_ray_auth
        record_role ray-worker
        # shellcheck disable=SC2086
        exec ray start --block --disable-usage-stats \
            --address="${RAY_HEAD_ADDRESS:-ray-head:6379}" \
            ${RAY_NUM_CPUS:+--num-cpus="$RAY_NUM_CPUS"} "$@"
        ;;
    mlflow)
        shift
        if [ -z "${POSTGRES_PASSWORD:-}" ]; then
            echo "entrypoint: POSTGRES_PASSWORD is missing: set it in docker/.env (see docker/env.example)" >&2
            exit 2
        fi
        record_role mlflow
        # libpq reads the password from PGPASSWORD, so it appears in no URI, command line or log.
        export PGPASSWORD="$POSTGRES_PASSWORD"
        exec mlflow server \
            --host "${MLFLOW_HOST:-0.0.0.0}" --port "${MLFLOW_PORT:-5000}" \
            --workers "${MLFLOW_WORKERS:-2}" \
            --backend-store-uri "postgresql+psycopg2://${POSTGRES_USER:-mlflow}@${POSTGRES_HOST:-postgres}:${POSTGRES_PORT:-5432}/${POSTGRES_DB:-mlflow}" \
            --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION:-/mlflow/artifacts}" \
            --serve-artifacts \
            --allowed-hosts "${MLFLOW_ALLOWED_HOSTS:-mlflow,mlflow:*,localhost,localhost:*,127.0.0.1,127.0.0.1:*}" \
            "$@"
        ;;
    sweep)
        shift
        require_ray_auth
        # Hydra applies overrides in order, so arguments given here can replace these two.
        exec python /opt/saffu/sweep.py -m \
            "ray.address=${SAFFU_RAY_ADDRESS:-ray://ray-head:10001}" \
            "tracking.uri=${SAFFU_TRACKING_URI:-http://mlflow:5000}" \
            "$@"
        ;;
    *)
        exec "$@"
        ;;
esac
