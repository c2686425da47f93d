"""Entry point: ``python -m perf.traffic`` prints the bytes and launches of every triton op
call and writes perf/results/traffic.csv. The meter is :mod:`perf.tools.traffic_meter`, the
cases and the table :mod:`perf.tools.traffic` (how it counts: their docstrings)."""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from perf.tools.traffic import main  # noqa: E402

if __name__ == "__main__":
    main()
