"""Regenerate perf/RESULTS.md and the PNG plots from perf/results/<device>/*.csv.

Run: ``python -m perf.report [--results perf/results] [--out perf/RESULTS.md]``.
Nothing here measures anything: every number comes from the CSV files.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from perf import tools  # noqa: E402
from perf import compare, sync_volume, transformer  # noqa: E402
from perf.bench_tab import QUADRATIC  # noqa: E402
from perf.tools import traffic  # noqa: E402

KERNEL_TITLES = {
    "mpbn_lif": "MPBN-LIF",
    "tebn": "TEBN",
    "bntt": "BNTT (reference row: a different op, snnorm vs spikingjelly)",
    "train_step": "Training step (conv SNN, TEBN + MPBN-LIF)",
    "tab": "TAB (against the official code's O(T²) algorithm, perf/tools/tab_baseline.py)",
}
PROVIDERS = (tools.SNNORM_TORCH, tools.SNNORM_COMPILE, tools.SNNORM_TRITON, tools.SPIKINGJELLY)
TIMED_PROVIDERS = PROVIDERS + (QUADRATIC,)  # the kernel tables' columns, when present
SNNORM_FAST = (tools.SNNORM_TORCH, tools.SNNORM_TRITON)
LINESTYLES = {tools.SNNORM_TORCH: "-", tools.SNNORM_COMPILE: "--", tools.SNNORM_TRITON: "-.", tools.SPIKINGJELLY: ":"}


def _dims(shape: str) -> list[int]:
    return [int(s) for s in shape.split("x")] if shape and shape != "-" else []


def _numel(shape: str) -> int:
    return math.prod(_dims(shape)) if _dims(shape) else 0


def _fmt(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.{digits}g}"


def _gmean(vals):
    vals = [v for v in vals if v and v > 0 and not math.isnan(v)]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else math.nan


class Table:
    """Index rows by (kernel, mode, shape, dtype) → provider → metric → (value, note)."""

    def __init__(self, rows):
        self.rows = rows
        self.idx = defaultdict(lambda: defaultdict(dict))
        for r in rows:
            if r["mode"] == "-":  # load-average rows
                continue
            self.idx[(r["kernel"], r["mode"], r["shape"], r["dtype"])][r["provider"]][r["metric"]] = (r["value"], r["note"])

    def get(self, key, provider, metric):
        v = self.idx.get(key, {}).get(provider, {}).get(metric)
        return v[0] if v else None

    def keys(self, kernel):
        ks = [k for k in self.idx if k[0] == kernel]
        return sorted(ks, key=lambda k: (k[1], k[3], _dims(k[2])[0] if _dims(k[2]) else 0, _numel(k[2])))


def load(results_dir: Path) -> dict[str, list[dict]]:
    """device slug → rows of every CSV in perf/results/<slug>/."""
    out = {}
    for d in sorted(p for p in results_dir.iterdir() if p.is_dir() and p.name != "compile"):  # compile/: not a device
        rows = []
        for f in sorted(d.glob("*.csv")):
            for r in tools.read_csv(f):
                r["source"] = f.stem.split(".")[0]  # <kernel>.<match>.csv from split runs
                rows.append(r)
        if rows:
            out[d.name] = rows
    return out


# -- plots ----------------------------------------------------------------------------------


def plots(slug: str, table: Table, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for kernel in ("mpbn_lif", "tebn", "bntt", "train_step"):
        keys = table.keys(kernel)
        if not keys:
            continue
        Ts = [(_dims(k[2]) or [0])[0] for k in keys]
        T_main = max(set(Ts), key=Ts.count)
        # speedup over spikingjelly vs size (at the most common T), and vs T (at one size)
        for xaxis in ("size", "T"):
            fig, ax = plt.subplots(figsize=(6.4, 4.0))
            any_line = False
            series = defaultdict(list)
            for k in keys:
                dims = _dims(k[2])
                if not dims:
                    continue
                for prov in (tools.SNNORM_TORCH, tools.SNNORM_TRITON, tools.SNNORM_COMPILE):
                    s = table.get(k, prov, "speedup_vs_spikingjelly")
                    if s is None or math.isnan(s):
                        continue
                    if xaxis == "size" and dims[0] == T_main:
                        series[(prov, k[1], k[3])].append((_numel(k[2]), s))
                    elif xaxis == "T":
                        series[(prov, k[1], k[3], "x".join(map(str, dims[1:])))].append((dims[0], s))
            for label, pts in sorted(series.items()):
                if xaxis == "T" and len(pts) < 2:
                    continue
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=" ".join(label[:3]),
                        ls=LINESTYLES.get(label[0], "-"))
                any_line = True
            if not any_line:
                plt.close(fig)
                continue
            ax.axhline(1.0, color="gray", lw=0.8, ls="--")
            ax.set_xscale("log", base=2 if xaxis == "T" else 10)
            ax.set_yscale("log")
            ax.set_xlabel("elements T·N·C·H·W" + (f" (T={T_main})" if xaxis == "size" else "") if xaxis == "size" else "T")
            ax.set_ylabel("speedup over spikingjelly (×)")
            ax.set_title(f"{kernel}: speedup vs {xaxis} ({slug})", fontsize=9)
            ax.legend(fontsize=6)
            ax.grid(alpha=0.3)
            name = f"{kernel}_speedup_vs_{xaxis}.png"
            fig.tight_layout()
            fig.savefig(out_dir / name, dpi=80)
            plt.close(fig)
            made.append(name)
        # achieved GB/s vs size
        series = defaultdict(list)
        for k in keys:
            dims = _dims(k[2])
            if not dims or dims[0] != T_main:
                continue
            for prov in PROVIDERS:
                g = table.get(k, prov, "gbps")
                if g is not None and not math.isnan(g):
                    series[(prov, k[1], k[3])].append((_numel(k[2]), g))
        if series:
            fig, ax = plt.subplots(figsize=(6.4, 4.0))
            for label, pts in sorted(series.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=" ".join(label),
                        ls=LINESTYLES.get(label[0], "-"))
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(f"elements T·N·C·H·W (T={T_main})")
            ax.set_ylabel("GB/s (minimal byte model)")
            ax.set_title(f"{kernel}: achieved bandwidth ({slug})", fontsize=9)
            ax.legend(fontsize=5, ncol=2)
            ax.grid(alpha=0.3)
            name = f"{kernel}_gbps_vs_size.png"
            fig.tight_layout()
            fig.savefig(out_dir / name, dpi=80)
            plt.close(fig)
            made.append(name)
    return made


# -- markdown ---------------------------------------------------------------------------------


def kernel_section(table: Table, kernel: str) -> list[str]:
    keys = table.keys(kernel)
    if not keys:
        return []
    lines = [f"### {KERNEL_TITLES.get(kernel, kernel)}", ""]
    present = [p for p in TIMED_PROVIDERS if any(table.get(k, p, "ms_median") is not None for k in keys)]
    by_mode = defaultdict(list)
    for k in keys:
        by_mode[k[1]].append(k)
    for mode, ks in by_mode.items():
        head = ["shape [T,N,C,H,W]", "dtype"] + [f"{p} ms (IQR)" for p in present]
        speed_cols = [(p, "speedup_vs_spikingjelly", f"{p.replace('snnorm-', '')} vs sj")
                      for p in present if p != tools.SPIKINGJELLY and tools.SPIKINGJELLY in present]
        speed_cols += [(p, "speedup_vs_compile", f"{p.replace('snnorm-', '')} vs compile")
                       for p in SNNORM_FAST if p in present and tools.SNNORM_COMPILE in present]
        speed_cols += [(p, "speedup_vs_quadratic", f"{p.replace('snnorm-', '')} vs O(T²)")
                       for p in present if p.startswith("snnorm-") and QUADRATIC in present]
        head += [c[2] for c in speed_cols]
        has_gbps = any(table.get(k, p, "gbps") is not None for k in ks for p in present)
        if has_gbps:
            head += ["best snnorm GB/s"]
        has_frac = any(table.get(k, p, "frac_of_copy") is not None for k in ks for p in present)
        if has_frac:
            head += ["best snnorm / copy"]
        lines += [f"**{mode}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for k in ks:
            cells = [k[2], k[3]]
            for p in present:
                m, iqr = table.get(k, p, "ms_median"), table.get(k, p, "ms_iqr")
                if m is None:
                    err = table.idx[k].get(p, {})
                    cells.append("error" if "error" in err else "skip" if "skipped" in err else "–")
                else:
                    cells.append(f"{_fmt(m)} ({_fmt(iqr, 2)})")
            for p, metric, _ in speed_cols:
                s = table.get(k, p, metric)
                cells.append(f"{_fmt(s)}×" if s is not None else "–")
            if has_gbps:
                g = [table.get(k, p, "gbps") for p in SNNORM_FAST]
                g = [v for v in g if v is not None]
                cells.append(_fmt(max(g)) if g else "–")
            if has_frac:
                f = [table.get(k, p, "frac_of_copy") for p in SNNORM_FAST]
                f = [v for v in f if v is not None]
                cells.append(_fmt(max(f), 2) if f else "–")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def saved_section(table: Table) -> list[str]:
    keys = [k for k in table.idx if table.get(k, tools.SNNORM_TORCH, "saved_new_per_elem") is not None]
    if not keys:
        return []
    keys.sort(key=lambda k: (k[0], k[3], _numel(k[2])))
    head = ["kernel", "shape", "dtype"] + [f"{p} B/elem" for p in PROVIDERS]
    lines = [
        "### Bytes saved for backward (training forward)",
        "",
        "New bytes (storages other than the input and the parameters) kept for backward, per "
        "element-step; input bytes per element: 4 (fp32) or 2 (bf16).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for k in keys:
        cells = [k[0], k[2], k[3]]
        for p in PROVIDERS:
            v = table.get(k, p, "saved_new_per_elem")
            if v is None:
                err = table.idx[k].get(p, {})
                cells.append("error" if "error" in err else "skip" if "skipped" in err else "–")
            else:
                cells.append(_fmt(v))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def goals_section(table: Table, is_cuda: bool) -> list[str]:
    lines = ["### Goals", "", "| goal | status |", "|---|---|"]
    # CPU goal: the torch backend no slower than spikingjelly at the same shapes
    for kernel in ("mpbn_lif", "tebn", "train_step"):
        sp = [(k, table.get(k, tools.SNNORM_TORCH, "speedup_vs_spikingjelly")) for k in table.keys(kernel)]
        sp = [(k, s) for k, s in sp if s is not None]
        if not sp:
            continue
        slower = [(k, s) for k, s in sp if s < 0.95]
        worst = min(sp, key=lambda t: t[1])
        status = (
            f"geomean {_fmt(_gmean([s for _, s in sp]))}× over {len(sp)} points; "
            f"{len(slower)} point(s) >5% slower; worst {_fmt(worst[1])}× ({worst[0][1]} {worst[0][2]} {worst[0][3]})"
        )
        lines.append(f"| {kernel}: snnorm-torch no slower than spikingjelly | {status} |")
    gpu_goals = [
        ("mpbn_lif", "train_fwdbwd", "speedup_vs_spikingjelly", 5.0, "MPBN-LIF train fwd+bwd ≥ 5× spikingjelly"),
        ("mpbn_lif", "train_fwdbwd", "speedup_vs_compile", 1.5, "MPBN-LIF train fwd+bwd ≥ 1.5× torch.compile"),
        ("mpbn_lif", "train_fwdbwd", "frac_of_copy", 0.7, "MPBN-LIF train fwd+bwd at ≥ 70% of copy bandwidth"),
        ("tebn", "train_fwdbwd", "speedup_vs_spikingjelly", 1.5, "TEBN fwd+bwd ≥ 1.5× spikingjelly"),
        ("mpbn_lif", "eval_fwd", "frac_of_copy", 0.8, "MPBN-LIF eval at ≥ 80% of copy bandwidth"),
        ("mpbn_lif", "folded_fwd", "frac_of_copy", 0.8, "MPBN-LIF folded at ≥ 80% of copy bandwidth"),
    ]
    for kernel, mode, metric, target, text in gpu_goals:
        vals = [(k, table.get(k, tools.SNNORM_TRITON, metric)) for k in table.keys(kernel) if k[1] == mode]
        vals = [(k, v) for k, v in vals if v is not None]
        if not is_cuda:
            status = "not measured: no GPU for this device's run (CPU results)"
        elif not vals:
            status = "not measured: no snnorm-triton timing (see errors)"
        else:
            met = [v for _, v in vals if v >= target]
            largest = max(vals, key=lambda t: _numel(t[0][2]))
            status = (f"{len(met)}/{len(vals)} points meet it; at the largest shape {largest[0][2]} "
                      f"{largest[0][3]}: {_fmt(largest[1])}")
        lines.append(f"| {text} (GPU) | {status} |")
    lines.append("")
    return lines


def notes_section(rows) -> list[str]:
    errs = defaultdict(list)
    skips = defaultdict(int)
    for r in rows:
        if r["metric"] == "error":
            errs[(r["kernel"], r["provider"], r["note"])].append(f"{r['mode']} {r['shape']} {r['dtype']}")
        elif r["metric"] == "skipped":
            skips[(r["provider"], r["note"])] += 1
    lines = []
    if errs:
        lines += ["### Errors (providers that failed or disagreed; not timed)", ""]
        for (kernel, prov, note), where in sorted(errs.items()):
            lines.append(f"- {kernel} / {prov} at {len(where)} point(s) ({', '.join(where[:4])}"
                         f"{', …' if len(where) > 4 else ''}): {note}")
        lines.append("")
    if skips:
        lines += ["### Skipped", ""]
        for (prov, note), n in sorted(skips.items()):
            lines.append(f"- {prov} ({n} rows): {note}")
        lines.append("")
    return lines


def device_section(slug: str, rows, results_dir: Path, rel_root: Path) -> list[str]:
    table = Table([r for r in rows if r.get("source") != "saved_bytes"])
    saved = Table([r for r in rows if r.get("source") == "saved_bytes"])
    first = rows[0]
    is_cuda = not slug.startswith("cpu-")
    loads = [r["value"] for r in rows if r["metric"] == "loadavg_1min" and not math.isnan(r["value"])]
    threads = sorted({r["note"].split(";")[-1].strip() for r in rows if r["metric"] == "loadavg_1min"})
    shas = sorted({r["git_sha"] for r in rows})
    lines = [
        f"## {first['device']} (`{slug}`)",
        "",
        f"torch {first['torch']}, triton {first['triton']}, git {', '.join(shas)}."
        + (f" CPU load average during the runs: {min(loads):.1f}–{max(loads):.1f} "
           f"(other processes shared the cores; {', '.join(threads)})." if loads else ""),
        "Times are medians over interleaved samples (IQR in brackets); speedups are ratios of medians.",
        "",
    ]
    lines += goals_section(table, is_cuda)
    for kernel in ("mpbn_lif", "tebn", "bntt", "train_step", "tab"):
        lines += kernel_section(table, kernel)
    lines += saved_section(saved)
    made = plots(slug, table, results_dir / slug)
    if made:
        lines += ["### Plots", ""]
        for name in made:
            lines.append(f"![{name}]({(rel_root / slug / name).as_posix()})")
        lines.append("")
    lines += notes_section(rows)
    return lines


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(tools.RESULTS_DIR))
    p.add_argument("--out", default=str(tools.PERF_DIR / "RESULTS.md"))
    args = p.parse_args(argv)
    results_dir, out = Path(args.results), Path(args.out)
    data = load(results_dir)
    rel_root = Path(_relpath(results_dir, out.parent))
    lines = [
        "# snnorm performance results",
        "",
        "Generated by `python -m perf.report` from `perf/results/<device>/*.csv` (do not edit by hand; "
        "how to run and read these: [perf/README.md](README.md)).",
        "",
    ]
    if not any(not s.startswith("cpu-") for s in data):
        lines += ["No GPU results yet: every GPU goal is *not measured* (no GPU in the sessions that ran "
                  "these sweeps). Run `python -m perf.run_all --full` on a CUDA machine and commit its folder.", ""]
    for slug, rows in data.items():
        lines += device_section(slug, rows, results_dir, rel_root)
    lines += traffic.section(results_dir)  # device-independent: counted under the interpreter
    lines += compare.section(results_dir)
    lines += transformer.section(results_dir)
    lines += sync_volume.section(results_dir)
    lines += compile_section(results_dir / "compile")
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out} ({len(data)} device(s))")
    return out


def compile_section(folder: Path) -> list[str]:
    """The ahead-of-time compile check's summary (perf/compile_check.py), one table per CSV."""
    from perf.tools import compile_check

    files = sorted(folder.glob("compile_*.csv")) if folder.is_dir() else []
    if not files:
        return []
    lines = ["## Ahead-of-time compile check (sm_90, sm_80; no GPU)", "",
             "Every launch configuration the launchers choose on the grid, captured from the public ops on meta "
             "tensors and compiled with `ptxas -v` (`python -m perf.compile_check [--grid ci|wide|full]`; tables in "
             f"`{folder.name}/`). Spill columns are bytes per thread.", ""]
    for f in files:
        with open(f, newline="") as fh:
            rows = list(csv.DictReader(fh))
        grid, version = f.stem.split("_", 2)[1:]
        lines.append(compile_check.summary_markdown(rows, f"**{grid} grid, {version.replace('triton', 'triton ')}**",
                                                    version=version.replace("triton", "")))
    return lines


def _relpath(target: Path, start: Path) -> str:
    import os

    return os.path.relpath(target.resolve(), start.resolve())


if __name__ == "__main__":
    main()
