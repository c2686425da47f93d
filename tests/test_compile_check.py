"""The ahead-of-time compile check (perf/tools/compile_check.py, ``python -m perf.compile_check``):
every configuration the launchers choose compiles for sm_90 and sm_80 without register spills (``ptxas -v``), and the
capture reaches every kernel.

The check runs in a subprocess: triton picks the interpreter at import time, and the
tests run with it on (tests/conftest.py). Compiled configurations are cached by kernel
source hash (``SNNORM_COMPILE_CACHE``, outside the repository), so a second run costs
only the capture. ``SNNORM_COMPILE_CHECK_PYTHONPATH`` prepends a folder holding another
triton (tests/run.sh passes the oldest supported one).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def _env(extra_path: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    paths = [p for p in (extra_path, str(ROOT), env.get("PYTHONPATH")) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def _run_check(tmp_path: Path, extra_path: str | None = None, *args: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "perf.compile_check", "--out", str(tmp_path), *args],
        cwd=ROOT, env=_env(extra_path), capture_output=True, text=True, timeout=1500,
    )
    rows = []
    for f in tmp_path.glob("compile_*.csv"):
        with open(f) as fh:
            rows += list(csv.DictReader(fh))
    return out, rows


def _assert_no_spills(rows: list[dict]) -> None:
    """Issues 9 and 23: no configuration a launcher chooses spills registers to local memory.

    Most spills found once fp64 and the past-2³¹ shape joined the grid were not register
    pressure: ptxas, left to pick its own register target under the launch's thread count,
    saved live values across the slow-path subroutine call of a correctly rounded division or
    square root. fp64 launches (and the backward reduce with a ∂y of another layout) now
    declare their register budget (``maxnreg``, kernels._common.launch_options), which
    replaced doubling the warps of the fp64 MPBN backward and ∂x tiles. Before that: the MPBN
    backward's apply divides before loading its tile, the pipeline's coefficient kernel takes
    rstd before the step's sums, and the norm → LIF backward with a ∂s of another layout than
    x runs on 1 warp (norm_lif.launch_norm_lif_backward)."""
    sys.path.insert(0, str(ROOT))
    from perf.tools import spilling

    def line(r):
        return f"{r['kernel']} {r['target']} num_warps={r['num_warps']} {r['spill_stores']}/{r['spill_loads']} B: {r['config']}"

    spills = [line(r) for r in spilling(rows)]
    assert not spills, "register spills:\n" + "\n".join(spills)


def _launched_kernels() -> set[str]:
    """Every @triton.jit function of snnorm.kernels that no other one calls: the kernels."""
    code = (
        "import importlib, pkgutil, inspect, re, snnorm.kernels as K\n"
        "from triton.runtime.jit import JITFunction\n"
        "fns = {}\n"
        "for m in pkgutil.walk_packages(K.__path__, K.__name__ + '.'):\n"
        "    mod = importlib.import_module(m.name)\n"
        "    for n, f in vars(mod).items():\n"
        "        if isinstance(f, JITFunction) and f.fn.__module__ == mod.__name__:\n"
        "            fns[f'{mod.__name__}:{n}'] = f.src\n"
        "called = {k for k in fns for other, src in fns.items() if other != k\n"
        "          and re.search(r'\\b' + re.escape(k.split(':')[1]) + r'\\s*\\(', src)}\n"
        "print('\\n'.join(sorted(set(fns) - called - {k for k in fns if 'probe' in k})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


@pytest.mark.slow  # the compile grid in a subprocess (its own timeout: 1500 s)
@pytest.mark.timeout(1600)
def test_every_launched_configuration_compiles_for_sm90_and_sm80_without_spills(tmp_path):
    out, rows = _run_check(tmp_path)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert rows, "no configuration was compiled"
    failed = [r for r in rows if r["status"] != "ok"]
    assert not failed, failed[:5]
    assert {r["target"] for r in rows} == {"sm_90", "sm_80"}
    for r in rows:
        assert int(r["registers"]) > 0 and int(r["num_warps"]) >= 1 and int(r["programs"]) >= 1, r
    # the capture reached every kernel (a kernel no launcher launches on the grid is untested)
    assert {r["kernel"] for r in rows} == _launched_kernels()
    _assert_no_spills(rows)
    print("\n" + out.stdout[-3000:])


def test_spilling_reports_spilled_configurations():
    sys.path.insert(0, str(ROOT))
    from perf.tools import spilling, summary

    rows = [
        dict(kernel="m:k", target="sm_90", config="a", status="ok", registers="40", spill_stores="0", spill_loads="0", shared_bytes="0"),
        dict(kernel="m:k", target="sm_80", config="b", status="ok", registers="255", spill_stores="8", spill_loads="4", shared_bytes="0"),
        dict(kernel="m:k", target="sm_80", config="c", status="FAILED", registers="", spill_stores="", spill_loads="", shared_bytes=""),
    ]
    assert [r["config"] for r in spilling(rows)] == ["b"]
    (k,) = summary(rows)
    assert (k["configurations"], k["failures"], k["max_registers"], k["max_spill_stores"], k["spilling"]) == (3, 1, 255, 8, 1)


@pytest.mark.skipif(not os.environ.get("SNNORM_COMPILE_CHECK_PYTHONPATH"), reason="no second triton given (tests/run.sh sets one)")
@pytest.mark.slow
@pytest.mark.timeout(1600)
def test_oldest_supported_triton_compiles_every_configuration_without_spills(tmp_path):
    # every kernel once (LIF, MPBN training on the resident and the pipelined path, TEBN, TAB, the
    # fused norm → LIF over two segments), in fp32 and bf16, and the fp64 and past-2³¹ launches
    # this triton's ptxas spilled before they declared a register budget (the folded MPBN-LIF with
    # 64-bit offsets, the strided backward reduce) — the whole CI grid again would double this
    # check's CI time
    extra = os.environ["SNNORM_COMPILE_CHECK_PYTHONPATH"]
    only = ("lif T4 N32 C64 8x8 float32,mpbn-train T4 N32 C64 8x8,mpbn-train T4 N32 C64 32x32 float32,"
            "mpbn-train T4 N32 C256 8x8 float32,tebn-train T4 N32 C64 8x8,tab-train T4 N32 C64 8x8,"
            "norm-lif-train T32 N8 C16 8x8,layer-norm T4 N8 C256 - float32,layer-norm T4 N8 C16384 - float32,"
            "rms-norm-lif-soft T32 N8 C256 - float32,mpbn-adapt-batch T8 N128 C64 224x224 float64,"
            "bn-train T8 N128 C64 224x224 float16")
    out, rows = _run_check(tmp_path, extra, "--only", only)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    import triton

    (csv_file,) = tmp_path.glob("compile_*.csv")
    assert f"triton{triton.__version__}" not in csv_file.name, f"{csv_file.name}: the second triton was not used"
    assert rows and not [r for r in rows if r["status"] != "ok"]
    assert {r["kernel"] for r in rows} == _launched_kernels()
    _assert_no_spills(rows)
    print("\n" + out.stdout[-3000:])


#: lines as Triton's NVIDIA backend writes them: an fp32 ``/`` (div.full.f32, ≤ 2 ulp), tl.div_rn,
#: tl.sqrt_rn, fp64 ``/``, tl.exp (ex2.approx: allowed), tl.rsqrt, and a comment naming an instruction
PTX_FIXTURE = """
.version 8.7
.target sm_90a
.visible .entry k(.param .u64 k_param_0)
{
	div.full.f32 	%r5, %r3, %r4;
	div.rn.f32 	%r6, %r3, %r4;
	sqrt.rn.f32 	%r7, %r6;
	div.rn.f64 	%fd3, %fd1, %fd2;
	ex2.approx.f32 	%r8, %r7;
	rsqrt.approx.ftz.f32 	%r9, %r8;
	// div.approx.f32 would be caught on a code line
	ret;
}
"""


def test_ptx_scan_catches_approximate_division_in_spike_kernels():
    """The compile check's scan (perf/tools/compile_check.py): approximate division / square
    root in a kernel of SPIKE_MODULES or STATISTICS_KERNELS fails its row; IEEE-rounded forms and
    ex2.approx pass."""
    sys.path.insert(0, str(ROOT))
    from perf.tools import SPIKE_MODULES, STATISTICS_KERNELS, approximate_ops, approximation_problem, format_ops

    found = approximate_ops(PTX_FIXTURE)
    assert found == {"div.full.f32": 1, "rsqrt.approx.ftz.f32": 1}, found
    ops = format_ops(found)
    assert "div.full.f32" in approximation_problem("snnorm.kernels.lif:_lif_fwd_kernel", ops)
    assert approximation_problem("snnorm.kernels.norm_lif:_norm_lif_bwd_kernel", format_ops({"div.approx.f32": 2}))
    # the statistics pipeline's kernels on the path to μ, σ², rstd (partials, reduce, apply) fail too
    pipeline = "snnorm.kernels.bn_pipeline._kernels"
    assert set(STATISTICS_KERNELS) == {f"{pipeline}:{k}" for k in ("stats_partial_kernel", "_stats_reduce_kernel",
                                                                    "_apply_kernel")}
    launched = _launched_kernels()
    for kernel in STATISTICS_KERNELS:
        assert "div.full.f32" in approximation_problem(kernel, ops)
        assert kernel in launched
    # outside them the ops are reported (the approx_ops column), not failed: the pipeline's
    # gradient-only backward kernels
    assert approximation_problem(f"{pipeline}:_bwd_coef_kernel", ops) == ""
    correct = "\n".join(ln for ln in PTX_FIXTURE.splitlines() if "full" not in ln and "rsqrt" not in ln)
    assert approximate_ops(correct) == {}
    assert approximation_problem("snnorm.kernels.mpbn_lif_train:_mpbn_lif_resident_fwd_kernel", format_ops({})) == ""
    # the scanned modules are the ones that hold the LIF / MPBN-LIF / fused norm → LIF kernels
    assert {k.split(":")[0] for k in launched if "lif" in k} == set(SPIKE_MODULES)


_COMPILE_TWO_DIVISIONS = """
import json, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from perf.tools import approximate_ops
from snnorm.kernels import _device as dev

