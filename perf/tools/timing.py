"""Timing: ``triton.testing.do_bench`` on CUDA (quantiles 0.5/0.25/0.75/0.2/0.8,
``grad_to_none``); on the CPU a perf_counter loop that interleaves the providers sample by
sample (a shared, noisy CPU then biases no provider), after warm-up calls. Also the
bandwidth of a same-size copy and the peak memory of one call (CUDA)."""

from __future__ import annotations

import dataclasses
import gc
import math
import statistics
import time
from typing import Callable, Mapping, Sequence

import torch

from perf.tools.record import TORCH_COPY, Env


def sync(env: Env) -> None:
    """Wait for the device (CUDA) so a clock reading covers the work queued before it."""
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
    sync(env)
    gc.collect()
    torch.cuda.reset_peak_memory_stats(env.device)
    base = torch.cuda.memory_allocated(env.device)
    fn()
    sync(env)
    return float(torch.cuda.max_memory_allocated(env.device) - base)
