"""Fails when the committed generated code under clients/python drifts from protos/."""

from __future__ import annotations

import filecmp
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gen_protos import PACKAGES, ROOT, generate


def main() -> int:
    committed = ROOT / "clients" / "python" / "logistics"
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = Path(tmp) / "logistics"
        drift = []
        for pkg in PACKAGES:
            a = {p.relative_to(fresh) for p in (fresh / pkg).rglob("*") if p.is_file()}
            b = {
                p.relative_to(committed)
                for p in (committed / pkg).rglob("*")
                if p.is_file() and "__pycache__" not in p.parts
            }
            drift += [f"missing: {p}" for p in sorted(a - b)]
            drift += [f"stale: {p}" for p in sorted(b - a)]
            drift += [
                f"differs: {p}" for p in sorted(a & b) if not filecmp.cmp(fresh / p, committed / p, shallow=False)
            ]
    # The OpenAPI document is generated from the committed code just checked.
    from gen_openapi import OPENAPI, document

    if not OPENAPI.exists() or OPENAPI.read_bytes() != document():
        drift.append(f"differs: {OPENAPI.relative_to(ROOT)}")
    if drift:
        print("generated code is out of date with protos/ (run `make gen`):\n  " + "\n  ".join(drift))
        return 1
    print("generated code matches protos/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
