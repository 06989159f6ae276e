#!/usr/bin/env bash
# Install Autobahn|Testsuite 25.10.1 (PyPI, unmodified) in a CPython 2.7 virtualenv under
# $AUTOBAHN_HOME (default ~/.cache/longlink-autobahn), exactly the set pinned in wstest.lock.
# A stamp holds the hash of the lock files, so once installed this is a fast no-op.
#
#   scripts/autobahn/setup.sh           install if needed; prints the venv's python (stdout)
#   scripts/autobahn/setup.sh --check   exit 0 if installed, 1 if not
#
# Needs python3 (to run virtualenv 20.21.1, the last able to create 2.7 envs, pinned in
# virtualenv.lock) and CPython 2.7: PYTHON27, default ~/.pyenv/versions/2.7.18/bin/python2.7.
# Progress goes to stderr. Packages come from PyPI through pip.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
home=${AUTOBAHN_HOME:-$HOME/.cache/longlink-autobahn}
venv=$home/py27
stamp=$venv/.longlink-lock-sha256
hash=$(cat "$here/virtualenv.lock" "$here/wstest.lock" | sha256sum | cut -d' ' -f1)

installed() {
  [ "$(cat "$stamp" 2>/dev/null)" = "$hash" ] &&
    "$venv/bin/python" -c 'import autobahntestsuite.fuzzing, wsaccel' >/dev/null 2>&1
}

case "${1:-}" in
  --check) if installed; then exit 0; else exit 1; fi ;;
  "") ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

if ! installed; then
  py27=${PYTHON27:-$HOME/.pyenv/versions/2.7.18/bin/python2.7}
  if ! "$py27" -c 'import sys, ssl, zlib; sys.exit(sys.version_info[:2] != (2, 7))' 2>/dev/null; then
    echo "autobahn setup: no usable CPython 2.7 at '$py27'; set PYTHON27=/path/to/python2.7" >&2
    exit 1
  fi
  echo "autobahn setup: installing Autobahn|Testsuite into $venv (with $py27)" >&2
  tools=$(mktemp -d)
  trap 'rm -rf "$tools"' EXIT
  python3 -m venv "$tools/venv"
  "$tools/venv/bin/pip" install -q --disable-pip-version-check -r "$here/virtualenv.lock"
  rm -rf "$venv"
  mkdir -p "$home"
  "$tools/venv/bin/python" -m virtualenv -q --no-periodic-update --app-data "$tools/app-data" \
    -p "$py27" "$venv"
  PYTHONWARNINGS=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 \
    "$venv/bin/pip" install -q --no-python-version-warning -r "$here/wstest.lock"
  "$venv/bin/python" -c 'import autobahntestsuite.fuzzing, wsaccel'
  echo "$hash" >"$stamp"
  echo "autobahn setup: done" >&2
fi
echo "$venv/bin/python"
