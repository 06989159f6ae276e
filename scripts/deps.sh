#!/usr/bin/env bash
# Install what the third-party client tests and the conformance suite need.
#
# Idempotent and fast when everything is already present. Meant to run as root
# on a fresh Debian 12 machine (CI) or on a developer machine:
#
#   bash scripts/deps.sh
#
# Installs (each only when missing; one line printed per thing installed):
#   - Python `websockets` for python3            (tests/clients/ws_python.py)
#   - Node packages of tests/clients via npm ci  (ws_node.mjs, browser.mjs)
#   - Debian's chromium at /usr/bin/chromium     (browser.mjs, via playwright-core)
#   - certutil (libnss3-tools)                   (browser.mjs trusts the test CA over wss://)
#   - the openssl command-line client            (tests/tls.rs: s_client's key updates)
#   - Autobahn|Testsuite 25.10.1 + pinned deps (scripts/autobahn/setup.sh, itself idempotent)
#   - Debian's redis-server and redis-tools      (tests/cluster.rs starts its own servers)
#   - Debian's systemd (for systemd-analyze)      (tests/drain.rs verifies scripts/longlink.service,
#                                                 tests/deb.rs the unit in the .deb)
#   - Debian's prometheus (for promtool)          (tests/deploy.rs checks deploy/prometheus)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLIENTS="$REPO/tests/clients"
WEBSOCKETS_PIN="17.4"

say() { echo "deps: $*"; }

# 1. Python websockets
if ! python3 -c 'import websockets' >/dev/null 2>&1; then
  say "installing python websockets==$WEBSOCKETS_PIN for $(command -v python3)"
  # (pip's "running as root" warning is harmless here)
  # A Debian-managed python3 refuses (PEP 668, "externally-managed-environment"): retry
  # with --break-system-packages there; the image's pyenv python3 takes the first form.
  python3 -m pip install --quiet --disable-pip-version-check "websockets==$WEBSOCKETS_PIN" ||
    python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "websockets==$WEBSOCKETS_PIN"
fi

# 2. Node packages (exact versions from package-lock.json)
if [ ! -d "$CLIENTS/node_modules" ] || [ "$CLIENTS/package-lock.json" -nt "$CLIENTS/node_modules" ]; then
  say "installing node packages in tests/clients (npm ci)"
  (cd "$CLIENTS" && npm ci --no-audit --no-fund --loglevel=error)
  touch "$CLIENTS/node_modules"
fi

# 3. Debian chromium (playwright-core drives it; never download a browser build)
if [ ! -x /usr/bin/chromium ]; then
  say "installing chromium (apt)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

# 3b. certutil (NSS tools): the browser test trusts the test CA in a throw-away NSS db
if ! command -v certutil >/dev/null; then
  say "installing libnss3-tools (apt, for certutil)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libnss3-tools >/dev/null
fi

# 3c. openssl's s_client: a TLS 1.3 client that updates its keys on command (tests/tls.rs)
if ! command -v openssl >/dev/null; then
  say "installing openssl (apt, for s_client)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null
fi

# 4. Redis (the cluster tests start redis-server processes of their own on free ports)
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
  say "installing redis-server and redis-tools (apt)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >/dev/null
  # The package starts a system-wide server on 6379; the tests do not use it.
  (systemctl disable --now redis-server || service redis-server stop) >/dev/null 2>&1 || true
fi

# 4b. systemd-analyze (checks the unit files, scripts/longlink.service and the .deb's; nothing
#     is started). dpkg-deb (tests/deb.rs, scripts/deb.sh) is in dpkg, which is Essential.
if ! command -v systemd-analyze >/dev/null 2>&1; then
  say "installing systemd (apt, for systemd-analyze)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null
fi

# 4c. promtool (checks the alert rules; the Prometheus server it comes with is not started)
if ! command -v promtool >/dev/null 2>&1; then
  say "installing prometheus (apt, for promtool)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  (systemctl disable --now prometheus || service prometheus stop) >/dev/null 2>&1 || true
fi

# 5. Autobahn|Testsuite in a CPython 2.7 virtualenv under ~/.cache (scripts/autobahn/setup.sh)
if ! "$REPO/scripts/autobahn/setup.sh" --check; then
  say "installing Autobahn|Testsuite (scripts/autobahn/setup.sh)"
  "$REPO/scripts/autobahn/setup.sh" >/dev/null
fi

say "ok"
