"""The clients as packages, installed into fresh environments outside the repository, running
their examples against a real sequencer and ledger.

Python: `python -m venv` in a temporary folder, `pip install ./clients/python`, then
clients/python/example.py run from that folder with no PYTHONPATH: `logistics` must come from
the venv's site-packages. TypeScript: `npm pack` of clients/typescript (its prepack builds dist/
with tsc), `npm install` of the tarball into an empty project, then its examples/installed.mjs
with plain node.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from tests.processes import ServiceProcess

ROOT = Path(__file__).resolve().parents[2]
INSTALL_TIMEOUT = 600.0
RUN_TIMEOUT = 120.0


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment of a user outside the repository: no PYTHONPATH, no virtualenv."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith(("LOGISTICS_", "SEQUENCER_", "LEDGER_"))
    }
    env.update(extra)
    return env


def _run(command: list[str], cwd: Path, timeout: float, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, (
        f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    )
    return result


def test_the_python_client_installs_and_runs_its_example(
    services: tuple[ServiceProcess, ServiceProcess], tmp_path: Path
) -> None:
    sequencer, ledger = services
    env = _clean_env(PIP_DISABLE_PIP_VERSION_CHECK="1")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path, INSTALL_TIMEOUT, env)
    python = venv / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "-q", str(ROOT / "clients" / "python")], tmp_path, INSTALL_TIMEOUT, env)

    # The package, its stubs, its data file and its typing marker come from site-packages.
    probe = _run(
        [
            str(python),
            "-c",
            "import json, pathlib, logistics, logistics.client as lc, logistics.sequencer.v1.sequencer_pb2 as s;"
            "root = pathlib.Path(logistics.__file__).parent;"
            "print(json.dumps({'root': str(root), 'typed': (root / 'py.typed').exists(),"
            " 'stubs': (root / 'sequencer/v1/sequencer_pb2.pyi').exists(),"
            " 'config': bool(lc.service_config_json()), 'state': str(lc.EventState.APPLIED)}))",
        ],
        tmp_path,
        RUN_TIMEOUT,
        env,
    )
    found = json.loads(probe.stdout)
    assert found["root"].startswith(str(venv)), found
    assert found == {**found, "typed": True, "stubs": True, "config": True, "state": "EVENT_STATE_APPLIED"}

    example = tmp_path / "example.py"
    shutil.copy(ROOT / "clients" / "python" / "example.py", example)
    shipment = f"SHP-PY-{uuid.uuid4().hex[:8]}"
    run_env = {**env, "LOGISTICS_SEQUENCER_ADDR": sequencer.address, "LOGISTICS_LEDGER_ADDR": ledger.address}
    for attempt in ("first", "replayed"):
        result = _run([str(python), str(example), shipment], tmp_path, RUN_TIMEOUT, run_env)
        summary = json.loads(result.stdout.splitlines()[-1])
        assert summary == {
            "shipmentId": shipment,
            "states": ["EVENT_STATE_QUEUED", "EVENT_STATE_PARKED", "EVENT_STATE_QUEUED"],
            "final": ["EVENT_STATE_APPLIED"] * 3,
            "shipment": {"status": "SHIPMENT_STATUS_LOADED", "version": 3},
        }, attempt
        replays = [line.endswith("replayed=True") for line in result.stdout.splitlines()[:3]]
        assert replays == [attempt == "replayed"] * 3, result.stdout


def test_the_typescript_package_installs_and_decodes_error_info(
    services: tuple[ServiceProcess, ServiceProcess], tmp_path: Path
) -> None:
    sequencer, ledger = services
    env = _clean_env(npm_config_audit="false", npm_config_fund="false", npm_config_update_notifier="false")
    packed = _run(
        ["npm", "pack", "--json", "--pack-destination", str(tmp_path)],
        ROOT / "clients" / "typescript",
        INSTALL_TIMEOUT,
        env,
    )
    manifest = json.loads(packed.stdout[packed.stdout.index("[") :])[0]
    files = {entry["path"] for entry in manifest["files"]}
    assert {"dist/index.js", "dist/index.d.ts", "dist/errors.d.ts", "examples/installed.mjs"} <= files, files
    tarball = tmp_path / manifest["filename"]

    project = tmp_path / "consumer"
    project.mkdir()
    (project / "package.json").write_text(json.dumps({"name": "consumer", "private": True, "type": "module"}))
    connect_node = json.loads((ROOT / "package.json").read_text())["devDependencies"]["@connectrpc/connect-node"]
    _run(
        [
            "npm",
            "install",
            "--prefer-offline",
            "--loglevel=error",
            str(tarball),
            f"@connectrpc/connect-node@{connect_node}",
        ],
        project,
        INSTALL_TIMEOUT,
        env,
    )
    installed = project / "node_modules" / "@logistics" / "client"
    assert (installed / "dist" / "index.d.ts").exists()

    shipment = f"SHP-NPM-{uuid.uuid4().hex[:8]}"
    run_env = {**env, "SEQUENCER_ADDR": sequencer.address, "LEDGER_ADDR": ledger.address}
    result = _run(["node", str(installed / "examples" / "installed.mjs"), shipment], project, RUN_TIMEOUT, run_env)
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary == {
        "refusedReason": "IDEMPOTENCY_KEY_MISSING",
        "state": "EVENT_STATE_QUEUED",
        "final": "EVENT_STATE_APPLIED",
        "shipment": {"status": "SHIPMENT_STATUS_CREATED", "version": "1"},
    }
    assert "(domain sequencer.logistics)" in result.stdout

    # The raw trailer decoder: a google.rpc.Status as buf curl prints its detail (base64, no
    # padding) and as the trailer carries it (padded), decoded by the installed package.
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason="SEQUENCE_CONFLICT", domain="sequencer.logistics"))
    encoded = base64.b64encode(status_pb2.Status(code=9, message="m", details=[detail]).SerializeToString()).decode()
    script = (
        "import { errorInfosOfStatusDetails } from '@logistics/client';"
        "for (const v of process.argv.slice(1)) console.log(errorInfosOfStatusDetails(v).map(i => i.reason).join(','));"
    )
    decoded = _run(
        ["node", "--input-type=module", "-e", script, encoded, encoded.rstrip("=")], project, RUN_TIMEOUT, env
    )
    assert decoded.stdout.splitlines() == ["SEQUENCE_CONFLICT", "SEQUENCE_CONFLICT"]
