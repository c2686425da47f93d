"""The shared benchmark harness: environment, timing, agreement checks, result rows.

Every bench script builds, per grid point, one *runner* per provider (a small object
with ``check()`` and ``step()``), hands them to :func:`bench_case`, and gets long-format
rows back. :func:`bench_case`

1. runs ``check()`` of every provider on the same inputs from the same state and compares
   the tensors with the reference provider's (spikes by mismatch fraction, real-valued
   tensors by the fraction of elements outside ``atol + rtol·|ref|``); a provider that
   disagrees, or fails to build / compile, gets an ``error`` row and is not timed;
2. times the providers that agreed: ``triton.testing.do_bench`` on CUDA
   (quantiles 0.5/0.25/0.75/0.2/0.8, ``grad_to_none``), and on CPU a perf_counter loop
   that interleaves the providers sample by sample (a shared, noisy CPU then biases no
   provider), after warm-up calls;
3. derives GB/s from the script's byte model, the speedups over spikingjelly and over
   torch.compile, and on CUDA the fraction of a same-size ``torch`` copy's bandwidth and
   the peak memory of one call.

Rows: :data:`COLUMNS`. ``shape`` is ``TxNxCxHxW`` for kernels (``[T, N, C, H, W]``);
times are in milliseconds; ``note`` carries error messages and skip reasons.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import math
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence

import torch

COLUMNS = (
    "kernel", "provider", "mode", "shape", "dtype", "metric", "value",
    "device", "torch", "triton", "git_sha", "note",
)

# Provider names (one spelling everywhere: the report keys on them).
SNNORM_TORCH = "snnorm-torch"
SNNORM_COMPILE = "snnorm-torch-compile"
SNNORM_TRITON = "snnorm-triton"
SPIKINGJELLY = "spikingjelly"
TORCH_COPY = "torch-copy"

PERF_DIR = Path(__file__).resolve().parent
RESULTS_DIR = PERF_DIR / "results"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


# -- environment ------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_sha() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=PERF_DIR, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "snnorm"], cwd=PERF_DIR.parent, capture_output=True, text=True
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@dataclasses.dataclass(frozen=True)
class Env:
    """Where the numbers come from; every row carries it."""

    device: torch.device
    device_name: str  # human-readable, goes in every row
    slug: str  # results folder name: perf/results/<slug>/
    torch_version: str
    triton_version: str
    git_sha: str

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def environment(device: str | None = None) -> Env:
    """The device to benchmark on: CUDA when available (or ``device``), else the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        slug = _slug(name)
    else:
        name = f"{_cpu_model()} ({os.cpu_count()} cores)"
        slug = "cpu-" + _slug(_cpu_model()) + f"-{os.cpu_count()}c"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return Env(dev, name, slug, torch.__version__, triton_version, _git_sha())


# -- rows -------------------------------------------------------------------------------


