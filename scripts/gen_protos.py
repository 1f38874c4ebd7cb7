"""Regenerates the committed Python code under clients/python from protos/.

Usage: python scripts/gen_protos.py [OUT_DIR]   (default: clients/python)

Old generated files are deleted first so a removed proto leaves nothing behind. The generator
versions are pinned in requirements.lock (grpcio-tools, mypy-protobuf).
"""

from __future__ import annotations

import os
import shutil
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
# Vendored imports (google.rpc.Status, google.api.http); their Python code comes from
# googleapis-common-protos.
THIRD_PARTY = ROOT / "third_party" / "protos"
PACKAGES = ("events", "sequencer", "ledger")


def generate(out_dir: Path) -> None:
    # The mypy-protobuf plugins live beside this interpreter (the project's venv).
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    base = out_dir / "logistics"
    for pkg in PACKAGES:
        shutil.rmtree(base / pkg, ignore_errors=True)
        (base / pkg / "v1").mkdir(parents=True)
        (base / pkg / "__init__.py").write_text("")
        (base / pkg / "v1" / "__init__.py").write_text("")
    (base / "__init__.py").touch()
    (base / "py.typed").touch()
    well_known = str(resources.files("grpc_tools") / "_proto")
    files = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{THIRD_PARTY}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "clients" / "python")
