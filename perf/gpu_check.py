"""The one prepared GPU check: ``python -m perf.gpu_check OUTDIR`` (under 8 minutes on an H100/H200).

On a CUDA machine with no network (torch 2.11, triton 3.6, python 3.12; spikingjelly only
if carried as a wheel, see perf/README.md), from the working tree:

1. the triton tests on CUDA (tests/devices.py picks the GPU) with the bounded hypothesis
   profile "gpu-quick", as a pytest subprocess with a 180 s timeout -> ``tests.log`` and
   ``tests.xml`` (junit; at the timeout pytest is interrupted, not killed, so both keep what ran);
2. the probes of what only a GPU confirms (:mod:`perf.gpu_probes`: CUDA-graph capture and replay
   of every op, grids past CUDA's axis limits, a strided fp16 run past 2³¹ elements, a second
   device, synchronised norms on a one-rank nccl group), 90 s -> ``probes.csv``, a row per probe
   as it finishes;
3. the core benchmark points against the torch backend, ``torch.compile`` of it,
   spikingjelly (when importable) and a same-size device copy, through perf/tools/runner.py:
   MPBN-LIF train fwd(+bwd), eval, folded and TEBN train fwd(+bwd), eval (then TAB, against
   the official O(T²) algorithm, in the time left) at
   (T=4, N=64, C=128, 32×32), (T=4, N=128, C=256, 8×8), (T=8, N=32, C=64, 56×56), fp32 and
   bf16 -> ``bench.csv`` (torch.compile at the first fp32 point only: inductor needs 10-60 s per
   shape and mode); points left when the time budget runs out are recorded as skipped;
4. the compile-check summary (perf/compile_check.py, CI grid, all cores, 60 s timeout) ->
   ``compile.log`` and ``compile/compile_ci_triton<version>.csv`` (run before the benchmarks);
5. a short table, printed last -> ``summary.txt``; everything also goes to ``gpu_check.log``.

At most 8 files are written to OUTDIR. ``--dry`` runs the same code on tiny shapes, on the
CPU through the Triton interpreter, with two tests and the probes (what needs CUDA is a
skipped row; tests/test_gpu_check.py runs it in CI).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHAPES = [(4, 64, 128, 32, 32), (4, 128, 256, 8, 8), (8, 32, 64, 56, 56)]
DTYPES = ("fp32", "bf16")
DRY_SHAPES = [(2, 2, 4, 4, 4)]
COMPILE_NOTE = "gpu_check compiles at the first fp32 point only (time budget); perf.bench_* --full compiles every point"
#: every file that launches kernels, the near-threshold draw and the NaN-poison pass included
TEST_FILES = [
    "tests/test_triton_mpbn_lif.py", "tests/test_triton_mpbn_lif_paths.py", "tests/test_triton_tebn.py",
    "tests/test_triton_bn.py", "tests/test_triton_tab.py", "tests/test_triton_row_norm.py", "tests/test_fusion.py",
    "tests/test_layouts.py", "tests/test_near_threshold.py", "tests/test_poison.py", "tests/test_exact_threshold.py",
    "tests/test_gpu_readiness.py",
    "tests/test_backend_agreement.py", "tests/test_sync_pipeline.py", "tests/test_sync_mpbn.py",
    "tests/test_layer_tebn_backends.py", "tests/test_compile.py::test_every_layer_compiles_fullgraph_train_and_eval[triton]",
    "tests/test_autocast.py::test_triton_backend_under_autocast",
]
# two cheap tests that launch kernels (the dry run checks the wiring, not the kernels)
DRY_TESTS = ["tests/test_triton_mpbn_lif.py::test_backward_through_adaptive_fold_raises_not_implemented",
             "tests/test_triton_tebn.py::test_single_value_rejected_and_nothing_changes"]


class Log:
    def __init__(self, path: Path):
        self.f = open(path, "a")
        self.t0 = time.monotonic()

    def __call__(self, msg: str) -> None:
        line = f"[{time.monotonic() - self.t0:6.1f}s] {msg}"
        print(line, flush=True)
        self.f.write(line + "\n")
        self.f.flush()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0


def run_tests(out: Path, log: Log, dry: bool, timeout_s: int) -> str:
    """The triton tests as a pytest subprocess; returns pytest's summary line."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if dry:
        env["SNNORM_TEST_DEVICE"] = "cpu"
        targets = DRY_TESTS
    else:
        env["SNNORM_HYPOTHESIS_PROFILE"] = "gpu-quick"
        targets = TEST_FILES
    targets = [t for t in targets if (ROOT / t.split("::")[0]).exists()]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x" if dry else "-rf",
           f"--junitxml={out / 'tests.xml'}", *targets]
    log(f"tests: {' '.join(cmd[3:])} (timeout {timeout_s}s)")
    with open(out / "tests.log", "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:  # SIGINT: pytest stops, reports and writes the junit XML
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            rc = "timeout"
    lines = (out / "tests.log").read_text().strip().splitlines()
    summary = next((ln for ln in reversed(lines) if " passed" in ln or " failed" in ln or " error" in ln), "no summary")
    log(f"tests: rc={rc}: {summary.strip('= ')}")
    return f"rc={rc}: {summary.strip('= ')}"


def run_benchmarks(out: Path, log: Log, dry: bool, deadline_s: float) -> list[dict]:
    import torch

    from perf import bench_mpbn_lif, bench_tab, bench_tebn
    from perf import tools

    env = tools.environment("cpu" if dry else None)
    rec = tools.Recorder(env, verbose=False)
    budget = tools.TimingBudget(seconds=0.02, min_reps=2, max_reps=3, warmup=1, warmup_ms=5, rep_ms=10) if dry else tools.TimingBudget()
    args = argparse.Namespace(no_compile=dry)  # dry: inductor on a CPU takes minutes
    session = tools.Session(args, env, "gpu_check", rec, budget)
    shapes = DRY_SHAPES if dry else SHAPES
    dtypes = ("fp32",) if dry else DTYPES
    # the core points first (MPBN-LIF, TEBN), then TAB, so TAB never takes their time
    groups = ((("mpbn_lif", bench_mpbn_lif), ("tebn", bench_tebn)), (("tab", bench_tab),))
    points = [(dt, shape, b) for group in groups for dt in dtypes for shape in shapes for b in group]
    for dt, shape, (name, bench) in points:
        label = f"{name} {tools.shape_str(shape)} {dt}"
        if log.elapsed() > deadline_s:
            rec.add(name, "-", "-", tools.shape_str(shape), dt, "skipped", None, "gpu_check time budget spent")
            log(f"bench: {label}: skipped (time budget)")
            continue
        t = time.monotonic()
        # inductor takes 10-60 s per shape and mode: torch.compile at the first fp32 point only
        compile_point = not dry and dt == "fp32" and shape == shapes[0] and bench is not bench_tab
        # TAB: no spikingjelly; the official O(T²) algorithm instead
        providers_for = bench_tab.providers if bench is bench_tab else tools.providers_for
        providers = providers_for(env, args, compile_point=compile_point, compile_note=COMPILE_NOTE)
        try:
            bench.run_point(session, shape, tools.DTYPES[dt], providers)
        except Exception as err:  # a failing point is a row, and the rest still runs
            rec.add(name, "-", "-", tools.shape_str(shape), dt, "error", None, f"{type(err).__name__}: {err}"[:300])
        if env.is_cuda:
            torch.cuda.empty_cache()
        log(f"bench: {label}: {time.monotonic() - t:.1f}s")
    rec.write_csv(out / "bench.csv")
    return rec.rows


def run_compile_check(out: Path, log: Log, timeout_s: int) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-W", "ignore", "-m", "perf.compile_check", "--jobs", str(os.cpu_count() or 2),
           "--out", str(out / "compile")]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        text = proc.stdout + proc.stderr[-2000:]
    except subprocess.TimeoutExpired:
        text = "compile check: timeout"
    (out / "compile.log").write_text(text)
    last = text.strip().splitlines()[-1] if text.strip() else "no output"
    log(f"compile check: {last}")
    return last


