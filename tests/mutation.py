"""Mutation check of the kernel tests, run by hand (not collected by pytest, not in CI):

    python tests/mutation.py mutation.csv [--only NAME ...] [--skip-baseline] [--list]

Each mutation is one realistic one-line bug in a kernel file (a wrong factor, a dropped term,
an off-by-one count, a swapped momentum, a biased variance, ``>=`` turned into ``>``). The
repository (without .git) is copied to a temporary folder once; for each mutation the site
is checked to occur exactly once in the copy's file, the bug is written there, the relevant
kernel tests run in the copy (``python -m pytest -x``, so the copy's snnorm is imported),
and the file is restored. The working tree is never touched.

A mutation is *caught* when pytest reports failing tests (exit status 1), *missed* when
every selected test passes (0). Anything else is an *error* of the check itself: the site
not found (the kernel line changed: update the mutation here), pytest's collection or usage
errors, a timeout. The script prints a table, writes it as CSV, and exits 1 unless every
mutation is caught. First, unless --skip-baseline, every selection runs on the unmutated
copy and must pass: a selection that already fails would "catch" everything.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# the test selections (pytest arguments, -x added); each quick enough for the interpreter
NEURON = ["tests/test_triton_mpbn_lif.py", "tests/test_triton_mpbn_lif_paths.py", "tests/test_exact_threshold.py",
          "-k", "matches_torch or match_torch or exact"]
PIPELINE = ["tests/test_triton_bn.py", "tests/test_triton_tebn.py", "tests/test_triton_tab.py",
            "-k", "matches or fixed or tiling or many_partials or uniform_momentum"]
FUSED = ["tests/test_fusion.py", "tests/test_exact_threshold.py", "-k", "matches_the_unfused or exact"]
EXACT = ["tests/test_exact_threshold.py"]
ROWS = ["tests/test_triton_row_norm.py", "tests/test_fusion_token_norms.py", "tests/test_exact_threshold.py",
        "-k", "matches or fp64 or row_norm_lif_fires"]


@dataclass(frozen=True)
class Mutation:
    name: str
    kind: str  # what sort of bug
    path: str  # the kernel file, relative to the repository root
    site: str  # exact text, must occur exactly once in the file
    bug: str  # what replaces it
    tests: tuple[str, ...]


MUTATIONS = [
    Mutation("charge_drops_v_reset", "dropped term", "snnorm/kernels/_device.py",
             "h = v + div_rn(x - (v - v_r), tau, v.dtype)", "h = v + div_rn(x - v, tau, v.dtype)", tuple(NEURON)),
    Mutation("charge_grad_factor", "wrong factor", "snnorm/kernels/_device.py",
             "return dh_dx, 1.0 - inv_tau", "return dh_dx, 1.0 - 0.5 * inv_tau", tuple(NEURON)),
    Mutation("soft_reset_drops_threshold", "dropped term", "snnorm/kernels/_device.py",
             "v = tl.where(spike, u - th, u)", "v = tl.where(spike, u, u)", tuple(NEURON)),
    Mutation("hard_reset_grad_sign", "wrong sign", "snnorm/kernels/_device.py",
             "gs = gv * (v_r - u)", "gs = gv * (u - v_r)", tuple(NEURON)),
    Mutation("sigmoid_surrogate_drops_alpha", "dropped factor", "snnorm/kernels/_device.py",
             "g = (1.0 - sg) * sg * alpha", "g = (1.0 - sg) * sg", tuple(NEURON)),
    Mutation("atan_surrogate_factor", "wrong factor", "snnorm/kernels/_device.py",
             "w = 1.5707963267948966 * alpha * z", "w = 3.141592653589793 * alpha * z", tuple(NEURON)),
    Mutation("mpbn_unbiased_batch_variance", "unbiased where biased", "snnorm/kernels/_device.py",
             "rstd = rstd_of(div_rn(m2, M, ACC_DTYPE), eps, ACC_DTYPE)",
             "rstd = rstd_of(div_rn(m2, M - 1, ACC_DTYPE), eps, ACC_DTYPE)", tuple(NEURON)),
    Mutation("mpbn_running_var_biased", "biased variance", "snnorm/kernels/_device.py",
             "rv = (1.0 - f) * rv + f * div_rn(m2, M - one, rm.dtype)", "rv = (1.0 - f) * rv + f * div_rn(m2, M, rm.dtype)",
             tuple(NEURON)),
    Mutation("mpbn_running_mean_swapped_momentum", "swapped momentum", "snnorm/kernels/_device.py",
             "rm = (1.0 - f) * rm + f * mean", "rm = f * rm + (1.0 - f) * mean", tuple(NEURON)),
    Mutation("mpbn_cumulative_average_off_by_one", "off-by-one count", "snnorm/kernels/_device.py",
             "f = div_rn(one, (batches_tracked + t) + one, rm.dtype)",
             "f = div_rn(one, (batches_tracked + t) + 2.0 * one, rm.dtype)", tuple(NEURON)),
    Mutation("mpbn_train_fires_strictly_above", ">= turned into >", "snnorm/kernels/_device.py",
             "    spike = z >= 0\n    xhat = tl.where(mask, xhat, 0.0)", "    spike = z > 0\n    xhat = tl.where(mask, xhat, 0.0)",
             tuple(EXACT)),
    Mutation("lif_forward_fires_strictly_above", ">= turned into >", "snnorm/kernels/lif.py",
             "        spike = z >= 0\n        v = dev.reset(", "        spike = z > 0\n        v = dev.reset(", tuple(EXACT)),
    Mutation("lif_backward_recompute_strictly_above", ">= turned into >", "snnorm/kernels/lif.py",
             "spike = z >= 0  # bit-identical", "spike = z > 0  # bit-identical", tuple(EXACT)),
    Mutation("mpbn_resident_forward_fires_strictly_above", ">= turned into >", "snnorm/kernels/mpbn_lif_train.py",
             "        spike = z >= 0\n        v = dev.reset(u, spike, th, v_r, SOFT_RESET)\n        tl.store(s_ptr + ti * step"
             " + o_off, spike.to(s_ptr.dtype.element_ty), mask=mask)\n        if SAVE:",
             "        spike = z > 0\n        v = dev.reset(u, spike, th, v_r, SOFT_RESET)\n        tl.store(s_ptr + ti * step"
             " + o_off, spike.to(s_ptr.dtype.element_ty), mask=mask)\n        if SAVE:", tuple(EXACT)),
    Mutation("mpbn_pipelined_forward_fires_strictly_above", ">= turned into >", "snnorm/kernels/mpbn_lif_train.py",
             "        spike = z >= 0\n        v = dev.reset(u, spike, th, v_r, SOFT_RESET)\n        tl.store(s_ptr + ti * step"
             " + o_off, spike.to(s_ptr.dtype.element_ty), mask=mask)\n        if pid == 0:",
             "        spike = z > 0\n        v = dev.reset(u, spike, th, v_r, SOFT_RESET)\n        tl.store(s_ptr + ti * step"
             " + o_off, spike.to(s_ptr.dtype.element_ty), mask=mask)\n        if pid == 0:", tuple(EXACT) + ("-m", "")),
    Mutation("mpbn_resident_backward_drops_mean_term", "dropped term", "snnorm/kernels/mpbn_lif_train.py",
             "gh = gamma * rstd * (g_hat - dev.div_rn(a_sum, M, ACC_DTYPE) - xhat * dev.div_rn(b_sum, M, ACC_DTYPE)) + g_direct",
             "gh = gamma * rstd * (g_hat - xhat * dev.div_rn(b_sum, M, ACC_DTYPE)) + g_direct", tuple(NEURON)),
    Mutation("lif_backward_gamma_sum_drops_mean", "dropped term", "snnorm/kernels/lif.py",
             "acc_r += g_hat * (h - mu)", "acc_r += g_hat * h", tuple(NEURON)),
    Mutation("norm_lif_fires_strictly_above", ">= turned into >", "snnorm/kernels/norm_lif.py",
             "spike = h - threshold >= 0", "spike = h - threshold > 0", tuple(EXACT)),
    Mutation("norm_lif_recompute_strictly_above", ">= turned into >", "snnorm/kernels/norm_lif.py",
             "v = dev.reset(h, h - threshold >= 0, threshold", "v = dev.reset(h, h - threshold > 0, threshold", tuple(EXACT)),
    Mutation("norm_lif_bptt_strictly_above", ">= turned into >", "snnorm/kernels/norm_lif.py",
             "dev.reset_bwd(gv, z >= 0, h, threshold", "dev.reset_bwd(gv, z > 0, h, threshold", tuple(EXACT)),
    Mutation("norm_lif_grad_drops_input_scale", "dropped factor", "snnorm/kernels/norm_lif.py",
             "gy = tl.where(mask, gh * x_scale, 0.0)", "gy = tl.where(mask, gh, 0.0)", tuple(FUSED)),
    Mutation("bn_running_var_biased", "biased variance", "snnorm/kernels/bn_pipeline/_kernels.py",
             "r_var = r_var * (1.0 - m) + div_rn(m2, count - 1.0, ACC_DTYPE) * m",
             "r_var = r_var * (1.0 - m) + div_rn(m2, count, ACC_DTYPE) * m",
             tuple(PIPELINE)),
    Mutation("bn_running_mean_swapped_momentum", "swapped momentum", "snnorm/kernels/bn_pipeline/_kernels.py",
             "r_mean = r_mean * (1.0 - m) + mean * m", "r_mean = r_mean * m + mean * (1.0 - m)", tuple(PIPELINE)),
    Mutation("bn_grad_var_drops_rstd", "dropped factor", "snnorm/kernels/bn_pipeline/_kernels.py",
             "grad_var = -0.5 * k * rstd * rstd * sum_b", "grad_var = -0.5 * k * rstd * sum_b", tuple(PIPELINE)),
    Mutation("bntt_coef_v_factor", "wrong factor", "snnorm/kernels/bn_pipeline/_kernels.py",
             "tl.store(coef_v_ptr + row, 2.0 * grad_var / m_step, mask=c_mask)",
             "tl.store(coef_v_ptr + row, grad_var / m_step, mask=c_mask)", tuple(PIPELINE)),
    Mutation("tab_prefix_count_off_by_one", "off-by-one count", "snnorm/kernels/bn_pipeline/_kernels.py",
             "n_t = (t + 1).to(ACC_DTYPE) * m_step", "n_t = (t + 2).to(ACC_DTYPE) * m_step", tuple(PIPELINE)),
    Mutation("tab_scale_grad_factor", "wrong factor", "snnorm/kernels/_device.py",
             "ds = 2.0 * p_t", "ds = p_t", tuple(PIPELINE)),
    Mutation("rstd_drops_eps", "dropped term", "snnorm/kernels/_device.py",
             "sqrt_rn(var + eps, ACC_DTYPE), ACC_DTYPE)", "sqrt_rn(var, ACC_DTYPE), ACC_DTYPE)", tuple(PIPELINE)),
    Mutation("chan_chunk_drops_spread", "dropped term", "snnorm/kernels/_device.py",
             "m2_b = tl.sum(m2_p, axis=0) + tl.sum(n_p * d * d, axis=0)", "m2_b = tl.sum(m2_p, axis=0)", tuple(PIPELINE)),
    Mutation("tile_count_off_by_one", "off-by-one count", "snnorm/kernels/bn_pipeline/_kernels.py",
             "count_b = (tl.minimum(n_hi - n0, BLOCK_N) * tl.minimum(s_hi - s0, BLOCK_S)).to(ACC_DTYPE)",
             "count_b = (tl.minimum(n_hi - n0, BLOCK_N) * tl.minimum(s_hi - s0 + 1, BLOCK_S)).to(ACC_DTYPE)",
             tuple(PIPELINE)),
    # the row norms (LayerNorm / RMSNorm) alone and fused with a LIF
    Mutation("row_norm_rms_drops_eps", "dropped term", "snnorm/kernels/row_norm.py",
             "        rstd = dev.rstd_of(ms, eps, ACC_DTYPE)", "        rstd = dev.rstd_of(ms, 0.0 * eps, ACC_DTYPE)",
             tuple(ROWS)),
    Mutation("row_norm_grad_drops_mean_term", "dropped term", "snnorm/kernels/row_norm.py",
             "dx = (g - c1[:, None] - x_hat * c2[:, None]) * rstd[:, None]", "dx = (g - x_hat * c2[:, None]) * rstd[:, None]",
             tuple(ROWS)),
    Mutation("row_norm_variance_over_d_minus_one", "unbiased where biased", "snnorm/kernels/row_norm.py",
             "rstd = dev.rstd_of(row_mean(tl.sum(xc * xc, axis=1), D, ACC_DTYPE), eps, ACC_DTYPE)",
             "rstd = dev.rstd_of(row_mean(tl.sum(xc * xc, axis=1), D - 1, ACC_DTYPE), eps, ACC_DTYPE)", tuple(ROWS)),
    Mutation("row_norm_lif_fires_strictly_above", ">= turned into >", "snnorm/kernels/row_norm_lif.py",
             "spike = h - threshold >= 0", "spike = h - threshold > 0", tuple(ROWS)),
    Mutation("row_norm_lif_recompute_strictly_above", ">= turned into >", "snnorm/kernels/row_norm_lif.py",
             "v = dev.reset(h, h - threshold >= 0, threshold", "v = dev.reset(h, h - threshold > 0, threshold",
             tuple(ROWS)),
    Mutation("row_norm_lif_grad_drops_input_scale", "dropped factor", "snnorm/kernels/row_norm_lif.py",
             "gy = tl.where(mask, gh * x_scale, 0.0)", "gy = tl.where(mask, gh, 0.0)", tuple(ROWS)),
]


def copy_repo(dest: Path) -> Path:
    """The working tree (no .git, no caches) copied under ``dest``."""
    target = dest / "repo"
    shutil.copytree(ROOT, target, ignore=shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", "*.pyc",
                                                                ".hypothesis"))
    return target


def pytest_env(repo: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a same-size mutant within the same second must not hit a stale .pyc
    env.pop("CI", None)
    env["SNNORM_HYPOTHESIS_PROFILE"] = "mutation"  # tests/conftest.py: no shrinking of a failing example
    env["PYTHONPATH"] = os.pathsep.join([str(repo)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return env


def check_import(repo: Path) -> None:
    out = subprocess.run([sys.executable, "-c", "import snnorm; print(snnorm.__file__)"], cwd=repo, env=pytest_env(repo),
                         capture_output=True, text=True, check=True).stdout.strip()
    if not Path(out).resolve().is_relative_to(repo.resolve()):
        raise SystemExit(f"the copy imports snnorm from {out}, not from {repo}: the mutants would not be tested")


def run_pytest(repo: Path, tests: tuple[str, ...], timeout: float) -> tuple[int | None, str, float]:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header", "-rf", *tests]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=repo, env=pytest_env(repo), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, "timeout", time.monotonic() - start
    lines = [ln for ln in (proc.stdout + proc.stderr).strip().splitlines() if ln.strip()]
    failed = next((ln.split(" - ")[0] for ln in lines if ln.startswith("FAILED ")), "")
    summary = lines[-1] if lines else ""
    return proc.returncode, (failed.removeprefix("FAILED ") or summary), time.monotonic() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="?", help="where to write the table as CSV")
    parser.add_argument("--only", nargs="*", help="run only these mutations (names)")
    parser.add_argument("--skip-baseline", action="store_true", help="do not run the selections unmutated first")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per pytest run")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:45s} {m.kind:22s} {m.path}")
        return 0
    if not args.csv:
        parser.error("give the CSV path")
    if args.only and len(chosen) != len(args.only):
        parser.error(f"unknown mutation(s): {sorted(set(args.only) - {m.name for m in MUTATIONS})}")

    rows = []
    with tempfile.TemporaryDirectory(prefix="snnorm-mutation-") as tmp:
        repo = copy_repo(Path(tmp))
        check_import(repo)
        if not args.skip_baseline:
            for tests in dict.fromkeys(m.tests for m in chosen):
                rc, detail, secs = run_pytest(repo, tests, args.timeout)
                print(f"baseline {' '.join(tests)}: exit {rc} ({secs:.0f} s) {detail}", flush=True)
                if rc != 0:
                    print("the unmutated selection does not pass: fix that first", file=sys.stderr)
                    return 2
        for m in chosen:
            path = repo / m.path
            original = path.read_text()
            hits = original.count(m.site)
            if hits != 1:
                result, detail, secs = "site not found" if hits == 0 else f"site found {hits} times", repr(m.site), 0.0
            else:
                path.write_text(original.replace(m.site, m.bug))
                try:
                    rc, detail, secs = run_pytest(repo, m.tests, args.timeout)
                finally:
                    path.write_text(original)
                result = {1: "caught", 0: "MISSED"}.get(rc, f"error (exit {rc})")
            rows.append(dict(mutation=m.name, kind=m.kind, file=m.path, result=result, seconds=f"{secs:.0f}",
                             detail=detail))
            print(f"{m.name:45s} {result:15s} {secs:6.0f} s  {detail}", flush=True)

    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    caught = sum(r["result"] == "caught" for r in rows)
    print(f"\n{'mutation':45s} {'kind':22s} {'result':15s} seconds")
    for r in rows:
        print(f"{r['mutation']:45s} {r['kind']:22s} {r['result']:15s} {r['seconds']}")
    print(f"\n{caught} of {len(rows)} caught; table in {args.csv}")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
