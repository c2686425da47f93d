"""The demo without its extra, and its output when not on a terminal.

No ``importorskip`` here: a missing extra is simulated by blocking the import
(``sys.modules[name] = None`` makes ``import name`` raise ImportError).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from snnorm import demo

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("blocked", ["sklearn", "tqdm", "matplotlib"])
def test_main_names_the_extra_to_install(blocked, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, blocked, None)
    with pytest.raises(demo.MissingDemoExtra, match=r"pip install 'snnorm\[demo\]'") as info:
        demo.main(["--quick", "--out", str(tmp_path / "x.png")])
    assert demo.DEMO_EXTRA[blocked] in str(info.value)  # the distribution's name (scikit-learn)
    assert not (tmp_path / "x.png").exists()  # stopped before any work
    assert isinstance(info.value, ImportError)


@pytest.mark.slow  # a subprocess
def test_python_m_demo_without_the_extra_prints_the_fix_not_a_traceback():
    code = ("import sys, runpy; sys.modules['sklearn'] = None; "
            "runpy.run_module('snnorm.demo', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code, "--quick"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 1
    assert "pip install 'snnorm[demo]'" in result.stderr and "scikit-learn" in result.stderr
    assert "Traceback" not in result.stderr
