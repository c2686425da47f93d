"""A timing sweep's command line and grid loop: every ``bench_*.py`` is a declaration (its
grid, its byte model, how to build each provider at a point) over :func:`run_sweep`.

Flags (:func:`common_argparser`): ``--full`` / ``--smoke`` (grid), ``--no-compile``,
``--compile-all``, ``--device``, ``--out``, ``--threads``, ``--match``, ``--quiet``. Rows go to
``perf/results/<device-slug>/<kernel>.csv`` with ``loadavg_1min`` rows at both ends.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Callable, Iterable, NamedTuple

import torch

from perf.tools.record import (DTYPES, SNNORM_COMPILE, SNNORM_TORCH, SNNORM_TRITON, SPIKINGJELLY, Env, Recorder,
                               environment, results_path, shape_str, short_error, slug)
from perf.tools.timing import TimingBudget


def common_argparser(description: str) -> argparse.ArgumentParser:
    """The flags every sweep takes (perf/README.md)."""
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
    return name if args.match is None else f"{name}.{slug(args.match)}"


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


def triton_unavailable() -> str | None:
    """Why snnorm's triton backend cannot run here (None: it can, on a CPU through the
    interpreter)."""
    from snnorm.backends import BackendUnavailableError, get_ops

    try:
        get_ops("triton")
    except (BackendUnavailableError, ImportError) as err:
        return f"triton backend unavailable: {short_error(err)}"
    return None


def triton_skip_reason(env: Env) -> str | None:
    """Why the triton provider is not timed here (None: it is)."""
    if not env.is_cuda:
        return "no CUDA device: the Triton interpreter is not a benchmark"
    return triton_unavailable()


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
    env: Env
    grid_name: str
    rec: Recorder
    budget: TimingBudget


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


#: a grid point: (label, shape, dtype name); the label and the shape make what --match matches
GridPoint = tuple


def default_providers(session: Session, shape, dt: str) -> dict:
    """:func:`providers_for` with the quick grid's compile rule (:func:`compile_here`)."""
    return providers_for(session.env, session.args, compile_here(session.grid_name, shape, dt, session.args.compile_all))


def run_sweep(doc: str, kernel: str, grid: Callable[[str], Iterable[GridPoint]],
              run_point: Callable[[Session, tuple, torch.dtype, dict], object], argv=None,
              providers: Callable[[Session, tuple, str], dict] = default_providers) -> Session:
    """The ``main`` of a timing sweep: parse the command line (``doc``'s first line is the
    help), run ``run_point(session, shape, dtype, providers)`` at every point of
    ``grid(grid name)`` that ``--match`` selects, record the load at both ends and write
    ``<kernel>.csv``. Returns the session (its ``rec.rows`` are the rows)."""
    session = start_session(doc, kernel, argv)
    for label, shape, dt in grid(session.grid_name):
        label = f"{label} {shape_str(shape)} {dt}"
        if not selected(session.args, label):
            continue
        session.rec.log(f" {label}")
        run_point(session, shape, DTYPES[dt], providers(session, shape, dt))
    record_load(session.rec, kernel, "end")
    path = results_path(session.env, csv_name(session.args, kernel), session.args.out)
    session.rec.write_csv(path)
    session.rec.log(f"[{kernel}] {len(session.rec.rows)} rows -> {path}")
    return session
