"""perf/gpu_check.py's dry mode: the prepared GPU check runs end to end on the CPU (tiny
shapes, the Triton interpreter, two tests), so it cannot rot between GPU sessions."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a subprocess that runs pytest and the benchmarks (its own timeout: 600 s)
@pytest.mark.timeout(700)
def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "perf.gpu_check", str(tmp_path), "--dry"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert 0 < len(files) <= 8, files
    assert "2 passed" in (tmp_path / "tests.log").read_text()
    with open(tmp_path / "bench.csv") as fh:
        rows = list(csv.DictReader(fh))
    timed = {(r["kernel"], r["provider"]) for r in rows if r["metric"] == "ms_median" and r["value"]}
    assert {("mpbn_lif", "snnorm-torch"), ("tebn", "snnorm-torch")} <= timed, timed
    # the short table comes last, after the log lines
    tail = out.stdout.strip().splitlines()
    assert any(line.startswith("kernel") for line in tail[-30:]) and tail[-1].startswith("wall:")


@pytest.mark.slow
def test_gpu_probes_dry_run_every_probe(tmp_path):
    """The probes run on the CPU at tiny shapes: each either passes or says it needs CUDA."""
    from perf import gpu_probes

    probes = gpu_probes.run(tmp_path, log=lambda line: None, dry=True, deadline_s=600)
    with open(tmp_path / "probes.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert rows == probes.rows and probes.failures == 0, [r for r in rows if r["status"] == "FAIL"]
    assert {r["probe"] for r in rows} == {"graph", "grid", "index64", "device", "nccl"}
    skipped = {r["probe"] for r in rows if r["status"] == "skipped"}
    assert skipped == {"graph", "device"}, rows  # what needs CUDA, and nothing else