@triton.jit
def plain(x_ptr, y_ptr, DTYPE: tl.constexpr):
    i = tl.arange(0, 128)
    tl.store(y_ptr + i, tl.load(x_ptr + i) / tl.load(x_ptr + 128 + i))

@triton.jit
def rounded(x_ptr, y_ptr, DTYPE: tl.constexpr):
    i = tl.arange(0, 128)
    tl.store(y_ptr + i, dev.div_rn(tl.load(x_ptr + i), tl.load(x_ptr + 128 + i), DTYPE))

out = {}
for fn in (plain, rounded):
    for dt in ("fp32", "fp64"):
        src = ASTSource(fn=fn, signature={"x_ptr": "*" + dt, "y_ptr": "*" + dt, "DTYPE": "constexpr"},
                        constexprs={(2,): getattr(tl, {"fp32": "float32", "fp64": "float64"}[dt])})
        k = triton.compile(src, target=GPUTarget("cuda", 80, 32))
        out[f"{fn.__name__}-{dt}"] = [approximate_ops(k.asm["ptx"]), "div.rn" in k.asm["ptx"]]
print(json.dumps(out))
"""


def test_fp32_division_compiles_to_an_approximation_that_div_rn_avoids(tmp_path):
    """One small kernel compiled for sm_80 (no GPU): an fp32 ``/`` becomes ``div.full.f32``,
    which the scan finds, and ``_device.div_rn`` a correctly rounded ``div.rn`` (fp32 and fp64)."""
    import json

    script = tmp_path / "two_divisions.py"  # @triton.jit needs its source in a file
    script.write_text(_COMPILE_TWO_DIVISIONS)
    out = subprocess.run([sys.executable, "-W", "ignore", str(script)], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["plain-fp32"][0] and set(got["plain-fp32"][0]) <= {"div.full.f32", "div.approx.f32"}, got
    assert got["rounded-fp32"] == [{}, True], got
    assert got["plain-fp64"] == [{}, True] and got["rounded-fp64"] == [{}, True], got
