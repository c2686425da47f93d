"""The shared runner of the timing sweeps: one grid point, every provider.

A sweep builds, per grid point, one *runner* per provider (a small object with ``check()``
and ``step()``: :class:`Runner`, or :class:`ModuleRunner` for a module called on ``x``)
and hands their factories to :func:`bench_case`, which

1. runs ``check()`` of every provider on the same inputs from the same state and compares
   the tensors with the reference provider's (:mod:`perf.tools.agreement`); a provider that
   disagrees, or fails to build / compile, gets an ``error`` row and is not timed;
2. times the providers that agreed (:mod:`perf.tools.timing`);
3. derives GB/s from the sweep's byte model, the speedups over spikingjelly and over
   torch.compile, and on CUDA the fraction of a same-size ``torch`` copy's bandwidth and
   the peak memory of one call.

:func:`start_point` makes a point's inputs, :class:`Modules` builds (and compiles) each
provider's module once per point, :func:`builders_for` turns the providers into factories.
The command line and the grid loop around it are :mod:`perf.tools.sweep`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Mapping

import torch

from perf.tools.agreement import TOLERANCES, Tol, compare
from perf.tools.record import (SNNORM_COMPILE, SNNORM_TORCH, SPIKINGJELLY, TORCH_COPY, Recorder, dtype_name,
                               shape_str, short_error)
from perf.tools.timing import Timing, TimingBudget, copy_bandwidth_gbps, peak_memory_bytes, sync, time_providers


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
            sync(env)
            elapsed = time.perf_counter() - t0
        except Exception as err:  # a failing provider is a result, not a crash
            add(name, "error", None, f"build/check failed: {short_error(err)}")
            rec.log(f"  {kernel} {mode} {shape} {dt} {name}: ERROR {short_error(err)}")
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


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)



# -- what every sweep's grid point shares ------------------------------------------------------


def builders_for(providers: Mapping[str, bool | str], build: Callable[[str], Runner]) -> dict:
    """For :func:`bench_case`: each provider's runner factory, ``build(provider)``, or the
    reason it is skipped (a provider whose entry in ``providers`` is a string)."""
    return {p: avail if isinstance(avail, str) else functools.partial(build, p) for p, avail in providers.items()}


class Modules:
    """Each provider's module at one grid point, built once per ``kind`` (e.g. ``train``,
    ``eval``: the training modes share one module and one compile).

    ``make(provider, kind)`` returns ``(module, call, reset)`` for an eager provider (``call``
    is usually the module itself; ``reset`` clears its memory, or None); the compile provider
    gets snnorm-torch's module and ``torch.compile`` of it as ``call``.
    """

    def __init__(self, make: Callable[[str, str], tuple]):
        self.make, self.cache = make, {}

    def __call__(self, provider: str, kind: str) -> tuple:
        key = (provider, kind)
        if key not in self.cache:
            module, call, reset = self.make(SNNORM_TORCH if provider == SNNORM_COMPILE else provider, kind)
            self.cache[key] = (module, compile_module(module) if provider == SNNORM_COMPILE else call, reset)
        return self.cache[key]


@dataclasses.dataclass
class Point:
    """One grid point's inputs: ``x`` (requires grad), the upstream gradient ``g``, and what
    every :func:`bench_case` call there shares (recorder, budget, copy bandwidth)."""

    rec: Recorder
    budget: TimingBudget
    shape: tuple
    dtype: torch.dtype
    x: torch.Tensor
    g: torch.Tensor
    copy_gbps: float | None

    def case(self, kernel: str, mode: str, builders: Mapping, bytes_per_element_step: float | None = None,
             reference: str = SNNORM_TORCH) -> dict[str, Timing]:
        """:func:`bench_case` at this point; bytes moved = ``bytes_per_element_step`` · numel."""
        return bench_case(
            self.rec, kernel=kernel, mode=mode, shape=shape_str(self.shape), dtype=self.dtype, builders=builders,
            reference=reference, budget=self.budget, copy_gbps=self.copy_gbps,
            bytes_moved=None if bytes_per_element_step is None else bytes_per_element_step * self.x.numel(),
        )

    def modes(self, kernel: str, modes, modules: "Modules", providers: Mapping, bytes_per_element_step: Callable,
              *, state=None, extras=None, out_key: str = "y") -> dict[str, dict[str, Timing]]:
        """Every mode of a module sweep at this point: each provider's module comes from
        ``modules(provider, kind)`` (kind ``train`` for the training modes, else the mode's first
        word: ``eval``, ``folded``), runs as a :class:`ModuleRunner` (``state`` loaded before the
        check in training), and moves ``bytes_per_element_step(mode, dtype)`` per element-step.
        Returns the timings per mode."""
        out = {}
        for mode in modes:
            kind = "train" if mode.startswith("train") else mode.split("_")[0]

            def build(provider, kind=kind, mode=mode):
                m, call, reset = modules(provider, kind)
                return ModuleRunner(m, call, self.x if kind == "train" else self.x.detach(), self.g, mode, reset=reset,
                                    state=state if kind == "train" else None, extras=extras, out_key=out_key)

            out[mode] = self.case(kernel, mode, builders_for(providers, build), bytes_per_element_step(mode, self.dtype))
        return out


def start_point(session, shape, dtype: torch.dtype, providers: Mapping, *, seed: int = 0, scale: float = 1.0,
                shift: float = 0.0, step_shift: float = 0.0) -> Point:
    """Seed, draw ``x = randn·scale + shift (+ step_shift·t at step t)`` and ``g = randn`` of
    ``shape`` ([T, ...]) in ``dtype``, time a same-size copy (CUDA), and drop dynamo's caches
    when this point compiles. ``session``: anything with ``rec``, ``env`` and ``budget``."""
    env = session.env
    seed_all(seed)
    x = (torch.randn(shape, device=env.device) * scale + shift).to(dtype)
    if step_shift:
        x = x + torch.arange(shape[0], device=env.device, dtype=dtype).view(-1, *[1] * (len(shape) - 1)) * step_shift
    x = x.requires_grad_()
    g = torch.randn(shape, device=env.device).to(dtype)
    copy_gbps = copy_bandwidth_gbps(env, x.numel(), dtype, session.budget) if env.is_cuda else None
    if providers.get(SNNORM_COMPILE, False) is True:
        reset_compiler()
    return Point(session.rec, session.budget, tuple(shape), dtype, x, g, copy_gbps)
