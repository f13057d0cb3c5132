"""Container health check of the saffu image: exit 0 when the service of this container works.

The entry point writes the container's role to /tmp/saffu-role. A Ray node is healthy
while its raylet runs, and the head also needs the GCS and the Ray client server to accept
connections. The MLflow server is healthy while ``/health`` returns 200. A container that
runs another command (the sweep driver, a shell) has no role file and counts as healthy.
"""

import os
import socket
import sys
import urllib.request
from pathlib import Path

import psutil

ROLE_FILE = Path("/tmp/saffu-role")
GCS_PORT = 6379
RAY_CLIENT_PORT = 10001
MLFLOW_PORT = int(os.environ.get("MLFLOW_PORT", "5000"))


def raylet_running() -> bool:
    return any(process.info["name"] == "raylet" for process in psutil.process_iter(["name"]))


def port_open(port: int) -> bool:
    # Ray binds to the container's address, so the check connects there rather than to 127.0.0.1.
    host = socket.gethostbyname(socket.gethostname())
    try:
        with socket.create_connection((host, port), timeout=5):
            return True
    except OSError:
        return False


def mlflow_healthy() -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{MLFLOW_PORT}/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def main() -> int:
    role = ROLE_FILE.read_text().strip() if ROLE_FILE.is_file() else ""
    if role == "ray-head":
        problems = [
            name
            for name, ok in (
                ("raylet is not running", raylet_running()),
                (f"GCS port {GCS_PORT} is closed", port_open(GCS_PORT)),
                (f"Ray client port {RAY_CLIENT_PORT} is closed", port_open(RAY_CLIENT_PORT)),
            )
            if not ok
        ]
    elif role == "ray-worker":
        problems = [] if raylet_running() else ["raylet is not running"]
    elif role == "mlflow":
        problems = [] if mlflow_healthy() else [f"http://127.0.0.1:{MLFLOW_PORT}/health did not return 200"]
    else:
        problems = []
    for problem in problems:
        print(f"unhealthy {role}: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
