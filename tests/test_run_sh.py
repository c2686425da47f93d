"""tests/run.sh: pip's resolver complaints about the --no-deps oracles are explained, not shown.

The script's functions are sourced (it returns before installing anything) and fed
pip output as pip prints it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

RUN_SH = Path(__file__).resolve().parent / "run.sh"
HEADER = ("ERROR: pip's dependency resolver does not currently take into account all the packages that are "
          "installed. This behaviour is the source of the following dependency conflicts.")


def _explain(pip_output: str) -> str:
    result = subprocess.run(
        ["bash", "-c", f'source "{RUN_SH}" && explain_oracle_conflicts'],
        input=pip_output, capture_output=True, text=True, check=True, timeout=30,
    )
    return result.stdout


def test_oracle_conflicts_become_one_note():
    out = _explain("\n".join([
        HEADER,
        "spikingjelly 2.0.0 requires torchvision, which is not installed.",
        "snntorch 1.0.0 requires nir, which is not installed.",
    ]) + "\n")
    assert "dependency resolver" not in out and "torchvision" not in out
    assert out.startswith("note:") and "--no-deps on purpose" in out
    assert len(out.strip().splitlines()) == 1


def test_other_conflicts_and_output_stay_visible():
    out = _explain("\n".join([
        "Successfully installed snnorm-0.1.0",
        HEADER,
        "spikingjelly 2.0.0 requires torchvision, which is not installed.",
        "foo 1.0 requires bar<2, but you have bar 3.0 which is incompatible.",
    ]) + "\n")
    assert "Successfully installed snnorm-0.1.0" in out
    assert HEADER in out and "foo 1.0 requires bar<2" in out
    assert "torchvision" not in out and "note:" in out
    assert _explain("Successfully installed x\n") == "Successfully installed x\n"  # untouched
