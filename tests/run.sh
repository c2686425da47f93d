#!/usr/bin/env bash
# Set up a fresh machine (idempotent) and run the test suite: bash tests/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
pip_install() { python3 -m pip install -q --disable-pip-version-check "$@"; }
# torch first, and only if missing: an unpinned torch requirement would pull a multi-GB CUDA build,
# and a machine that already has a (CUDA) torch keeps it.
python3 -c "import torch" 2>/dev/null || pip_install torch==2.13.0
pip_install -e ".[test,triton,demo,perf]"
# the numerical oracles; --no-deps because their declared dependencies pull a CUDA torch
pip_install --no-deps spikingjelly==2.0.0 snntorch==1.0.0
pip_install loguru tqdm packaging scipy
# the oldest triton snnorm supports (pyproject: triton>=3.6), in its own folder beside the main one:
# tests/test_compile_check.py compiles every kernel configuration with it too
OLD_TRITON_DIR="${SNNORM_OLD_TRITON_DIR:-$HOME/.cache/snnorm/triton-3.6.0}"
[ -d "$OLD_TRITON_DIR/triton" ] || pip_install --no-deps --target "$OLD_TRITON_DIR" triton==3.6.0
export SNNORM_COMPILE_CHECK_PYTHONPATH="$OLD_TRITON_DIR"
python3 -m pytest -q "$@"
