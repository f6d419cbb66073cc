"""docker-compose.yml and the Dockerfile: parse them and hold them to what README says.

There is no Docker engine here, so ``docker compose config`` cannot run; these
checks stand in for it (known keys, services wired as documented).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
README = ROOT / "README.md"

# The subset of the Compose specification this file may use; a typo such as
# `depend_on` would otherwise pass a YAML parse silently.
TOP_KEYS = {"name", "services", "volumes", "networks", "configs", "secrets"}
SERVICE_KEYS = {
    "image",
    "build",
    "command",
    "entrypoint",
    "environment",
    "env_file",
    "volumes",
    "ports",
    "healthcheck",
    "depends_on",
    "profiles",
    "restart",
    "stop_signal",
    "stop_grace_period",
    "working_dir",
    "user",
    "networks",
}
HEALTHCHECK_KEYS = {"test", "interval", "timeout", "retries", "start_period", "disable"}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _readme_service_table() -> dict[str, str]:
    """`| `name` | description |` rows of README's compose service table."""
    text = README.read_text()
    start = text.index("| service | what |")
    rows: dict[str, str] = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = cells[1]
    return rows


def _words(command: list[str] | str) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else list(command)


def test_compose_uses_only_known_keys(compose: dict[str, Any]) -> None:
    assert set(compose) <= TOP_KEYS
    for name, service in compose["services"].items():
        unknown = set(service) - SERVICE_KEYS
        assert not unknown, f"service {name} has unknown keys {unknown}"
        if "healthcheck" in service:
            assert set(service["healthcheck"]) <= HEALTHCHECK_KEYS
            assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL")
        for dep, spec in service.get("depends_on", {}).items():
            assert dep in compose["services"], f"{name} depends on unknown service {dep}"
            assert spec["condition"] in CONDITIONS
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in (compose.get("volumes") or {}), f"undeclared volume {source}"


def test_services_are_the_ones_readme_names(compose: dict[str, Any]) -> None:
    assert (
        set(_readme_service_table())
        == set(compose["services"])
        == {
            "redis",
            "server",
            "publisher",
        }
    )


def test_redis_is_official_image_with_aof_healthcheck_and_volume(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    described = _readme_service_table()["redis"]
    # Official images have no owner prefix ("redis:7", not "someone/redis").
    assert re.fullmatch(r"redis:[\w.-]+", redis["image"])
    assert f"`{redis['image']}`" in described
    command = _words(redis["command"])
    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "yes"
    assert "--appendonly yes" in described
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert redis["healthcheck"]["test"][1:] == ["redis-cli", "ping"]
    assert "healthcheck" in described and "redis-cli ping" in described
    (volume,) = redis["volumes"]
    name, target = volume.split(":")
    assert target == "/data" and name in compose["volumes"]
    assert f"`{name}`" in described


def test_server_runs_example_after_redis_is_healthy(compose: dict[str, Any]) -> None:
    server = compose["services"]["server"]
    described = _readme_service_table()["server"]
    assert server["build"] == "."
    assert server["depends_on"] == {"redis": {"condition": "service_healthy"}}
    assert "`condition: service_healthy`" in described
    command = _words(server["command"])
    assert command[:2] == ["python", "examples/serve.py"]
    port = command[command.index("--port") + 1]
    assert any(p.endswith(f":{port}") for p in server["ports"])
    assert f"port {port}" in described
    assert server["environment"]["HOTSWAP_REDIS_URL"].startswith("redis://redis:")
    assert server["stop_signal"] == "SIGTERM"  # serve.py shuts down cleanly on it
    assert "/healthz" in " ".join(server["healthcheck"]["test"])


def test_publisher_is_a_one_shot_publish_under_a_profile(compose: dict[str, Any]) -> None:
    publisher = compose["services"]["publisher"]
    described = _readme_service_table()["publisher"]
    (profile,) = publisher["profiles"]
    assert f"`{profile}` profile" in described
    command = _words(publisher["command"])
    assert command[:2] == ["hotswap", "publish"]
    assert f"`{' '.join(command[:4])}`" in described
    (mount,) = publisher["volumes"]
    host, container, mode = mount.split(":")
    assert mode == "ro" and command[3].startswith(container + "/")
    assert f"`{host}`" in described
    assert publisher["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "restart" not in publisher  # one-shot


def test_readme_compose_commands_name_real_services(compose: dict[str, Any]) -> None:
    text = README.read_text()
    commands = re.findall(r"^docker compose (.+)$", text, flags=re.MULTILINE)
    assert commands, "README shows no docker compose command"
    profiles = {p for s in compose["services"].values() for p in s.get("profiles", [])}
    for line in commands:
        words = shlex.split(line)
        if "--profile" in words:
            assert words[words.index("--profile") + 1] in profiles
        services = [w for w in words if w in compose["services"]]
        assert services, f"`docker compose {line}` names no service"


def test_dockerfile_installs_the_project() -> None:
    lines = [
        line.strip()
        for line in DOCKERFILE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    instructions = [line.split()[0] for line in lines]
    assert instructions[0] == "FROM" and lines[0].split()[1].startswith("python:3.")
    copied = {
        w.rstrip("/") for line in lines if line.startswith("COPY") for w in line.split()[1:-1]
    }
    pyproject = (ROOT / "pyproject.toml").read_text()
    # tomllib is 3.11+ and the project supports 3.10: the two lines we need are simple.
    packages = set(re.findall(r'"(\w+)"', re.search(r"^packages = \[.*\]$", pyproject, re.M)[0]))
    readme = re.search(r'^readme = "(.+)"$', pyproject, re.M)[1]
    assert packages and readme
    # Everything `pip install .` reads must be in the image, and the example.
    assert packages | {"pyproject.toml", readme, "examples"} <= copied
    installs = " ".join(line for line in lines if line.startswith("RUN"))
    assert re.search(r"pip install [^&]*\s\.(\s|$)", installs), "the project is never pip-installed"
    assert "torch" in installs
    assert any(line.startswith("USER") and "root" not in line for line in lines)
    cmd = next(line for line in lines if line.startswith("CMD"))
    assert "examples/serve.py" in cmd and "0.0.0.0" in cmd
