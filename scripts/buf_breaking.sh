#!/usr/bin/env bash
# The contract must not break silently: compare protos/ with the previous commit's.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
if ! git rev-parse --verify -q HEAD~1 >/dev/null || ! git cat-file -e HEAD~1:buf.yaml 2>/dev/null; then
  echo "buf breaking: no previous commit with protos to compare against"
  exit 0
fi
npx --no-install buf breaking --against ".git#ref=HEAD~1"
echo "buf breaking: protos compatible with HEAD~1"
