#!/usr/bin/env bash
# The first command on a fresh machine: make the virtual environment, install kotacerdas,
# install the system packages and Kafka it needs, then start everything with `kota up`.
#
#   ./bootstrap.sh                 install and start (arguments go to `kota up`)
#   ./bootstrap.sh --install-only  install, start nothing (what .ci/run uses)
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
need_apt=()
if ! command -v "$PYTHON" >/dev/null || ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  need_apt+=(python3)
fi
if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
  need_apt+=(python3-venv)
fi
if ((${#need_apt[@]})); then
  if [ "$(id -u)" != 0 ]; then
    echo "bootstrap: Python >= 3.11 with venv is needed: sudo apt-get install -y ${need_apt[*]}" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
  PYTHON=python3
fi

if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv"
  "$PYTHON" -m venv .venv
fi
# Reinstall only when the project's dependencies (or the extras installed) changed.
# dev: the tests' tools; bench: the benchmarks' baselines (River).
extras=dev,bench
stamp=.venv/.kotacerdas-installed
want=$( (cat pyproject.toml; echo "$extras") | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "bootstrap: installing kotacerdas and its dependencies into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[$extras]"
  echo "$want" > "$stamp"
fi

.venv/bin/kota install
if [ "${1:-}" = "--install-only" ]; then
  exit 0
fi
exec .venv/bin/kota up "$@"
