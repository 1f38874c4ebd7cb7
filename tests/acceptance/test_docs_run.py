"""Docs that run: every ```sh, ```bash, ```shell, ```console, ```grpcurl and ```python block of
README.md and docs/*.md runs as written against a real sequencer and ledger.

Per document, in document order, on a system of its own (a fresh database, both services as
subprocesses on port 0), so the blocks of one document form a story as a reader runs it and
documents never see each other's data. What is rewritten, and nothing else:

- the default addresses in a block's text: `127.0.0.1:50051` (sequencer), `127.0.0.1:50052`
  (ledger), `127.0.0.1:9464` / `127.0.0.1:9465` (metrics) and, when the sequencer serves HTTP,
  `127.0.0.1:8080`, become the test's ports;
- the environment: LOGISTICS_SEQUENCER_ADDR / LOGISTICS_LEDGER_ADDR name the test's services
  (the variables the CLI and the Python examples read), `.venv/bin` is first on PATH (where
  `make install` puts python, grpcurl 1.8.6 and the CLI's package), there is no PYTHONPATH, and
  the working directory is the repository root.

Between blocks the test waits (bounded) until the sequencer has no QUEUED event left, as a reader
would before the next command. A shell block runs under `bash -e -o pipefail`: every command in it
must succeed. A ```console block runs its `$ ` lines. A ```python block runs as a file with the
venv's python.

Markers, on the line before a block's opening fence (blank lines between are allowed):

    <!-- docs-test: skip (why) -->            not run; listed with its reason in the output
    <!-- docs-test: exit-nonzero (why) -->    run; must fail (a documented refusal)

A block with neither that does not run is a failure naming the file, the line, the command that
failed, its exit status and its output. Any other `docs-test:` marker is a failure too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import psycopg
import pytest

from tests.processes import ServiceProcess, start_ledger, start_sequencer

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = ROOT / ".venv" / "bin"
LANGUAGES = {"sh", "bash", "shell", "console", "grpcurl", "python"}
BLOCK_TIMEOUT = 180.0
SETTLE_DEADLINE = 30.0

_FENCE = re.compile(r"^```([A-Za-z0-9_+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_MARKER = re.compile(r"^<!--\s*docs-test:\s*(.*?)\s*-->\s*$")
_KNOWN = re.compile(r"^(skip|exit-nonzero)\s*\((.+)\)$")


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclasses.dataclass(frozen=True)
class Block:
    name: str  # the document, relative to the repository
    line: int  # of the opening fence, 1-based
    language: str
    text: str
    marker: str  # "", "skip" or "exit-nonzero"
    why: str

    @property
    def where(self) -> str:
        return f"{self.name}:{self.line} (```{self.language})"


def blocks(path: Path, root: Path = ROOT) -> list[Block]:
    """The runnable blocks of a document, each with the marker before it."""
    name = str(path.relative_to(root))
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    found: list[Block] = []
    for match in _FENCE.finditer(source):
        language = match.group(1).lower()
        line = source.count("\n", 0, match.start()) + 1
        before = line - 2
        while before >= 0 and not lines[before].strip():
            before -= 1
        marker, why = "", ""
        if before >= 0 and (m := _MARKER.match(lines[before].strip())):
            known = _KNOWN.match(m.group(1))
            if known is None:
                raise AssertionError(
                    f"{name}:{before + 1}: unknown marker {lines[before].strip()!r}; "
                    "use <!-- docs-test: skip (why) --> or <!-- docs-test: exit-nonzero (why) -->"
                )
            marker, why = known.group(1), known.group(2).strip()
        if language in LANGUAGES:
            found.append(Block(name, line, language, match.group(2), marker, why))
        elif marker:
            raise AssertionError(f"{name}:{line}: a docs-test marker before a ```{language} block")
    return found


@dataclasses.dataclass
class System:
    sequencer: ServiceProcess
    ledger: ServiceProcess
    database_url: str

    def substitutions(self) -> dict[str, str]:
        found = {
            "127.0.0.1:50051": self.sequencer.address,
            "127.0.0.1:50052": self.ledger.address,
            "127.0.0.1:9464": f"127.0.0.1:{self.sequencer.metrics_port}",
            "127.0.0.1:9465": f"127.0.0.1:{self.ledger.metrics_port}",
        }
        started = next((e for e in self.sequencer.logs if e.get("msg") == "sequencer listening"), {})
        if started.get("http_port"):
            found["127.0.0.1:8080"] = f"127.0.0.1:{started['http_port']}"
        return found

    def settle(self) -> None:
        """Until no event waits to be forwarded (bounded: the next block reports what is wrong)."""
        deadline = time.monotonic() + SETTLE_DEADLINE
        url = self.database_url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(url, autocommit=True) as conn:
            while time.monotonic() < deadline:
                row = conn.execute("SELECT count(*) FROM sequencer.events WHERE state = 2").fetchone()
                if row is not None and row[0] == 0:
                    return
                time.sleep(0.1)


def _http_settings() -> dict[str, str]:
    """Port 0 for the sequencer's HTTP listener where this tree has one (SPEC 13)."""
    config = (ROOT / "sequencer" / "config.py").read_text(encoding="utf-8")
    return {"SEQUENCER_HTTP_ADDR": "127.0.0.1:0"} if '"HTTP_ADDR"' in config else {}


