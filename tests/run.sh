#!/usr/bin/env bash
# Set up a fresh machine (idempotent) and run the test suite: bash tests/run.sh [pytest args]
set -euo pipefail

# spikingjelly and snntorch are the tests' numerical oracles, installed with --no-deps:
# their declared dependencies (torchvision, a CUDA torch, ...) would replace the torch here,
# and the tests need none of them. pip's resolver then reports, on every later install,
#   ERROR: pip's dependency resolver does not currently take into account ...
#   spikingjelly 2.0.0 requires torchvision, which is not installed.
# Those lines are expected; explain_oracle_conflicts replaces them with one note and
# passes every other line (a real conflict stays visible).
ORACLE_CONFLICT='^(spikingjelly|snntorch) [^ ]+ requires '
RESOLVER_HEADER="^ERROR: pip's dependency resolver does not currently take into account"

explain_oracle_conflicts() {  # stdin: pip's output
    local out
    out=$(cat)
    if grep -Eq "$ORACLE_CONFLICT" <<<"$out"; then
        echo "note: pip lists dependencies of spikingjelly/snntorch as missing; they are installed" \
             "with --no-deps on purpose (test oracles only; see tests/run.sh)"
        out=$(grep -Ev "$ORACLE_CONFLICT" <<<"$out" || true)
        # the resolver's header only introduces conflict lines: keep it if another one remains
        if ! grep -Eq " requires |incompatible" <<<"$out"; then
            out=$(grep -Ev "$RESOLVER_HEADER" <<<"$out" || true)
        fi
    fi
    if [[ -n "$out" ]]; then printf '%s\n' "$out"; fi
}

pip_install() {
    local status=0 out
    out=$(python3 -m pip install -q --disable-pip-version-check "$@" 2>&1) || status=$?
    explain_oracle_conflicts <<<"$out"
    return "$status"
}

# sourced (e.g. by tests/test_run_sh.py): define the functions only
[[ "${BASH_SOURCE[0]}" == "$0" ]] || return 0

cd "$(dirname "$0")/.."
# torch first, and only if missing: an unpinned torch requirement would pull a multi-GB CUDA build,
# and a machine that already has a (CUDA) torch keeps it.
python3 -c "import torch" 2>/dev/null || pip_install torch==2.13.0
pip_install -e ".[test,triton,demo,perf]"
# the oracles' own runtime imports, then the oracles themselves without their dependencies
pip_install loguru tqdm packaging scipy h5py  # h5py: spikingjelly's model zoo (tests/test_porting.py)
pip_install --no-deps spikingjelly==2.0.0 snntorch==1.0.0
# the oldest triton snnorm supports (pyproject: triton>=3.6), in its own folder beside the main one:
# tests/test_compile_check.py compiles every kernel configuration with it too
OLD_TRITON_DIR="${SNNORM_OLD_TRITON_DIR:-$HOME/.cache/snnorm/triton-3.6.0}"
[ -d "$OLD_TRITON_DIR/triton" ] || pip_install --no-deps --target "$OLD_TRITON_DIR" triton==3.6.0
export SNNORM_COMPILE_CHECK_PYTHONPATH="$OLD_TRITON_DIR"
# -n: one pytest worker per core (pytest-xdist; SNNORM_TEST_WORKERS overrides, 0 runs in this
# process), the interpreter is single-threaded Python. --durations=15: the 15 slowest tests, to
# keep the default run under 5 minutes on 2 cores
python3 -m pytest -q -n "${SNNORM_TEST_WORKERS:-2}" --durations=15 "$@"
