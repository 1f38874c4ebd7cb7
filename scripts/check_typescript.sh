#!/usr/bin/env bash
# Fails when the committed TypeScript stubs drift from protos/ (or from the pinned generator), or
# when the TypeScript client does not type-check. Needs `npm ci` (make node) first; no network.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=clients/typescript/src/gen
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# Same template, output rooted in the temp dir: the stubs land in $TMP/$OUT.
npx --no-install buf generate --template buf.gen.yaml --output "$TMP"
if ! diff -r -u "$TMP/$OUT" "$OUT"; then
  echo "TypeScript stubs under $OUT are out of date with protos/ (run: bash scripts/gen_typescript.sh)" >&2
  exit 1
fi
echo "TypeScript stubs match protos/"

npx --no-install tsc --noEmit -p clients/typescript
echo "TypeScript client type-checks"
