"""Writes docs/openapi.json, the OpenAPI 3 document of the HTTP/JSON API, from the protos'
generated descriptors (the server serves the same document at /openapi.json).

Usage: python scripts/gen_openapi.py [OUT_FILE]   (default: docs/openapi.json)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "clients" / "python")]
OPENAPI = ROOT / "docs" / "openapi.json"


def document() -> bytes:
    from sequencer.http import openapi

    return openapi.render(openapi.build())


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else OPENAPI
    target.write_bytes(document())
    print(f"wrote {target}")
