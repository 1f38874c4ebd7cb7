"""Subprocesses of a benchmark run: the two services (port 0, port read from the start-up log
line), the echo server, and /proc readings (RSS now and peak, CPU time) of any of them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
PYTHONPATH = os.pathsep.join([str(ROOT), str(ROOT / "clients" / "python")])
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, **(extra or {})}
    env["PYTHONPATH"] = PYTHONPATH
    # A sequencer's HTTP listener on a free port, never the default 8080 (runs side by side).
    env.setdefault("SEQUENCER_HTTP_ADDR", "127.0.0.1:0")
    return env


def _status_mb(pid: int, name: str) -> float | None:
    """One kB field of /proc/<pid>/status, in MiB; None when the process (or the field) is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1]) / 1024
    return None


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM (peak resident set) of a live process, in MiB; None when it is gone."""
    return _status_mb(pid, "VmHWM")


def rss_mb(pid: int) -> float | None:
    """VmRSS (resident set now) of a live process, in MiB; None when it is gone."""
    return _status_mb(pid, "VmRSS")


def rss_anon_mb(pid: int) -> float | None:
    """RssAnon (private resident memory) of a live process, in MiB. For a PostgreSQL backend
    this leaves out the shared buffers it has touched, which VmRSS counts and which only grow
    as the backend visits more pages (a leak it is not)."""
    return _status_mb(pid, "RssAnon")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time a process has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    # After the command name: state is field 3, utime 14 and stime 15 (1-based, man 5 proc).
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def backend_cpu_seconds(pids: list[int]) -> dict[int, float]:
    """CPU time of PostgreSQL backends by pid (only on the same machine; others are skipped)."""
    found = {}
    for pid in pids:
        seconds = cpu_seconds(pid)
        if seconds is not None:
            found[pid] = seconds
    return found


class Service:
    """One service subprocess; its JSON-lines log goes to a file, never through a pipe we must
    drain (reading logs in the harness would cost CPU the services need)."""

    def __init__(self, name: str, env: dict[str, str], log_path: Path, prefix: list[str] | None = None) -> None:
        self.name = name
        self.env = env
        self.log_path = log_path
        self.prefix = prefix or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> Service:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, *self.prefix, "-m", self.name],
            env=child_env(self.env),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        deadline = time.monotonic() + timeout
        marker = f"{self.name} listening"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} during start-up:\n{self.tail()}")
            for line in self.log_path.read_text(errors="replace").splitlines():
                if marker in line:
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        continue
                    if entry.get("msg") == marker:
                        self.port = int(entry["port"])
                        return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"{self.name} did not report listening within {timeout:.0f}s:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (graceful: lets a profiler write its output), SIGKILL after `timeout`."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class EchoServer:
    """The transport ceiling's server: `python -m bench.echo`, which prints its port."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    def start(self, timeout: float = 30.0) -> EchoServer:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.echo"],
            env=child_env(),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        start = time.monotonic()
        line = self.proc.stdout.readline()
        if not line or time.monotonic() - start > timeout:
            self.stop()
            raise RuntimeError("the echo server did not start")
        self.port = int(json.loads(line)["port"])
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
