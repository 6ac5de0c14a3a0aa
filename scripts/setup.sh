#!/usr/bin/env bash
# Create .venv with CPU torch 2.13.0 and streamgen (runtime dependencies only: pyproject's
# [project.dependencies], prometheus_client among them).
#   bash scripts/setup.sh          what `streamgen serve` / `generate` need (the built-in models)
#   bash scripts/setup.sh --test   + the test extra (diffusers, transformers: reference numerics) and
#                                  Debian's chromium for the browser tests; a failed install is an error
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-run}
case "$MODE" in run|--test) ;; *) echo "usage: bash scripts/setup.sh [--test]" >&2; exit 2 ;; esac
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# Pin the CPU wheel first: letting pip choose torch freely downloads GBs of CUDA builds.
.venv/bin/python -m pip install -q torch==2.13.0
if [ "$MODE" = run ]; then
  .venv/bin/python -m pip install -q -e .
  exit 0
fi
.venv/bin/python -m pip install -q -e '.[test]'
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "setup: chromium is not installed and this is not root: install it (apt-get install chromium); the browser tests need it" >&2
    exit 1
  fi
fi
# the browser tests skip only where no chromium binary exists: one that is there must also start
if ! chromium --headless --no-sandbox --version >/dev/null 2>&1; then
  echo "setup: chromium is installed but does not start (chromium --version failed); the browser tests need it" >&2
  exit 1
fi
