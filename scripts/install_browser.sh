#!/usr/bin/env bash
# Installs Debian's Chromium for the browser test of the report (which drives it
# over the DevTools protocol), unless it is already there. Safe to run any
# number of times.
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "chromium is missing and installing it needs root:" >&2
    echo "  sudo apt-get update && sudo apt-get install -y chromium fonts-dejavu-core" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
command -v chromium >/dev/null
