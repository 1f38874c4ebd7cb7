"""The benchmark command's harness works end to end: `python -m bench --smoke` starts the
system, runs every workload (the `batch` one through SubmitEvents), audits each one, measures
both ceilings and writes its report.

No speed assertions (SPEC 8: speed is measured by the benchmark, never asserted by tests).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKLOADS = ("in_order", "batch", "hot_set", "out_of_order", "retries", "duplicate_storm")


def test_bench_smoke_runs_every_workload_and_audits_pass(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SEQUENCER_", "LEDGER_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "clients" / "python")])
    if os.environ.get("DATABASE_URL", "").strip():
        env["DATABASE_URL"] = os.environ["DATABASE_URL"]
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--json", str(report_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, (
        f"bench --smoke failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )

    report = json.loads(report_path.read_text())
    assert report["mode"] == "smoke"
    assert report["all_passed"] is True
    for name in WORKLOADS:
        row = report["workloads"][name]
        assert row["audit"] == "PASS", row["details"]["audit"]
        assert row["events"] > 0
        assert row["errors"] == 0
        for key in (
            "calls_per_s",
            "submitted_per_s",
            "applied_per_s",
            "ack_p99_ms",
            "s2a_p99_ms",
            "sequencer_peak_rss_mb",
        ):
            assert row[key] is not None, key
    assert report["workloads"]["retries"]["details"]["replays"] > 0
    assert report["workloads"]["out_of_order"]["details"]["parked_on_arrival"] > 0
    # batch: SubmitEvents of 100 items per call; ingress is reported against the echo's calls/s.
    batch = report["workloads"]["batch"]
    assert batch["details"]["items_per_call"] == 100
    assert batch["events"] == batch["calls"] * 100
    for name in ("batch", "in_order"):
        target = report["workloads"][name]["ingress_target"]
        assert target["metric"] == "submitted_vs_echo" and target["value"] is not None
        assert target["min"] == {"batch": 1.5, "in_order": 0.45}[name]

    ceilings = report["ceilings"]
    assert ceilings["echo"]["requests_per_s"] > 0
    pgbench = ceilings["pgbench"]
    if shutil.which("pgbench"):
        # The script mirrors the services' statements and functions: if they drift apart, it fails.
        assert pgbench["available"], pgbench["note"]
        assert pgbench["events_per_s"] > 0 and pgbench["failed_transactions"] == 0
    else:
        assert pgbench["events_per_s"] is None
        assert "not available" in pgbench["note"]
    assert "all audits: PASS" in proc.stdout
