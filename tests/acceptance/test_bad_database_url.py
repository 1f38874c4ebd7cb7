"""A DATABASE_URL the services cannot use is one line on stderr and a non-zero exit, from
`python -m sequencer`, `python -m ledger` (serve and migrate) and `make up`: never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 60.0

# A refused port, a host that cannot resolve (.invalid is reserved: RFC 6761), a foreign scheme.
BAD_URLS = {
    "refused": ("postgresql://postgres@127.0.0.1:1/logistics", "Connection refused"),
    "unresolvable": ("postgresql://postgres:s3cret@db.example.invalid/logistics", "failed to resolve host"),
    "scheme": ("mysql://root@127.0.0.1/logistics", "must be a postgresql:// URL"),
}


def _env(url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SEQUENCER_", "LEDGER_"))}
    env.update(
        DATABASE_URL=url,
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "clients" / "python")]),
        SEQUENCER_LISTEN_ADDR="127.0.0.1:0",
        SEQUENCER_METRICS_ADDR="127.0.0.1:0",
        LEDGER_LISTEN_ADDR="127.0.0.1:0",
        LEDGER_METRICS_ADDR="127.0.0.1:0",
    )
    return env


def _run(command: list[str], url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=ROOT, env=_env(url), capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def _assert_one_line(result: subprocess.CompletedProcess[str], prefix: str, cause: str) -> None:
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    problem = [line for line in lines if "DATABASE_URL" in line and not line.startswith("database: ")]
    assert result.returncode != 0, lines
    assert "Traceback" not in result.stderr, result.stderr
    assert len(problem) == 1, lines
    assert problem[0].startswith(prefix), problem
    assert cause in problem[0], problem
    # The password never reaches the terminal.
    assert "s3cret" not in result.stdout + result.stderr


@pytest.mark.parametrize("service", ["sequencer", "ledger"])
@pytest.mark.parametrize("case", sorted(BAD_URLS))
def test_a_service_started_on_a_bad_database_url_says_so_in_one_line(service: str, case: str) -> None:
    url, cause = BAD_URLS[case]
    result = _run([sys.executable, "-m", service], url)
    _assert_one_line(result, f"{service}: ", cause)
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1, result.stderr


@pytest.mark.parametrize("service", ["sequencer", "ledger"])
def test_migrate_on_a_refused_database_says_so_in_one_line(service: str) -> None:
    url, cause = BAD_URLS["refused"]
    result = _run([sys.executable, "-m", service, "migrate"], url)
    _assert_one_line(result, f"{service}: ", cause)


@pytest.mark.parametrize("case", sorted(BAD_URLS))
def test_make_up_on_a_bad_database_url_fails_with_one_line(case: str) -> None:
    url, cause = BAD_URLS[case]
    result = _run(["make", "--no-print-directory", "up"], url)
    _assert_one_line(result, "make up failed: ", cause)


def test_a_misspelt_setting_is_one_line_too() -> None:
    env = _env(os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    env["SEQUENCER_LISTEN_ADRR"] = "127.0.0.1:0"
    result = subprocess.run(
        [sys.executable, "-m", "sequencer"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "sequencer: configuration error: unknown settings: SEQUENCER_LISTEN_ADRR"
