"""TAB benchmark: snnorm's O(T) op against the official code's O(T²) algorithm.

TAB (Jiang et al., ICLR 2024): y_t = p_t²·(γ_t x̂_t + β_t), x̂_t normalised with the
statistics of steps 0..t. Providers, same process, same inputs and parameters:

* ``snnorm-torch``: :class:`snnorm.layer.TemporalAccumulatedBatchNorm2d` (torch backend:
  per-step partial statistics combined in order, O(T)); the reference;
* ``snnorm-torch-compile``: ``torch.compile`` of it;
* ``snnorm-triton``: ``backend="triton"`` (CUDA only);
* ``official-quadratic``: perf/tools/tab_baseline.py, the official ``TAB_Layer``'s algorithm (a
  BatchNorm3d over the growing block x[0..t] at every step: O(T²)), in its own layout
  ``[N, T, C, H, W]`` (the transposes to and from snnorm's layout are timed with it).

Every provider must agree with the reference on outputs, ∂x, ∂γ_t, ∂β_t, ∂p and the
per-step running statistics before it is timed. ``speedup_vs_quadratic`` rows give
t(official-quadratic) / t(provider); the sweep is over T = 4, 8, 16, where the gap grows
with T. Byte model per element-step (e = element size), the O(T) algorithm's floor:
train_fwd 3e, train_fwdbwd 8e, eval_fwd 2e (as TEBN).

Run: ``python -m perf.bench_tab [--full | --smoke] [--no-compile]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from perf import tools  # noqa: E402
from perf.bench_tebn import MODES, bytes_per_element_step, per_step_state  # noqa: E402
from perf.tools import QuadraticTAB, run_on_tncs  # noqa: E402

QUADRATIC = "official-quadratic"
T_VALUES = (4, 8, 16)
SIZES = {"quick": [(8, 16, 16, 16)], "full": [(8, 16, 16, 16), (32, 64, 32, 32)], "smoke": [(2, 3, 4, 4)]}


def grid(name: str):
    """(size class, [T, N, C, H, W], dtype) points of a grid."""
    Ts = (2, 3) if name == "smoke" else T_VALUES
    for N, C, Hh, W in SIZES[name]:
        for T in Ts:
            yield f"N{N}C{C}", (T, N, C, Hh, W), "fp32"


def tab_state(T: int, C: int, seed: int) -> dict:
    """An official-layout state_dict with non-trivial parameters and statistics."""
    g = torch.Generator().manual_seed(seed)
    p = (torch.rand(T, generator=g) + 0.5).view(T, 1, 1, 1, 1)
    return {"p": p, **per_step_state(T, C, g, bias=True)}


def make_tab(provider: str, T: int, C: int, state: dict, device, dtype):
    if provider == QUADRATIC:
        m = QuadraticTAB(C, T)
    else:
        from snnorm import layer

        m = layer.TemporalAccumulatedBatchNorm2d(T, C)
        m.backend = "triton" if provider == tools.SNNORM_TRITON else "torch"
    m.load_state_dict(state)
    return m.to(device=device, dtype=dtype)


def tab_extras(m, mode):
    """Per-step gradients and running statistics as [T, C] / [T], whatever the layout."""
    if mode != "train_fwdbwd":
        return {}
    if isinstance(m, QuadraticTAB):
        stack = lambda f: torch.stack([f(bn) for bn in m.bn_list])  # noqa: E731
        return dict(grad_weight=stack(lambda bn: bn.weight.grad), grad_bias=stack(lambda bn: bn.bias.grad),
                    grad_p=m.p.grad.flatten(), running_mean=stack(lambda bn: bn.running_mean),
                    running_var=stack(lambda bn: bn.running_var))
    return dict(grad_weight=m.weight.grad, grad_bias=m.bias.grad, grad_p=m.p.grad,
                running_mean=m.running_mean, running_var=m.running_var)


def run_point(session, shape, dtype, providers, seed=0):
    """Every mode at one grid point, then ``speedup_vs_quadratic`` rows."""
    T, C, device = shape[0], shape[2], session.env.device
    point = tools.start_point(session, shape, dtype, providers, seed=seed, scale=1.5, shift=0.3, step_shift=0.2)
    state = tab_state(T, C, seed)

    def make(provider, kind):
        m = make_tab(provider, T, C, state, device, dtype).train(kind == "train")
        return m, (lambda x: run_on_tncs(m, x)) if provider == QUADRATIC else m, None

    timings = point.modes("tab", MODES, tools.Modules(make), providers, bytes_per_element_step, state=state,
                          extras=tab_extras)
    for mode, by_provider in timings.items():
        if QUADRATIC in by_provider:
            for name, t in by_provider.items():
                if name != QUADRATIC:
                    session.rec.add("tab", name, mode, tools.shape_str(shape), tools.dtype_name(dtype),
                                    "speedup_vs_quadratic", by_provider[QUADRATIC].median_ms / t.median_ms)


def providers(env, args, compile_point: bool, **kwargs) -> dict:
    """:func:`perf.tools.providers_for` less spikingjelly (it has no TAB), plus the O(T²) baseline."""
    out = tools.providers_for(env, args, compile_point, **kwargs)
    out.pop(tools.SPIKINGJELLY)
    out[QUADRATIC] = True
    return out


def main(argv=None) -> list[dict]:
    session = tools.run_sweep(__doc__, "tab", grid, run_point, argv, providers=lambda s, shape, dt: providers(
        s.env, s.args, tools.compile_here(s.grid_name, shape, dt, s.args.compile_all)))
    rec = session.rec
    speedups = [r for r in rec.rows if r["metric"] == "speedup_vs_quadratic"]
    if speedups:
        rec.log("[tab] speedup of snnorm over the official O(T^2) algorithm (median times):")
        for r in speedups:
            rec.log(f"  {r['provider']:<22} {r['mode']:<13} {r['shape']:<16} {r['value']:.2f}x")
    return rec.rows


if __name__ == "__main__":
    main()
