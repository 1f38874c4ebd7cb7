"""What OTEL_TRACES_EXPORTER installs when a service starts (common.tracing.configure), each case
in a fresh interpreter: OpenTelemetry allows one global tracer provider per process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROBE = """
from opentelemetry import trace
from common import tracing
tracing.configure("sequencer")
provider = trace.get_tracer_provider()
processors = getattr(getattr(provider, "_active_span_processor", None), "_span_processors", ())
print(type(provider).__name__, sorted(type(p.span_exporter).__module__ for p in processors))
print(getattr(provider, "resource", None) and provider.resource.attributes.get("service.name"))
"""


def probe(**env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    clean["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "clients" / "python")])
    result = subprocess.run(
        [sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_off_by_default_and_with_none() -> None:
    assert probe()[0].startswith("ProxyTracerProvider")
    assert probe(OTEL_TRACES_EXPORTER="none")[0].startswith("ProxyTracerProvider")
    assert probe(OTEL_TRACES_EXPORTER="otlp", OTEL_SDK_DISABLED="true")[0].startswith("ProxyTracerProvider")


def test_otlp_over_grpc_or_http_and_console() -> None:
    grpc_lines = probe(OTEL_TRACES_EXPORTER="otlp")
    assert grpc_lines == ["TracerProvider ['opentelemetry.exporter.otlp.proto.grpc.trace_exporter']", "sequencer"]
    http_lines = probe(OTEL_TRACES_EXPORTER="otlp,console", OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf")
    assert http_lines[0] == (
        "TracerProvider ['opentelemetry.exporter.otlp.proto.http.trace_exporter', 'opentelemetry.sdk.trace.export']"
    )
    assert probe(OTEL_TRACES_EXPORTER="console", OTEL_SERVICE_NAME="seq-eu-1")[1] == "seq-eu-1"


def test_an_unknown_exporter_is_refused() -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    clean["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "clients" / "python")])
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**clean, "OTEL_TRACES_EXPORTER": "zipkin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0 and "unknown exporter 'zipkin'" in result.stderr
