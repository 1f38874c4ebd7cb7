"""Real service subprocesses for acceptance and fault tests.

Each service binds port 0 and reports its ports in its start-up log line, so there is no
"pick a free port, close it, reuse it" race. Logs are collected (JSON lines) for assertions.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


class ServiceProcess:
    def __init__(self, name: str, env: dict[str, str], keep: int | None = None) -> None:
        self.name = name
        self.env = env
        # At most about this many recent log lines are kept (a long campaign logs millions).
        self.keep = keep
        self.logs: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self.port = 0
        self.metrics_port = 0
        # The sequencer's HTTP/JSON listener (0 for the ledger).
        self.http_port = 0
        self.proc: subprocess.Popen[str] | None = None
        self._ready = threading.Event()

    def start(self, timeout: float = 30.0) -> ServiceProcess:
        env = {**os.environ, **self.env}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "clients" / "python")])
        self._ready.clear()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.name],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()
        if not self._ready.wait(timeout):
            self.kill()
            raise AssertionError(f"{self.name} did not start:\n" + "\n".join(self.raw[-30:]))
        return self

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self.raw.append(line.rstrip())
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            self.logs.append(entry)
            if self.keep is not None and len(self.raw) > 2 * self.keep:
                del self.raw[: self.keep]
                del self.logs[: max(0, len(self.logs) - self.keep)]
            if entry.get("msg") == f"{self.name} listening":
                self.port = int(entry["port"])
                self.metrics_port = int(entry.get("metrics_port") or 0)
                self.http_port = int(entry.get("http_port") or 0)
                self._ready.set()
        self._ready.set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _reap(self) -> None:
        assert self.proc is not None
        self._reader.join(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def kill(self) -> None:
        """kill -9: no shutdown hooks, no goodbyes."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        if self.proc is not None:
            self._reap()

    def terminate(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise
        self._reap()
        return int(self.proc.returncode)

    def wait_log(self, predicate: Any, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for entry in list(self.logs):
                if predicate(entry):
                    return entry
            time.sleep(0.05)
        raise AssertionError(f"no matching log line from {self.name}")


def start_ledger(database_url: str, port: int = 0, *, keep: int | None = None, **env: str) -> ServiceProcess:
    return ServiceProcess(
        "ledger",
        {
            "DATABASE_URL": database_url,
            "LEDGER_LISTEN_ADDR": f"127.0.0.1:{port}",
            "LEDGER_METRICS_ADDR": "127.0.0.1:0",
            **env,
        },
        keep,
    ).start()


def start_sequencer(database_url: str, ledger_port: int, *, keep: int | None = None, **env: str) -> ServiceProcess:
    return ServiceProcess(
        "sequencer",
        {
            "DATABASE_URL": database_url,
            "SEQUENCER_LISTEN_ADDR": "127.0.0.1:0",
            "SEQUENCER_METRICS_ADDR": "127.0.0.1:0",
            "SEQUENCER_HTTP_ADDR": "127.0.0.1:0",
            "SEQUENCER_LEDGER_TARGET": f"127.0.0.1:{ledger_port}",
            "SEQUENCER_FORWARDER_POLL_INTERVAL": "0.2",
            **env,
        },
        keep,
    ).start()
