"""TEBN benchmark (and BNTT as a reference row): training forward, forward+backward, eval.

TEBN (Duan et al., NeurIPS 2022): y[t] = p[t]·(γ x̂[t] + β), statistics over T·N·H·W.
Providers, same process, same inputs and parameters:

* ``snnorm-torch``: :class:`snnorm.layer.TemporalEffectiveBatchNorm2d` (torch backend);
* ``snnorm-torch-compile``: ``torch.compile`` of it;
* ``snnorm-triton``: ``backend="triton"`` (CUDA only);
* ``spikingjelly``: ``spikingjelly.activation_based.layer.TemporalEffectiveBatchNorm2d``.

BNTT (kernel ``bntt``: one BN per timestep, y[t] = γ_t (x[t] − μ_t)/√(σ_t² + ε)) is a
different op, benchmarked as a reference row: snnorm's ``BatchNormThroughTime2d`` against
spikingjelly's (both multi-step, torch only: snnorm has no fused BNTT kernel yet).

Byte model per element-step (e = element size; see perf/README.md): train_fwd 3e
(statistics pass reads x; normalise pass reads x, writes y), train_fwdbwd 8e (backward:
a reduction pass reads grad_y and x, an apply pass reads both and writes grad_x),
eval_fwd 2e.

Run: ``python -m perf.bench_tebn [--full | --smoke] [--no-compile]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from perf import tools  # noqa: E402
from perf.bench_mpbn_lif import DTYPES, SIZES, T_SWEEP_AT, T_VALUES, grid  # noqa: E402,F401

MODES = ("train_fwd", "train_fwdbwd", "eval_fwd")


def bytes_per_element_step(mode: str, dtype: torch.dtype) -> int:
    e = torch.tensor([], dtype=dtype).element_size()
    return {"train_fwd": 3 * e, "train_fwdbwd": 8 * e, "eval_fwd": 2 * e}[mode]


# -- TEBN ---------------------------------------------------------------------------------


def tebn_state(T: int, C: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "weight": torch.rand(C, generator=g) + 0.5,
        "bias": (torch.rand(C, generator=g) - 0.5) * 0.4,
        "running_mean": torch.randn(C, generator=g) * 0.5,
        "running_var": torch.rand(C, generator=g) * 1.5 + 0.5,
        "num_batches_tracked": torch.tensor(10),
        "scale": torch.rand(T, generator=g) + 0.5,
    }


def make_tebn(provider: str, T: int, C: int, state: dict, device, dtype):
    if provider == tools.SPIKINGJELLY:
        from spikingjelly.activation_based import layer as sjl

        m = sjl.TemporalEffectiveBatchNorm2d(T, C)
    else:
        from snnorm import layer

        m = layer.TemporalEffectiveBatchNorm2d(T, C)
        m.backend = "triton" if provider == tools.SNNORM_TRITON else "torch"
    m.load_state_dict(state)
    return m.to(device=device, dtype=dtype)


def tebn_extras(m, mode):
    if mode != "train_fwdbwd":
        return {}
    return dict(grad_weight=m.weight.grad, grad_bias=m.bias.grad, grad_scale=m.scale.grad,
                running_mean=m.running_mean, running_var=m.running_var)


# -- BNTT ---------------------------------------------------------------------------------


def per_step_state(T: int, C: int, g: torch.Generator, bias: bool) -> dict:
    """``bn_list.{t}.*`` of T per-step BatchNorms (BNTT's and the official TAB's layout):
    γ_t > 0, β_t (``bias``), running statistics; drawn from ``g``."""
    state = {}
    for t in range(T):
        state[f"bn_list.{t}.weight"] = torch.rand(C, generator=g) + 0.5
        if bias:
            state[f"bn_list.{t}.bias"] = (torch.rand(C, generator=g) - 0.5) * 0.4
        state[f"bn_list.{t}.running_mean"] = torch.randn(C, generator=g) * 0.5
        state[f"bn_list.{t}.running_var"] = torch.rand(C, generator=g) * 1.5 + 0.5
        state[f"bn_list.{t}.num_batches_tracked"] = torch.tensor(10)
    return state


def bntt_state(T: int, C: int, seed: int) -> dict:
    return per_step_state(T, C, torch.Generator().manual_seed(seed), bias=False)


def make_bntt(provider: str, T: int, C: int, state: dict, device, dtype):
    if provider == tools.SPIKINGJELLY:
        from spikingjelly.activation_based import functional as sjf
        from spikingjelly.activation_based import layer as sjl

        m, reset = sjl.BatchNormThroughTime2d(T, C, step_mode="m"), sjf.reset_net
    else:
        from snnorm import functional as snf
        from snnorm import layer

        m, reset = layer.BatchNormThroughTime2d(T, C, step_mode="m"), snf.reset_net
    m.load_state_dict(state)
    return m.to(device=device, dtype=dtype), reset


def bntt_extras(m, mode):
    if mode != "train_fwdbwd":
        return {}
    out = {}
    for t, bn in enumerate(m.bn_list):
        out[f"grad_weight{t}"] = bn.weight.grad
        out[f"running_mean{t}"] = bn.running_mean
        out[f"running_var{t}"] = bn.running_var
    return out


# -- one grid point -------------------------------------------------------------------------


def run_point(session, shape, dtype, providers, seed=0):
    """TEBN in every mode, and BNTT's reference rows (snnorm's module against spikingjelly's,
    same byte model), at one grid point."""
    T, C, device = shape[0], shape[2], session.env.device
    point = tools.start_point(session, shape, dtype, providers, seed=seed, scale=1.5, shift=0.3)
    tstate, bstate = tebn_state(T, C, seed), bntt_state(T, C, seed)

    def tebn(provider, kind):
        m = make_tebn(provider, T, C, tstate, device, dtype).train(kind == "train")
        return m, m, None

    def bntt(provider, kind):
        m, reset = make_bntt(provider, T, C, bstate, device, dtype)
        return m.train(kind == "train"), m, reset

    point.modes("tebn", MODES, tools.Modules(tebn), providers, bytes_per_element_step, state=tstate,
                extras=tebn_extras)
    point.modes("bntt", MODES, tools.Modules(bntt), dict.fromkeys((tools.SNNORM_TORCH, tools.SPIKINGJELLY), True),
                bytes_per_element_step, state=bstate, extras=bntt_extras)


def main(argv=None) -> list[dict]:
    return tools.run_sweep(__doc__, "tebn", grid, run_point, argv).rec.rows


if __name__ == "__main__":
    main()
