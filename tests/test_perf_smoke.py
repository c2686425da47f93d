"""Smoke tests of the perf sweeps: each script's main on a tiny grid, in-process.

They check that rows come out in the long format, that every provider that ran agreed
with the reference (snnorm-torch) before being timed, that the shared runner (perf.tools.runner) turns a failing
or disagreeing provider into an error row instead of timing it, and that the report
renders. No timing is asserted (CI machines are shared and slow).
"""

from __future__ import annotations

import math

import pytest
import torch

from perf import bench_mpbn_lif, bench_tebn, bench_train_step, report, saved_bytes, tools

SMOKE = ["--smoke", "--no-compile", "--quiet", "--threads", "0"]


def _check_rows(rows, kernels, modes):
    assert rows, "no rows produced"
    for row in rows:
        assert tuple(row) == tools.COLUMNS
    errors = [r for r in rows if r["metric"] == "error"]
    assert not errors, errors
    agree = [r for r in rows if r["metric"] == "agree"]
    assert agree and all(r["value"] == 1.0 for r in agree), [r["note"] for r in agree if r["value"] != 1.0]
    for kernel in kernels:
        for mode in modes:
            timed = {r["provider"] for r in rows if r["kernel"] == kernel and r["mode"] == mode and r["metric"] == "ms_median"}
            assert {tools.SNNORM_TORCH, tools.SPIKINGJELLY} <= timed, (kernel, mode, timed)
            for r in rows:
                if r["kernel"] == kernel and r["mode"] == mode and r["metric"] == "ms_median":
                    assert r["value"] > 0 and math.isfinite(r["value"])
    # the spikingjelly agreement is checked on the tensors that matter, not just the output
    assert any(r["provider"] == tools.SPIKINGJELLY for r in agree)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("perf") / "cpu-smoke"


@pytest.mark.slow  # the benchmark CLIs end to end (~5-8 s each): the slow set
def test_mpbn_lif_smoke(out_dir):
    rows = bench_mpbn_lif.main(SMOKE + ["--out", str(out_dir)])
    _check_rows(rows, ["mpbn_lif"], bench_mpbn_lif.MODES)
    notes = [r["note"] for r in rows if r["metric"] == "agree" and r["mode"] == "train_fwdbwd"]
    assert all("grad_x" in n and "running_var" in n for n in notes)
    gbps = [r for r in rows if r["metric"] == "gbps"]
    assert gbps and all(r["value"] > 0 for r in gbps)
    assert (out_dir / "mpbn_lif.csv").exists()


@pytest.mark.slow
def test_tebn_smoke(out_dir):
    rows = bench_tebn.main(SMOKE + ["--out", str(out_dir)])
    _check_rows(rows, ["tebn", "bntt"], bench_tebn.MODES)
    notes = [r["note"] for r in rows if r["metric"] == "agree" and r["kernel"] == "tebn" and r["mode"] == "train_fwdbwd"]
    assert notes and all("grad_scale" in n for n in notes)


def test_train_step_smoke(out_dir):
    rows = bench_train_step.main(SMOKE + ["--out", str(out_dir)])
    _check_rows(rows, ["train_step"], ["train_step"])


def test_saved_bytes_smoke(out_dir):
    rows = saved_bytes.main(SMOKE + ["--out", str(out_dir)])
    assert all(tuple(r) == tools.COLUMNS for r in rows)
    new = {(r["kernel"], r["provider"]): r["value"] for r in rows if r["metric"] == "saved_new_bytes"}
    inp = {r["kernel"]: r["value"] for r in rows if r["metric"] == "input_bytes"}
    for kernel in ("mpbn_lif", "tebn"):
        # the reference MPBN-LIF keeps several [T, N, C, H, W] tensors for backward
        assert new[(kernel, tools.SNNORM_TORCH)] > 0
        assert new[(kernel, tools.SPIKINGJELLY)] > 0
    assert new[("mpbn_lif", tools.SNNORM_TORCH)] >= inp["mpbn_lif"]