def table(rows: list[dict]) -> str:
    """ms (median) per provider and the triton kernel's share of a same-size copy's bandwidth."""
    from perf import bench_tab
    from perf import tools

    cells: dict = {}
    copy: dict = {}
    for r in rows:
        key = (r["kernel"], r["mode"], r["shape"], r["dtype"])
        if r["metric"] == "ms_median" and r["value"] not in ("", None):
            cells.setdefault(key, {})[r["provider"]] = float(r["value"])
        elif r["metric"] == "frac_of_copy" and r["provider"] == tools.SNNORM_TRITON and r["value"] not in ("", None):
            copy[key] = float(r["value"])
        elif r["metric"] == "error":
            cells.setdefault(key, {})[r["provider"] + "!"] = r["note"]
    provs = [tools.SNNORM_TRITON, tools.SNNORM_TORCH, tools.SNNORM_COMPILE, tools.SPIKINGJELLY, bench_tab.QUADRATIC]
    head = f"{'kernel':9} {'mode':13} {'shape':16} {'dt':5} " + " ".join(f"{p[-12:]:>12}" for p in provs) + "  copy-frac"
    lines = [head, "-" * len(head)]
    for key in sorted(cells):
        vals = cells[key]
        ms = " ".join(f"{vals[p]:12.3f}" if p in vals else f"{'err' if p + '!' in vals else '-':>12}" for p in provs)
        frac = f"{copy[key]:9.2f}" if key in copy else f"{'-':>9}"
        lines.append(f"{key[0]:9} {key[1]:13} {key[2]:16} {key[3]:5} {ms}  {frac}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("outdir")
    p.add_argument("--dry", action="store_true", help="tiny shapes on CPU through the interpreter, two tests (CI)")
    p.add_argument("--budget-s", type=float, default=450.0, help="total wall-clock budget (default 7.5 min)")
    p.add_argument("--tests-timeout-s", type=int, default=180)
    p.add_argument("--skip", default="", help="comma list of parts to leave out: tests,probes,bench,compile")
    args = p.parse_args(argv)
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "gpu_check.log")
    if args.dry:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (benchmarks import it)
    import torch

    skip = set(filter(None, args.skip.split(",")))
    log(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.cuda.is_available()}"
        + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""))
    if not args.dry and not torch.cuda.is_available():
        log("no CUDA device: run with --dry on a CPU machine")
        return 2
    tests = run_tests(out, log, args.dry, 120 if args.dry else args.tests_timeout_s) if "tests" not in skip else "skipped"
    probes_line, probes_failed = "skipped", 0
    if "probes" not in skip:
        from perf import gpu_probes

        probes = gpu_probes.run(out, log, args.dry, deadline_s=log.elapsed() + 90)
        probes_failed = probes.failures
        probes_line = f"{len(probes.rows)} probes, {probes_failed} failed"
    compile_line = "skipped"
    if not args.dry and "compile" not in skip:
        compile_line = run_compile_check(out, log, timeout_s=60)
    rows = run_benchmarks(out, log, args.dry, deadline_s=args.budget_s - 20) if "bench" not in skip else []
    text = table(rows) + f"\n\ntests: {tests}\nprobes: {probes_line}\ncompile check: {compile_line}\nwall: {log.elapsed():.0f}s\n"
    (out / "summary.txt").write_text(text)
    log("done; summary follows")
    print(text)
    tests_ok = tests.startswith("rc=0") or tests == "skipped"
    return 0 if tests_ok and probes_failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
