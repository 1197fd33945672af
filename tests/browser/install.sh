#!/usr/bin/env bash
# Installs what the browser tests (tests/test_web.py) need that pip cannot: Debian's
# headless-capable Chromium at /usr/bin/chromium. Idempotent: does nothing when it is
# already there. Playwright (the PyPI package, in the `test` extra) drives this browser;
# `playwright install` is never run, since it downloads a browser build of its own.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "tests/browser/install.sh: no /usr/bin/chromium and no apt-get; install Chromium by hand" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core
