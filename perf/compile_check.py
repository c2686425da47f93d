"""Entry point: ``python -m perf.compile_check [--grid ci|wide|full] [--jobs N] [--only TEXT]``
compiles every Triton kernel configuration the launchers take, for sm_90 and sm_80, without
a GPU. The check itself is :mod:`perf.tools.compile_check` (what it does: its docstring)."""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from perf.tools.compile_check import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