@contextlib.contextmanager
def running(database_url: str) -> Iterator[System]:
    """Both services on a fresh database (started only for a document with blocks to run)."""
    ledger = start_ledger(database_url)
    try:
        sequencer = start_sequencer(database_url, ledger.port, **cast("dict[str, Any]", _http_settings()))
        try:
            yield System(sequencer, ledger, database_url)
        finally:
            sequencer.terminate()
    finally:
        ledger.terminate()


def console_commands(text: str) -> str:
    """The `$ ` lines of a console block (with their `\\` continuations), as a script."""
    commands: list[str] = []
    continuing = False
    for line in text.splitlines():
        if continuing:
            commands.append(line)
        elif line.startswith("$ "):
            commands.append(line[2:])
        else:
            continue
        continuing = line.rstrip().endswith("\\")
    return "\n".join(commands) + "\n"


def run_block(block: Block, system: System, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    text = block.text
    for default, actual in system.substitutions().items():
        text = text.replace(default, actual)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith(("SEQUENCER_", "LEDGER_"))}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        LOGISTICS_SEQUENCER_ADDR=system.sequencer.address,
        LOGISTICS_LEDGER_ADDR=system.ledger.address,
    )
    if block.language == "python":
        script = tmp_path / f"block_{block.line}.py"
        script.write_text(text, encoding="utf-8")
        command = [str(VENV_BIN / "python"), str(script)]
    else:
        script_text = console_commands(text) if block.language == "console" else text
        # Each traced command names its line in the block (reported on failure). bash ignores a
        # PS4 from the environment when run as root, so the script sets it on a line of its own.
        script_text = "PS4='+ line $((LINENO - 1)): '\n" + script_text
        command = ["bash", "-e", "-o", "pipefail", "-x", "-c", script_text]
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT, check=False
    )


def _failed_command(block: Block, stderr: str) -> str:
    """The last traced command of a shell block, with its line in the document."""
    traced = [line for line in stderr.splitlines() if line.startswith("+ line ")]
    if not traced or block.language == "python":
        return block.text.strip().splitlines()[0] if block.text.strip() else "(empty block)"
    last = traced[-1].removeprefix("+ line ")
    number, _, command = last.partition(": ")
    line = block.line + int(number) if number.isdigit() else block.line
    return f"line {line}: {command}"


def _tail(text: str, lines: int = 25) -> str:
    kept = text.rstrip().splitlines()[-lines:]
    return "\n".join(f"    {line}" for line in kept) or "    (nothing)"


@pytest.mark.parametrize("document", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_block_of_the_document_runs_as_written(
    document: Path, database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    found = blocks(document)
    skipped = [b for b in found if b.marker == "skip"]
    failures: list[str] = []
    with contextlib.ExitStack() as stack:
        to_run = [b for b in found if b.marker != "skip"]
        system = stack.enter_context(running(database_url)) if to_run else None
        for block in to_run:
            assert system is not None
            failures += check_block(block, system, tmp_path)
            system.settle()
    with capsys.disabled():
        ran = len(found) - len(skipped)
        print(f"\n{document.relative_to(ROOT)}: {ran} blocks run, {len(skipped)} marked skip")
        for block in skipped:
            print(f"  skip {block.where}: {block.why}")
    assert not failures, "\n\n".join(failures)


def check_block(block: Block, system: System, tmp_path: Path) -> list[str]:
    """Runs one block; its failure as a message (none when it did what its marker says)."""
    result = run_block(block, system, tmp_path)
    expect_failure = block.marker == "exit-nonzero"
    if (result.returncode != 0) == expect_failure:
        return []
    if expect_failure:
        problem = f"{block.where} is marked exit-nonzero ({block.why}) but exited 0"
    else:
        problem = f"{block.where} failed with exit {result.returncode} at {_failed_command(block, result.stderr)}"
    return [
        f"{problem}\n  stdout:\n{_tail(result.stdout)}\n  stderr:\n{_tail(result.stderr)}\n"
        "  (fix the block, or mark it: <!-- docs-test: skip (why) --> on the line before its fence)"
    ]


def test_markers_are_read_as_documented(tmp_path: Path) -> None:
    """The marker rules on a document written here: skip, exit-nonzero, unknown, misplaced."""
    doc = tmp_path / "doc.md"
    doc.write_text(
        "text\n\n<!-- docs-test: skip (needs a browser) -->\n\n```sh\nfirefox\n```\n\n"
        "<!-- docs-test: exit-nonzero (refused without a key) -->\n```bash\nfalse\n```\n\n"
        "```python\nprint(1)\n```\n\n```json\n{}\n```\n\n"
        "```console\n$ echo a \\\n  b\na b\n$ true\n```\n",
        encoding="utf-8",
    )
    found = blocks(doc, tmp_path)
    assert [(b.language, b.marker, b.why) for b in found] == [
        ("sh", "skip", "needs a browser"),
        ("bash", "exit-nonzero", "refused without a key"),
        ("python", "", ""),
        ("console", "", ""),
    ]
    assert console_commands(found[3].text) == "echo a \\\n  b\ntrue\n"
    doc.write_text("<!-- docs-test: skipp (typo) -->\n```sh\ntrue\n```\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="unknown marker"):
        blocks(doc, tmp_path)
    doc.write_text("<!-- docs-test: skip (x) -->\n```json\n{}\n```\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="marker before a ```json block"):
        blocks(doc, tmp_path)
    # A failed shell block names the document line of the command that failed.
    block = Block("doc.md", 10, "sh", "true\nfalse\n", "", "")
    assert _failed_command(block, "+ line 1: true\n+ line 2: false\n") == "line 12: false"
