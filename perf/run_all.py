"""Run every perf sweep, then regenerate perf/RESULTS.md and the plots.

    python -m perf.run_all            # quick grid (CPU: well under 10 minutes on an idle 2-core machine)
    python -m perf.run_all --full     # the full grid (meant for a GPU)
    python -m perf.run_all --smoke    # a tiny grid (what tests/test_perf_smoke.py runs)

Other flags (``--no-compile``, ``--compile-all``, ``--threads``, ``--device``, ``--out``)
are passed to every script. The scripts run in this one process (torch.compile's
start-up is paid once); a script that raises is reported and the others still run.
Results go to ``perf/results/<device-slug>/``.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

import torch

if not torch.cuda.is_available():  # saved_bytes measures the triton provider under the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from perf import bench_mpbn_lif, bench_tab, bench_tebn, bench_train_step, report, saved_bytes  # noqa: E402

SCRIPTS = {
    "mpbn_lif": bench_mpbn_lif.main,
    "tebn": bench_tebn.main,
    "tab": bench_tab.main,
    "train_step": bench_train_step.main,
    "saved_bytes": saved_bytes.main,
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    only = None
    if "--only" in argv:
        i = argv.index("--only")
        only = argv[i + 1].split(",")
        del argv[i : i + 2]
    failed = []
    t_all = time.perf_counter()
    for name, fn in SCRIPTS.items():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            fn(argv)
        except Exception:
            traceback.print_exc()
            failed.append(name)
        print(f"[run_all] {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    if "--smoke" not in argv and "--out" not in " ".join(argv):
        report.main([])
    print(f"[run_all] total {time.perf_counter() - t_all:.0f} s; failed: {failed or 'none'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