class Recorder:
    """Collects long-format rows (dicts keyed by :data:`COLUMNS`)."""

    def __init__(self, env: Env, verbose: bool = True):
        self.env = env
        self.rows: list[dict] = []
        self.verbose = verbose

    def add(self, kernel, provider, mode, shape, dtype, metric, value, note: str = "") -> None:
        row = dict(
            kernel=kernel, provider=provider, mode=mode, shape=shape, dtype=dtype, metric=metric,
            value=float(value) if value is not None else math.nan,
            device=self.env.device_name, torch=self.env.torch_version, triton=self.env.triton_version,
            git_sha=self.env.git_sha, note=note,
        )
        self.rows.append(row)

    def log(self, msg: str) -> None:
        if self.verbose:
            print(msg, flush=True)

    def write_csv(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            for row in self.rows:
                out = dict(row)
                v = out["value"]
                out["value"] = "" if isinstance(v, float) and math.isnan(v) else f"{v:.6g}"
                w.writerow(out)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["value"] = float(row["value"]) if row["value"] not in ("", None) else math.nan
    return rows


def results_path(env: Env, name: str, out_dir: Path | None = None) -> Path:
    base = Path(out_dir) if out_dir is not None else RESULTS_DIR / env.slug
    return base / f"{name}.csv"


def shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


# -- agreement --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tol:
    """How close a provider must be to the reference.

    ``spike_frac``: largest share of differing spikes (Heaviside outputs flip where the
    membrane sits within rounding of the threshold, and a flip then changes that neuron's
    later steps). ``rtol``/``atol_rel``: an element of a real-valued tensor is *bad* when
    ``|got − ref| > atol + atol_rel·max|ref| + rtol·|ref|``; ``bad_frac`` is the largest
    share of bad elements (a flipped spike moves its own gradient entries by O(1)).
    ``atol`` is a floor for tensors that are zero up to rounding (the gradient of a
    TEBN bias feeding an MPBN neuron: the membrane BN removes any constant shift).
    """

    spike_frac: float
    rtol: float
    atol_rel: float
    bad_frac: float
    atol: float


# One table: eager providers compute the same math in the same dtype; compiled and fused
# providers reorder reductions (fp32) or keep fp32 intermediates where eager rounds each
# op to bf16, so bf16 gets a looser bound. A semantic error (wrong reset, stats, carry)
# flips a large share of spikes and fails both.
TOLERANCES = {
    torch.float32: Tol(spike_frac=2e-3, rtol=1e-3, atol_rel=1e-4, bad_frac=5e-3, atol=1e-6),
    torch.bfloat16: Tol(spike_frac=8e-2, rtol=5e-2, atol_rel=2e-2, bad_frac=1.5e-1, atol=1e-3),
    torch.float16: Tol(spike_frac=5e-2, rtol=1e-2, atol_rel=5e-3, bad_frac=1e-1, atol=1e-4),
}


def compare(ref: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], tol: Tol) -> tuple[bool, str, float]:
    """Compare a provider's check tensors with the reference's.

    Keys starting with ``spikes`` are compared by mismatch share, the rest elementwise.
    Returns (agree, summary, worst max-abs error over the real-valued tensors).
    """
    ok, parts, worst = True, [], 0.0
    for key, r in ref.items():
        if key not in got:
            return False, f"{key}: missing", math.inf
        g = got[key]
        if g is None or r is None:
            if (g is None) != (r is None):
                return False, f"{key}: one side is None", math.inf
            continue
        if g.shape != r.shape:
            return False, f"{key}: shape {tuple(g.shape)} vs reference {tuple(r.shape)}", math.inf
        r64, g64 = r.detach().double().cpu(), g.detach().double().cpu()
        if not torch.isfinite(g64).all():
            ok = False
            parts.append(f"{key}: non-finite values")
            continue
        if key.startswith("spikes"):
            frac = (r64 != g64).double().mean().item() if r64.numel() else 0.0
            if frac > tol.spike_frac:
                ok = False
            parts.append(f"{key}: {frac:.2e} flipped")
        else:
            err = (g64 - r64).abs()
            scale = r64.abs().max().item() if r64.numel() else 0.0
            bad = (err > tol.atol + tol.atol_rel * scale + tol.rtol * r64.abs()).double().mean().item() if r64.numel() else 0.0
            max_err = err.max().item() if r64.numel() else 0.0
            worst = max(worst, max_err)
            if bad > tol.bad_frac:
                ok = False
            parts.append(f"{key}: max|d|={max_err:.2e} bad={bad:.1e}")
    return ok, "; ".join(parts), worst


# -- timing -----------------------------------------------------------------------------


def _sync(env: Env) -> None:
    if env.is_cuda:
        torch.cuda.synchronize(env.device)


@dataclasses.dataclass
class Timing:
    median_ms: float
    iqr_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


