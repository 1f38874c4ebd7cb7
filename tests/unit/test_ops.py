"""The operators' files of ops/: the alert rules pass `promtool check rules` and their unit tests
(`promtool test rules`), the rules and the Grafana dashboard query only series the services
really expose, and the compose file's observability profile mounts files that exist where the
configurations expect them. promtool comes from Debian's `prometheus` package (the Makefile's
SYSTEM_PACKAGES; `make system-deps` installs it)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

from common.grpc_metrics import GrpcClientMetrics, GrpcServerMetrics
from ledger.metrics import LedgerMetrics
from sequencer.metrics import SequencerMetrics

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "ops" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "dashboards" / "logistics.json"

OURS = re.compile(r"\b((?:sequencer|ledger|grpc|process|python)_[a-z0-9_]+)")


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    found = shutil.which("promtool")
    assert found, "promtool is missing: `make system-deps` installs Debian's prometheus package"
    return subprocess.run([found, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def test_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", RULES.name, cwd=RULES.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 8 rules found" in result.stdout


def test_rules_unit_tests_pass() -> None:
    result = promtool("test", "rules", "alerts_test.yml", cwd=RULES.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test() -> None:
    rules = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    tested = yaml.safe_load((RULES.parent / "alerts_test.yml").read_text())
    covered = {
        case["alertname"] for t in tested["tests"] for case in t.get("alert_rule_test", []) if case.get("exp_alerts")
    }
    assert alerts == covered


def exposed() -> set[str]:
    """Every series name the two services' registries expose (as scraped: counters with
    _total, histograms with _bucket/_count/_sum)."""
    registry = CollectorRegistry()
    SequencerMetrics(registry)
    ledger = CollectorRegistry()
    LedgerMetrics(ledger)
    names: set[str] = set()
    for source in (registry, ledger):
        for family in source.collect():
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(family.type, [""])
            names.update(family.name + suffix for suffix in suffixes)
            names.update(sample.name for sample in family.samples)
    assert {"grpc_server_handled_total", "grpc_client_handled_total", "process_cpu_seconds_total"} <= names
    return names


LABELS = re.compile(r"\{[^}]*\}|\b(?:by|without|on|ignoring)\s*\([^)]*\)")


def referenced(expressions: list[str]) -> set[str]:
    """The series names in PromQL expressions (label matchers and grouping labels left out)."""
    return {name for expr in expressions for name in OURS.findall(LABELS.sub(" ", expr))}


def test_rules_and_dashboard_query_real_series() -> None:
    names = exposed()
    rules = yaml.safe_load(RULES.read_text())
    rule_exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    panel_exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for where, expressions in (("alerts.yml", rule_exprs), ("logistics.json", panel_exprs)):
        unknown = referenced(expressions) - names
        assert not unknown, f"{where} queries series no service exposes: {sorted(unknown)}"
    # The dashboard covers what the issue asks for.
    wanted = {
        "grpc_server_handled_total",
        "grpc_server_handling_seconds_bucket",
        "grpc_client_handled_total",
        "sequencer_gaps",
        "sequencer_oldest_gap_age_seconds",
        "sequencer_parked_events",
        "sequencer_blocked_events",
        "sequencer_backlog_events",
        "sequencer_forwarder_retries_total",
        "sequencer_webhook_deliveries_total",
    }
    assert wanted <= referenced(panel_exprs)
    assert all(t["datasource"]["uid"] == "prometheus" for p in dashboard["panels"] for t in p.get("targets", []))


def test_grpc_label_names_are_go_grpc_middleware_s() -> None:
    registry = CollectorRegistry()
    GrpcServerMetrics(registry)
    GrpcClientMetrics(registry)
    labels = {family.name: family for family in registry.collect()}
    assert set(labels) >= {
        "grpc_server_started",
        "grpc_server_handled",
        "grpc_server_msg_received",
        "grpc_server_msg_sent",
        "grpc_server_handling_seconds",
        "grpc_client_started",
        "grpc_client_handled",
        "grpc_client_handling_seconds",
    }


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of a service's bind mounts."""
    found = {}
    for volume in service.get("volumes", []):
        host, container = volume.split(":")[:2]
        found[container] = (ROOT / host).resolve()
    return found


def test_observability_profile_mounts_the_files_that_exist() -> None:
    services = compose()["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    for service in (prometheus, grafana):
        assert service["profiles"] == ["observability"]
        for container, host in mounts(service).items():
            assert host.exists(), f"{host} (mounted at {container}) does not exist"
    # Prometheus: its configuration, and the rules where the configuration loads them from.
    prom_mounts = mounts(prometheus)
    config_path = next(a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file="))
    config = yaml.safe_load(prom_mounts[config_path].read_text())
    assert [prom_mounts[path] for path in config["rule_files"]] == [RULES]
    # It scrapes both services at their compose names and metrics ports.
    targets = {c["job_name"]: c["static_configs"][0]["targets"] for c in config["scrape_configs"]}
    seq_port = services["sequencer"]["environment"]["SEQUENCER_METRICS_ADDR"].rsplit(":", 1)[1]
    ledger_port = services["ledger"]["environment"]["LEDGER_METRICS_ADDR"].rsplit(":", 1)[1]
    assert targets == {"sequencer": [f"sequencer:{seq_port}"], "ledger": [f"ledger:{ledger_port}"]}
    # Grafana: provisioning (data source, dashboard provider) and the dashboards the provider reads.
    graf_mounts = mounts(grafana)
    provisioning = graf_mounts["/etc/grafana/provisioning"]
    provider = yaml.safe_load((provisioning / "dashboards" / "logistics.yml").read_text())
    dashboards_path = provider["providers"][0]["options"]["path"]
    assert (graf_mounts[dashboards_path] / DASHBOARD.name).samefile(DASHBOARD)
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert source["uid"] == "prometheus" and source["url"] == "http://prometheus:9090"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_path}/{DASHBOARD.name}"