def test_report_renders(out_dir):
    # depends on the CSVs written above; regenerate the markdown from them
    results = out_dir.parent
    md = report.main(["--results", str(results), "--out", str(results / "RESULTS.md")])
    text = md.read_text()
    assert "MPBN-LIF" in text and "TEBN" in text and "not measured" in text
    assert list(out_dir.glob("*.png"))


class _Fixed(tools.Runner):
    def __init__(self, value, calls):
        self.value, self.calls = value, calls

    def check(self):
        return {"spikes": torch.tensor([0.0, 1.0, 1.0, 0.0]), "y": torch.full((4,), self.value)}

    def step(self):
        self.calls.append(1)


def test_runner_error_rows_and_no_timing_for_disagreeing_provider():
    env = tools.environment("cpu")
    rec = tools.Recorder(env, verbose=False)
    calls_ref, calls_bad = [], []

    def boom():
        raise RuntimeError("compile exploded")

    timings = tools.bench_case(
        rec, kernel="k", mode="m", shape="1x1x1x1x1", dtype=torch.float32,
        builders={
            tools.SNNORM_TORCH: lambda: _Fixed(1.0, calls_ref),
            tools.SPIKINGJELLY: lambda: _Fixed(1.5, calls_bad),  # disagrees
            tools.SNNORM_COMPILE: boom,  # fails to build
            tools.SNNORM_TRITON: "no CUDA",
        },
        reference=tools.SNNORM_TORCH,
        budget=tools.TimingBudget(seconds=0.0, min_reps=2, max_reps=2, warmup=1),
    )
    assert set(timings) == {tools.SNNORM_TORCH}
    assert calls_ref and not calls_bad
    by = {(r["provider"], r["metric"]): r for r in rec.rows}
    assert by[(tools.SPIKINGJELLY, "agree")]["value"] == 0.0
    assert "disagrees" in by[(tools.SPIKINGJELLY, "error")]["note"]
    assert "compile exploded" in by[(tools.SNNORM_COMPILE, "error")]["note"]
    assert by[(tools.SNNORM_TRITON, "skipped")]["note"] == "no CUDA"


def test_compare_counts_flipped_spikes():
    tol = tools.TOLERANCES[torch.float32]
    ref = {"spikes": torch.zeros(1000)}
    few = torch.zeros(1000)
    few[0] = 1.0  # 1e-3 flipped: within 2e-3
    many = torch.zeros(1000)
    many[:10] = 1.0
    assert tools.compare(ref, {"spikes": few}, tol)[0]
    assert not tools.compare(ref, {"spikes": many}, tol)[0]


def test_match_selects_points_and_names_the_csv(tmp_path):
    rows = bench_tebn.main(SMOKE + ["--out", str(tmp_path), "--match", "1x2x4x4x4"])
    shapes = {r["shape"] for r in rows if r["metric"] == "ms_median"}
    assert shapes == {"1x2x4x4x4"}
    assert (tmp_path / "tebn.1x2x4x4x4.csv").exists() and not (tmp_path / "tebn.csv").exists()


@pytest.mark.slow  # two processes (gloo), the triton backend interpreted
def test_sync_volume_counts_one_collective_per_layer_pass(tmp_path):
    from perf import sync_volume

    rows = sync_volume.main(["--smoke", "--out", str(tmp_path)])
    assert (tmp_path / "sync_volume.smoke.csv").exists()
    value = {(r["provider"], r["kernel"], r["metric"]): r["value"] for r in rows}
    T, _, C = sync_volume.SHAPES["smoke"][0][:3]
    providers = {r["provider"] for r in rows}
    for provider in providers:
        for layer in sync_volume.LAYERS:
            gathers = value[(provider, layer, "all_gathers")]
            # one gather per forward (MPBN-LIF: one per step), of T + 2·T·C float64 values in all
            assert gathers == (T if layer == "mpbn_lif" else 1)
            assert value[(provider, layer, "all_gather_bytes")] == 8 * (T + 2 * T * C)
            # and one reduction of the gradient sums per backward (MPBN-LIF: per step)
            assert value[(provider, layer, "backward_reduces")] == gathers