def _quantile(sorted_vals: Sequence[float], q: float) -> float:
    # linear interpolation between closest ranks (numpy's default)
    pos = q * (len(sorted_vals) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def _summarise(samples_ms: Sequence[float]) -> Timing:
    s = sorted(samples_ms)
    return Timing(
        median_ms=statistics.median(s), iqr_ms=_quantile(s, 0.75) - _quantile(s, 0.25),
        p20_ms=_quantile(s, 0.2), p80_ms=_quantile(s, 0.8), reps=len(s),
    )


@dataclasses.dataclass(frozen=True)
class TimingBudget:
    """CPU timing: per provider at least ``min_reps`` samples, more up to ``max_reps``
    while the samples fit in ``seconds``; ``warmup`` untimed calls first. On CUDA,
    do_bench's own ``warmup_ms``/``rep_ms``."""

    seconds: float = 0.5
    min_reps: int = 5
    max_reps: int = 100
    warmup: int = 2
    warmup_ms: int = 25
    rep_ms: int = 100


def time_providers(
    env: Env, steps: Mapping[str, Callable[[], object]], grad_to_none: Mapping[str, list], budget: TimingBudget
) -> dict[str, Timing]:
    """Time each provider's ``step``; CPU samples are interleaved across providers."""
    if env.is_cuda:
        from triton.testing import do_bench

        out = {}
        for name, fn in steps.items():
            q50, q25, q75, q20, q80 = do_bench(
                fn, warmup=budget.warmup_ms, rep=budget.rep_ms, grad_to_none=grad_to_none.get(name) or None,
                quantiles=[0.5, 0.25, 0.75, 0.2, 0.8],
            )
            out[name] = Timing(q50, q75 - q25, q20, q80, -1)
        return out

    def clear(name):
        for t in grad_to_none.get(name) or ():
            t.grad = None

    estimate = {}
    for name, fn in steps.items():
        for _ in range(budget.warmup):
            clear(name)
            t0 = time.perf_counter()
            fn()
            estimate[name] = time.perf_counter() - t0
    reps = {
        name: int(min(budget.max_reps, max(budget.min_reps, budget.seconds / max(est, 1e-9))))
        for name, est in estimate.items()
    }
    samples: dict[str, list[float]] = {name: [] for name in steps}
    gc.collect()
    for i in range(max(reps.values(), default=0)):
        for name, fn in steps.items():
            if i >= reps[name]:
                continue
            clear(name)
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: _summarise(s) for name, s in samples.items()}


def copy_bandwidth_gbps(env: Env, numel: int, dtype: torch.dtype, budget: TimingBudget) -> float:
    """GB/s of ``dst.copy_(src)`` for ``numel`` elements (reads + writes counted)."""
    src = torch.randn(numel, device=env.device).to(dtype)
    dst = torch.empty_like(src)
    t = time_providers(env, {TORCH_COPY: lambda: dst.copy_(src)}, {}, budget)[TORCH_COPY]
    return 2 * numel * src.element_size() / (t.median_ms * 1e-3) / 1e9


def peak_memory_bytes(env: Env, fn: Callable[[], object]) -> float | None:
    """Peak CUDA memory allocated by one call of ``fn`` above what was allocated before."""
    if not env.is_cuda:
        return None
    _sync(env)
    gc.collect()
    torch.cuda.reset_peak_memory_stats(env.device)
    base = torch.cuda.memory_allocated(env.device)
    fn()
    _sync(env)
    return float(torch.cuda.max_memory_allocated(env.device) - base)


# -- saved-for-backward bytes --------------------------------------------------------------


def saved_tensor_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> dict[str, float]:
    """Bytes autograd saves for backward while ``fn()`` runs (``saved_tensors_hooks``).

    ``total``: the sum over every saved tensor (a tensor saved twice counts twice);
    ``unique``: distinct storages; ``new``: distinct storages other than those of
    ``exclude`` (the inputs and parameters the caller keeps anyway) — what backward keeps
    alive beyond them. ``count``: number of saved tensors.
    """
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    excluded = {t.untyped_storage().data_ptr() for t in exclude if isinstance(t, torch.Tensor)}
    total, storages = 0, {}
    for t in saved:
        if not isinstance(t, torch.Tensor):
            continue
        total += t.numel() * t.element_size()
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
    unique = sum(storages.values())
    new = sum(n for p, n in storages.items() if p not in excluded)
    del out
    return {"total": float(total), "unique": float(unique), "new": float(new), "count": float(len(saved))}


# -- one grid point -----------------------------------------------------------------------


