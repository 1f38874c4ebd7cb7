"""The compose deployment's credentials without docker: `python -m ops bootstrap` makes the CA,
server certificates, tokens and identities files; a ledger and a sequencer started on them (TLS,
tokens, the sequencer calling the ledger with its token) take an event end to end; the health
check and the CLI reach them with LOGISTICS_* only; a second bootstrap changes nothing."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.processes import start_ledger, start_sequencer

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 120.0


def ops(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LOGISTICS_")}
    environ.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "clients" / "python")]), **env)
    return subprocess.run(
        [sys.executable, "-m", "ops", *args], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=TIMEOUT
    )


def test_a_bootstrapped_deployment_is_secured_and_works(database_url: str, tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    first = ops("bootstrap", str(secrets), env={})
    assert first.returncode == 0, first.stderr
    files = {str(p.relative_to(secrets)): p.read_bytes() for p in secrets.rglob("*") if p.is_file()}
    for name in ("ca.pem", "ledger.pem", "sequencer.key", "tokens/ops.token", "sequencer-identities.json"):
        assert name in files
    for name in ("ca.key", "ledger.key", "sequencer.key", "tokens/ops.token", "tokens/sequencer.token"):
        assert (secrets / name).stat().st_mode & 0o077 == 0, f"{name} is readable by others"
    token = {c: (secrets / "tokens" / f"{c}.token").read_text().strip() for c in ("ops", "producer", "sequencer")}
    identities = json.loads((secrets / "ledger-identities.json").read_text())["identities"]
    assert {i["caller"]: i["token_sha256"] for i in identities}["sequencer"] == hashlib.sha256(
        token["sequencer"].encode()
    ).hexdigest()
    assert token["sequencer"] not in (secrets / "ledger-identities.json").read_text()

    again = ops("bootstrap", str(secrets), env={})
    assert again.returncode == 0 and "nothing changed" in again.stdout
    assert {str(p.relative_to(secrets)): p.read_bytes() for p in secrets.rglob("*") if p.is_file()} == files

    ledger = start_ledger(
        database_url,
        LEDGER_TLS_CERT=str(secrets / "ledger.pem"),
        LEDGER_TLS_KEY=str(secrets / "ledger.key"),
        LEDGER_IDENTITIES_FILE=str(secrets / "ledger-identities.json"),
    )
    try:
        sequencer = start_sequencer(
            database_url,
            ledger.port,
            SEQUENCER_TLS_CERT=str(secrets / "sequencer.pem"),
            SEQUENCER_TLS_KEY=str(secrets / "sequencer.key"),
            SEQUENCER_IDENTITIES_FILE=str(secrets / "sequencer-identities.json"),
            SEQUENCER_LEDGER_TLS_CA=str(secrets / "ca.pem"),
            SEQUENCER_LEDGER_TOKEN_FILE=str(secrets / "tokens" / "sequencer.token"),
        )
        try:
            # Truthful start-up lines: TLS on, credentials required.
            for service in (ledger, sequencer):
                started = next(e for e in service.logs if e.get("msg") == f"{service.name} listening")
                assert (started["tls"], started["auth"], started["exposure"]) == (
                    "on",
                    "credentials required",
                    "loopback",
                )

            tls = {"LOGISTICS_TLS_CA": str(secrets / "ca.pem")}
            assert ops("health", sequencer.address, env=tls).returncode == 0
            assert ops("health", ledger.address, env=tls).returncode == 0
            assert ops("health", sequencer.address, env={}).returncode == 1  # plaintext against TLS

            # A producer submits over TLS with its token; the sequencer forwards with its own.
            script = (
                "import asyncio\n"
                "from logistics import client as lc\n"
                "from tests.support import shipment_event\n"
                "async def main():\n"
                "    async with lc.SequencerClient.from_env() as s:\n"
                "        r = await s.submit(shipment_event('SHP-BOOT', 1, 'shipment_created'), idempotency_key='b1')\n"
                "        print((await s.wait(r.transaction_id, timeout=30)).state)\n"
                "asyncio.run(main())\n"
            )
            producer = {**tls, "LOGISTICS_SEQUENCER_ADDR": sequencer.address, "LOGISTICS_TOKEN": token["producer"]}
            environ = {k: v for k, v in os.environ.items() if not k.startswith("LOGISTICS_")}
            environ.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "clients" / "python")]), **producer)
            applied = subprocess.run(
                [sys.executable, "-c", script], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=TIMEOUT
            )
            assert applied.stdout.strip() == "EVENT_STATE_APPLIED", applied.stderr

            admin = {**tls, "LOGISTICS_SEQUENCER_ADDR": sequencer.address, "LOGISTICS_TOKEN": token["ops"]}
            entity = ops("entity", "shipment", "SHP-BOOT", "--json", env=admin)
            assert entity.returncode == 0, entity.stderr
            assert json.loads(entity.stdout)["entity"]["watermark"] == "1"
            producer_gaps = ops("gaps", env={**admin, "LOGISTICS_TOKEN": token["producer"]})
            assert producer_gaps.returncode == 7 and "PERMISSION_DENIED" in producer_gaps.stderr
        finally:
            sequencer.terminate()
    finally:
        ledger.terminate()
