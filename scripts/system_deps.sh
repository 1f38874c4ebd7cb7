#!/usr/bin/env bash
# Installs the Debian packages the tests need (named by the Makefile's SYSTEM_PACKAGES) when they
# are missing, so a fresh CI machine needs nothing installed by hand. Waits for the dpkg lock
# instead of failing when another install runs.
set -euo pipefail
missing=()
for pkg in "$@"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "installing Debian packages: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt() { $SUDO apt-get -o DPkg::Lock::Timeout=600 -y -q "$@"; }
apt install --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || { apt update >/dev/null && apt install --no-install-recommends "${missing[@]}" >/dev/null; }