class Runner:
    """One provider at one grid point.

    ``check()`` runs once from a fresh state and returns the tensors to compare;
    ``step()`` is the timed call (state reset included); ``grad_to_none`` lists the
    tensors whose ``.grad`` is cleared before every timed call.
    """

    grad_to_none: list = []

    def check(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def step(self) -> object:
        raise NotImplementedError


class ModuleRunner(Runner):
    """A module called on ``x``: ``mode`` is ``train_fwd`` (autograd recording),
    ``train_fwdbwd`` (backward of ``g`` too) or anything else (no grad, module as is).

    ``call`` is the module or its compiled twin; ``reset`` clears the module's memory
    before every call (None for stateless modules); ``state`` (a state_dict) is loaded
    before the check in training so every provider starts from the same running
    statistics; ``extras(module, mode)`` adds tensors to compare (final membrane,
    parameter gradients, running statistics); ``out_key`` names the output (``spikes``
    are compared by mismatch share).
    """

    def __init__(self, module, call, x, g, mode, *, reset=None, state=None, extras=None, out_key="y"):
        self.module, self.call, self.x, self.g, self.mode = module, call, x, g, mode
        self.reset, self.state, self.extras, self.out_key = reset, state, extras, out_key
        self.train = mode.startswith("train")
        params = [p for p in module.parameters() if p.requires_grad]
        self.grad_to_none = [x, *params] if mode == "train_fwdbwd" else []

    def _reset(self):
        if self.reset is not None:
            self.reset(self.module)

    def check(self):
        if self.train and self.state is not None:
            self.module.load_state_dict(self.state)
        self.x.grad = None
        for p in self.module.parameters():
            p.grad = None
        self._reset()
        if self.train:
            y = self.call(self.x)
            if self.mode == "train_fwdbwd":
                y.backward(self.g)
        else:
            with torch.no_grad():
                y = self.call(self.x)
        out = {self.out_key: y.detach().clone()}
        if self.mode == "train_fwdbwd":
            out["grad_x"] = self.x.grad.detach().clone()
        if self.extras is not None:
            out.update({k: v.detach().clone() for k, v in self.extras(self.module, self.mode).items()})
        return out

    def step(self):
        if self.mode == "train_fwdbwd":
            self._reset()
            self.call(self.x).backward(self.g)
        elif self.mode == "train_fwd":
            self._reset()
            return self.call(self.x)
        else:
            with torch.no_grad():
                self._reset()
                return self.call(self.x)


def _short(err: BaseException, limit: int = 300) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def bench_case(
    rec: Recorder,
    *,
    kernel: str,
    mode: str,
    shape: str,
    dtype: torch.dtype,
    builders: Mapping[str, Callable[[], Runner] | str],
    reference: str,
    budget: TimingBudget,
    bytes_moved: float | None = None,
    copy_gbps: float | None = None,
    tol: Tol | None = None,
) -> dict[str, Timing]:
    """Check, time and record one grid point; returns the timings of the providers.

    ``builders`` maps provider name to a zero-argument factory of its :class:`Runner`, or
    to a string: the reason it is skipped here (a ``skipped`` row). Building,
    compiling and checking failures become ``error`` rows. Only providers that agree
    with ``reference`` are timed. Per timed provider: ``ms_median``, ``ms_iqr``,
    ``ms_p20``, ``ms_p80``; with ``bytes_moved`` also ``gbps`` (and on CUDA
    ``frac_of_copy``); ``speedup_vs_spikingjelly`` / ``speedup_vs_compile`` where those
    were timed; ``peak_mem_bytes`` on CUDA; ``compile_s`` for compiled providers.
    """
    env = rec.env
    dt = dtype_name(dtype)
    tol = tol or TOLERANCES[dtype]
    add = lambda prov, metric, value, note="": rec.add(kernel, prov, mode, shape, dt, metric, value, note)  # noqa: E731

    runners: dict[str, Runner] = {}
    checks: dict[str, dict] = {}
    for name, build in builders.items():
        if isinstance(build, str):
            add(name, "skipped", None, build)
            continue
        try:
            t0 = time.perf_counter()
            runner = build()
            result = runner.check()  # compiles, for a compiled provider
            _sync(env)
            elapsed = time.perf_counter() - t0
        except Exception as err:  # a failing provider is a result, not a crash
            add(name, "error", None, f"build/check failed: {_short(err)}")
            rec.log(f"  {kernel} {mode} {shape} {dt} {name}: ERROR {_short(err)}")
            continue
        if name == SNNORM_COMPILE:
            add(name, "compile_s", elapsed, "first call: compile + check run")
        runners[name] = runner
        checks[name] = result

    if reference not in checks:
        for name in runners:
            add(name, "error", None, f"reference provider {reference} unavailable: not timed")
        return {}
    agreed = {}
    for name, runner in runners.items():
        if name == reference:
            agreed[name] = runner
            continue
        ok, summary, worst = compare(checks[reference], checks[name], tol)
        add(name, "agree", 1.0 if ok else 0.0, summary)
        add(name, "max_abs_err", worst, f"vs {reference}")
        if ok:
            agreed[name] = runner
        else:
            add(name, "error", None, f"disagrees with {reference}: {summary}")
            rec.log(f"  {kernel} {mode} {shape} {dt} {name}: DISAGREES {summary}")
    del checks

    timings = time_providers(
        env, {n: r.step for n, r in agreed.items()}, {n: list(r.grad_to_none) for n, r in agreed.items()}, budget
    )
    for name, t in timings.items():
        add(name, "ms_median", t.median_ms)
        add(name, "ms_iqr", t.iqr_ms)
        add(name, "ms_p20", t.p20_ms)
        add(name, "ms_p80", t.p80_ms)
        if bytes_moved:
            gbps = bytes_moved / (t.median_ms * 1e-3) / 1e9
            add(name, "gbps", gbps, "minimal byte model, see perf/README.md")
            if copy_gbps and env.is_cuda:
                add(name, "frac_of_copy", gbps / copy_gbps)
        for base_name, metric in ((SPIKINGJELLY, "speedup_vs_spikingjelly"), (SNNORM_COMPILE, "speedup_vs_compile")):
            if base_name in timings and name != base_name:
                add(name, metric, timings[base_name].median_ms / t.median_ms)
        if env.is_cuda:
            for g in agreed[name].grad_to_none:
                g.grad = None
            add(name, "peak_mem_bytes", peak_memory_bytes(env, agreed[name].step))
    if copy_gbps and env.is_cuda:
        add(TORCH_COPY, "gbps", copy_gbps, "same-size copy, same run")
    parts = ", ".join(f"{n} {t.median_ms:.3f}ms" for n, t in timings.items())
    rec.log(f"  {kernel} {mode} {shape} {dt}: {parts}")
    return timings


def reset_compiler() -> None:
    """Drop dynamo's caches so each grid point compiles for its own static shapes (and
    the recompile limit never silently sends a compiled provider back to eager)."""
    torch._dynamo.reset()


def compile_module(module: torch.nn.Module) -> torch.nn.Module:
    return torch.compile(module)


def triton_skip_reason(env: Env) -> str | None:
    """Why the triton provider is not benchmarked here (None: it is)."""
    if not env.is_cuda:
        return "no CUDA device: the Triton interpreter is not a benchmark"
    from snnorm.backends import BackendUnavailableError, get_ops

    try:
        get_ops("triton")
    except (BackendUnavailableError, ImportError) as err:
        return f"triton backend unavailable: {_short(err)}"
    return None


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def common_argparser(description: str):

    p = argparse.ArgumentParser(description=description)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--full", action="store_true", help="the full grid (meant for a GPU)")
    g.add_argument("--smoke", action="store_true", help="a tiny grid for the tests")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile provider")
    p.add_argument("--compile-all", action="store_true", help="compile at every grid point (the quick grid compiles one)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", default=None, help="results folder (default perf/results/<device-slug>/)")
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (default 1: stable numbers on a shared CPU; 0 keeps torch's default)",
    )
    p.add_argument(
        "--match", default=None,
        help="only grid points whose label ('<class> <TxNxCxHxW> <dtype>') contains this text; results go to "
             "<kernel>.<match>.csv so split runs (e.g. one GPU command per dtype) add up",
    )
    p.add_argument("--quiet", action="store_true")
    return p


def selected(args, label: str) -> bool:
    return args.match is None or args.match in label


def csv_name(args, name: str) -> str:
    return name if args.match is None else f"{name}.{_slug(args.match)}"


def apply_threads(args) -> None:
    if args.threads > 0 and (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu":
        torch.set_num_threads(args.threads)


def budget_for(args) -> TimingBudget:
    if args.smoke:
        return TimingBudget(seconds=0.02, min_reps=2, max_reps=3, warmup=1, warmup_ms=5, rep_ms=10)
    return TimingBudget()


QUICK_COMPILE_NOTE = (
    "quick grid compiles at T=4 in fp32 only (10-90 s per point and mode on CPU); "
    "--compile-all or --full compiles every point"
)


def record_load(rec: Recorder, kernel: str, when: str) -> None:
    """A ``loadavg_1min`` row (the CPU's 1-minute load average: other processes share the
    machine and slow the timings) with the thread count in the note."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = math.nan
    rec.add(kernel, "-", "-", "-", "-", "loadavg_1min", load,
            f"{when}; cores {os.cpu_count()}; {set_threads_note()}")
    rec.log(f"[{kernel}] {when}: {rec.env.device_name}, load {load:.2f}, {set_threads_note()}")


def grid_name(args) -> str:
    return "full" if args.full else "smoke" if args.smoke else "quick"


def set_threads_note() -> str:
    return f"torch threads {torch.get_num_threads()}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}"


def providers_for(env: Env, args, compile_point: bool, compile_note: str = QUICK_COMPILE_NOTE) -> dict:
    """Which providers run at a grid point: True, or the reason one is skipped.

    ``compile_point``: whether this grid point compiles (the quick grid compiles few).
    """
    out = {SNNORM_TORCH: True}
    if args.no_compile:
        out[SNNORM_COMPILE] = "--no-compile"
    elif not compile_point:
        out[SNNORM_COMPILE] = compile_note
    else:
        out[SNNORM_COMPILE] = True
    reason = triton_skip_reason(env)
    out[SNNORM_TRITON] = reason if reason else True
    out[SPIKINGJELLY] = True
    return out


def compile_here(grid: str, shape, dt: str, compile_all: bool) -> bool:
    """Quick grid: compile every size class at T=4, fp32 only (a static compile takes
    10-90 s per point and mode on a 2-core CPU); --full or --compile-all: every point."""
    return compile_all or grid != "quick" or (shape[0] == 4 and dt == "fp32")


class Session(NamedTuple):
    """What every sweep's ``main`` sets up before its grid loop."""

    args: argparse.Namespace
    env: "Env"
    grid_name: str
    rec: "Recorder"
    budget: "TimingBudget"


def start_session(doc: str, kernel: str, argv=None) -> Session:
    """Parse a sweep's command line (``doc``'s first line is its help), set threads, and
    open its recorder and timing budget; records the machine load at the start."""
    args = common_argparser(doc.splitlines()[0]).parse_args(argv)
    apply_threads(args)
    env = environment(args.device)
    rec = Recorder(env, verbose=not args.quiet)
    budget = budget_for(args)
    record_load(rec, kernel, "start")
    return Session(args, env, grid_name(args), rec, budget)


# -- multi-process runs (gloo on CPU) ----------------------------------------------------


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a gloo ``init_method``)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker: Callable, *args, world: int = 2, timeout_s: float = 300.0) -> list:
    """Spawn ``world`` processes running ``worker(rank, world, port, out_dir, *args)``; each
    saves its result with ``torch.save`` to ``<out_dir>/rank<r>.pt``. Returns the results
    in rank order. TimeoutError after ``timeout_s`` (the workers are killed)."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(worker, args=(world, free_port(), out_dir, *args), nprocs=world, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world}-process run did not finish within {timeout_s} s")
        finally:
            for p in ctx.processes:  # only the workers started here
                if p.is_alive():
                    p.kill()
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]
