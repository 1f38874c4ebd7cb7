"""No Docker engine runs here, so the compose file is checked against what the code reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ledger.config import Settings as LedgerSettings
from sequencer.config import Settings as SequencerSettings

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def container_ports(service: dict[str, Any]) -> set[int]:
    return {int(p.rsplit(":", 1)[1]) for p in service.get("ports", [])}


def test_services_and_dependencies() -> None:
    services = {k: v for k, v in compose()["services"].items() if "profiles" not in v}
    assert set(services) == {"postgres", "bootstrap", "migrate", "ledger", "sequencer"}
    everything = compose()["services"]
    assert {name for name, s in everything.items() if "brokers" in s.get("profiles", [])} == {
        "rabbitmq",
        "nats",
        "sequencer-brokers",
    }
    assert services["postgres"]["image"] == "postgres:16"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("ledger", "sequencer"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert "healthcheck" in services[name]
    assert services["sequencer"]["depends_on"]["ledger"]["condition"] == "service_healthy"
    assert "ledger migrate" in " ".join(services["migrate"]["command"])
    assert "sequencer migrate" in " ".join(services["migrate"]["command"])


def test_every_variable_is_one_the_code_reads_and_ports_match() -> None:
    services = compose()["services"]
    # from_env rejects unknown LEDGER_/SEQUENCER_ keys, so this proves each name is read.
    ledger = LedgerSettings.from_env(services["ledger"]["environment"])
    sequencer = SequencerSettings.from_env(services["sequencer"]["environment"])
    for name in ("migrate", "ledger", "sequencer"):
        assert services[name]["environment"]["DATABASE_URL"].startswith("postgresql://")
    assert container_ports(services["ledger"]) == {
        int(ledger.listen_addr.rsplit(":", 1)[1]),
        int(ledger.metrics_addr.rsplit(":", 1)[1]),
    }
    assert container_ports(services["sequencer"]) == {
        int(sequencer.listen_addr.rsplit(":", 1)[1]),
        int(sequencer.metrics_addr.rsplit(":", 1)[1]),
        int(sequencer.http_addr.rsplit(":", 1)[1]),
    }
    assert sequencer.ledger_target == f"ledger:{ledger.listen_addr.rsplit(':', 1)[1]}"
    # The published ports are the defaults of SPEC section 3.
    assert container_ports(services["sequencer"]) == {50051, 9464, 8080}
    assert container_ports(services["ledger"]) == {50052, 9465}


def test_health_checks_use_the_listen_ports() -> None:
    services = compose()["services"]
    assert services["ledger"]["healthcheck"]["test"][-1].endswith(":50052")
    assert services["sequencer"]["healthcheck"]["test"][-1].endswith(":50051")


def test_dockerfile_copies_every_package() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for package in ("common", "sequencer", "ledger", "ops", "clients/python/logistics"):
        assert f"COPY {package} " in dockerfile


def test_the_brokers_profile_runs_a_replica_with_both_doors() -> None:
    services = compose()["services"]
    replica = services["sequencer-brokers"]
    brokers = SequencerSettings.from_env(replica["environment"]).brokers
    assert brokers.amqp_url.startswith("amqp://") and "@rabbitmq:5672" in brokers.amqp_url
    assert brokers.nats_url == "nats://nats:4222"
    assert brokers.outcomes_amqp and brokers.outcomes_nats
    # The user in the URL is the one the broker is given (RabbitMQ refuses `guest` off loopback).
    rabbit = services["rabbitmq"]["environment"]
    assert f"{rabbit['RABBITMQ_DEFAULT_USER']}:{rabbit['RABBITMQ_DEFAULT_PASS']}@" in brokers.amqp_url
    assert "-js" in services["nats"]["command"]
    for name in ("rabbitmq", "nats", "ledger", "migrate"):
        assert name in replica["depends_on"]
    # The default sequencer has no broker doors: `make up` and plain compose need no broker.
    default = SequencerSettings.from_env(services["sequencer"]["environment"]).brokers
    assert (default.amqp_url, default.nats_url) == ("", "")
