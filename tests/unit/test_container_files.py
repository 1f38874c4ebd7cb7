"""docker-compose.yml and the Dockerfile, read as data (docker cannot run on this machine): no
service runs in development mode off loopback, credentials come from the bootstrap's files, the
health checks speak the transport the services serve, and the image carries runtime
dependencies only, precompiled, as an unprivileged user."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import yaml

from common.auth import is_loopback
from ops import bootstrap

ROOT = Path(__file__).resolve().parents[2]
SERVICES = {"sequencer": "SEQUENCER_", "ledger": "LEDGER_"}


def compose() -> dict[str, Any]:
    document = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(document, dict)
    return document


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "environment as a mapping"
    return {str(k): str(v) for k, v in env.items()}


def _secret(path: str) -> str:
    assert path.startswith("/secrets/"), path
    return path.removeprefix("/secrets/")


def test_no_service_runs_in_development_mode_or_insecure() -> None:
    services = compose()["services"]
    for name, prefix in SERVICES.items():
        env = environment(services[name])
        assert env.get(f"{prefix}ALLOW_INSECURE", "false").lower() != "true", name
        assert not is_loopback(env[f"{prefix}LISTEN_ADDR"]), f"{name} listens on the compose network"
        # Off loopback: TLS and identities, as check_exposure demands without ALLOW_INSECURE.
        assert _secret(env[f"{prefix}TLS_CERT"]) == f"{name}.pem"
        assert _secret(env[f"{prefix}TLS_KEY"]) == f"{name}.key"
        assert _secret(env[f"{prefix}IDENTITIES_FILE"]) == f"{name}-identities.json"
        assert name in bootstrap.SERVICES
    for service in services.values():
        for key, value in environment(service).items():
            assert not (key.endswith("ALLOW_INSECURE") and value.lower() == "true"), key


def test_the_sequencer_calls_the_ledger_with_tls_and_its_bootstrap_token() -> None:
    env = environment(compose()["services"]["sequencer"])
    assert env["SEQUENCER_LEDGER_TARGET"] == "ledger:50052"
    assert _secret(env["SEQUENCER_LEDGER_TLS_CA"]) == "ca.pem"
    assert _secret(env["SEQUENCER_LEDGER_TOKEN_FILE"]) == "tokens/sequencer.token"
    roles, known_by = bootstrap.CALLERS["sequencer"]
    assert roles == ["sequencer"] and known_by == ("ledger",)


def test_credentials_are_made_once_before_the_services_start() -> None:
    services = compose()["services"]
    assert services["bootstrap"]["command"] == ["python", "-m", "ops", "bootstrap", "/secrets"]
    assert "secrets:/secrets" in services["bootstrap"]["volumes"]
    for name in SERVICES:
        assert services[name]["depends_on"]["bootstrap"] == {"condition": "service_completed_successfully"}
        assert services[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
        assert "secrets:/secrets:ro" in services[name]["volumes"], "services read the secrets, never write them"
    assert "secrets" in compose()["volumes"]


def test_health_checks_speak_tls_and_ports_stay_on_the_hosts_loopback() -> None:
    services = compose()["services"]
    for name, prefix in SERVICES.items():
        service = services[name]
        env = environment(service)
        port = env[f"{prefix}LISTEN_ADDR"].rpartition(":")[2]
        assert service["healthcheck"]["test"] == ["CMD", "python", "-m", "ops", "health", f"127.0.0.1:{port}"]
        # `ops health` is TLS when LOGISTICS_TLS_CA is set; the server certificate names 127.0.0.1.
        assert _secret(env["LOGISTICS_TLS_CA"]) == "ca.pem"
        for mapping in service["ports"]:
            assert str(mapping).startswith("127.0.0.1:"), mapping
    assert services["sequencer"]["depends_on"]["ledger"] == {"condition": "service_healthy"}


def _stages(dockerfile: str) -> dict[str, list[str]]:
    stages: dict[str, list[str]] = {}
    current = ""
    for line in dockerfile.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if match := re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE):
            current = match.group(1)
            stages[current] = []
        stages[current].append(line)
    return stages


def _names(lock: str) -> dict[str, str]:
    return {m.group(1).lower(): m.group(2) for m in re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+)", lock, re.MULTILINE)}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[; ]", name, maxsplit=1)[0]).lower()


def test_the_image_has_runtime_dependencies_only_precompiled_and_unprivileged() -> None:
    stages = _stages((ROOT / "Dockerfile").read_text())
    assert list(stages) == ["build", "runtime"]
    build, runtime = stages["build"], stages["runtime"]
    assert any("requirements-runtime.lock" in line for line in build)
    assert not any(re.search(r"requirements\.lock", line) for line in build + runtime)
    assert any("compileall" in line for line in build)
    # The runtime stage installs no Python package itself: it copies the build stage's venv.
    assert not any(re.search(r"\b(pip|uv)\b", line) for line in runtime)
    assert [line for line in runtime if line.startswith("COPY")] == [
        "COPY --from=build /venv /venv",
        "COPY --from=build /app /app",
    ]
    users = [line.split()[1] for line in runtime if line.startswith("USER")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    env = " ".join(line for line in runtime if line.startswith("ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    dev = {_normal(d) for d in project["dependency-groups"]["dev"]}
    runtime_lock = _names((ROOT / "requirements-runtime.lock").read_text())
    full_lock = _names((ROOT / "requirements.lock").read_text())
    assert {_normal(d) for d in project["project"]["dependencies"]} <= set(runtime_lock)
    assert not dev & set(runtime_lock), dev & set(runtime_lock)
    # The same versions as the lock the tests ran with.
    assert {name: full_lock.get(name) for name in runtime_lock} == runtime_lock
