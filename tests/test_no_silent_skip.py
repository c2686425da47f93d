"""Under ``CI=true`` a missing oracle or kernel dependency, or the Triton interpreter switched
off without a GPU, stops the run with a message (tests/conftest.py's session check) instead
of letting whole test files skip.

Each case runs a pytest session in a subprocess (``--collect-only`` of this file: the check
fires at session start, before collection) with ``CI=true`` and one thing taken away: a
shim package first on PYTHONPATH makes ``import snntorch`` raise, or TRITON_INTERPRET=0.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ci_problems

ROOT = Path(__file__).resolve().parent.parent
USAGE_ERROR = int(pytest.ExitCode.USAGE_ERROR)
# three subprocess sessions, each importing torch, triton and the oracles: ~20 s
pytestmark = pytest.mark.slow
MESSAGE = "CI=true and the test environment is incomplete"


def session(tmp_path, *, ci: bool, block: str | None = None, **env_extra):
    """A collect-only pytest session of this file in a subprocess; ``block`` names a top-level
    module whose import fails there."""
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    if ci:
        env["CI"] = "true"
    path = [str(ROOT)]
    if block:
        shim = tmp_path / "shim" / block
        shim.mkdir(parents=True)
        (shim / "__init__.py").write_text(f"raise ImportError('{block} blocked by test_no_silent_skip')\n")
        path.insert(0, str(shim.parent))
    env["PYTHONPATH"] = os.pathsep.join(path + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
                           "-m", "slow or not slow", str(Path(__file__).relative_to(ROOT))],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def test_a_missing_oracle_fails_the_ci_run(tmp_path):
    result = session(tmp_path, ci=True, block="snntorch")
    out = result.stdout + result.stderr
    assert result.returncode == USAGE_ERROR, out
    assert MESSAGE in out and "cannot import snntorch" in out and "blocked by test_no_silent_skip" in out, out
    if not ci_problems():  # a complete environment otherwise: only what is missing is named
        assert "cannot import spikingjelly" not in out and "cannot import triton" not in out, out


def test_the_interpreter_switched_off_without_a_gpu_fails_the_ci_run(tmp_path):
    result = session(tmp_path, ci=True, SNNORM_TEST_DEVICE="cpu", TRITON_INTERPRET="0")
    out = result.stdout + result.stderr
    assert result.returncode == USAGE_ERROR, out
    assert MESSAGE in out and "TRITON_INTERPRET='0'" in out, out


def test_outside_ci_the_same_gap_only_skips(tmp_path):
    """A developer's machine without an oracle still runs: the files that need it skip."""
    result = session(tmp_path, ci=False, block="snntorch")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert MESSAGE not in out, out
