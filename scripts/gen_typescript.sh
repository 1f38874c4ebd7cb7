#!/usr/bin/env bash
# Regenerates the committed TypeScript stubs (clients/typescript/src/gen) from protos/ with buf
# and the protoc-gen-es pinned in package.json. Needs `npm ci` (make node) first; no network.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=clients/typescript/src/gen
rm -rf "$OUT"
npx --no-install buf generate --template buf.gen.yaml
echo "generated $(find "$OUT" -name '*.ts' | wc -l | tr -d ' ') TypeScript files under $OUT"
