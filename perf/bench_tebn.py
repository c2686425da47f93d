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

from perf import harness as H  # noqa: E402
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
    if provider == H.SPIKINGJELLY:
        from spikingjelly.activation_based import layer as sjl

        m = sjl.TemporalEffectiveBatchNorm2d(T, C)
    else:
        from snnorm import layer

        m = layer.TemporalEffectiveBatchNorm2d(T, C)
        m.backend = "triton" if provider == H.SNNORM_TRITON else "torch"
    m.load_state_dict(state)
    return m.to(device=device, dtype=dtype)


def tebn_extras(m, mode):
    if mode != "train_fwdbwd":
        return {}
    return dict(grad_weight=m.weight.grad, grad_bias=m.bias.grad, grad_scale=m.scale.grad,
                running_mean=m.running_mean, running_var=m.running_var)


# -- BNTT ---------------------------------------------------------------------------------


def bntt_state(T: int, C: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for t in range(T):
        state[f"bn_list.{t}.weight"] = torch.rand(C, generator=g) + 0.5
        state[f"bn_list.{t}.running_mean"] = torch.randn(C, generator=g) * 0.5
        state[f"bn_list.{t}.running_var"] = torch.rand(C, generator=g) * 1.5 + 0.5
        state[f"bn_list.{t}.num_batches_tracked"] = torch.tensor(10)
    return state


def make_bntt(provider: str, T: int, C: int, state: dict, device, dtype):
    if provider == H.SPIKINGJELLY:
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


def run_point(rec, env, shape, dtype, providers, budget, seed=0):
    T, N, C, Hh, W = shape
    H.seed_all(seed)
    x = (torch.randn(shape, device=env.device) * 1.5 + 0.3).to(dtype).requires_grad_()
    g = torch.randn(shape, device=env.device).to(dtype)
    numel = x.numel()
    copy_gbps = H.copy_bandwidth_gbps(env, numel, dtype, budget) if env.is_cuda else None
    if not isinstance(providers.get(H.SNNORM_COMPILE), str):
        H.reset_compiler()
    tstate, bstate = tebn_state(T, C, seed), bntt_state(T, C, seed)
    cache = {}

    def tebn_module(provider, train):
        key = (provider, train)
        if key not in cache:
            base = H.SNNORM_TORCH if provider == H.SNNORM_COMPILE else provider
            m = make_tebn(base, T, C, tstate, env.device, dtype).train(train)
            cache[key] = (m, H.compile_module(m) if provider == H.SNNORM_COMPILE else m)
        return cache[key]

    for mode in MODES:
        train = mode.startswith("train")
        xin = x if train else x.detach()
        builders = {}
        for provider, avail in providers.items():
            if isinstance(avail, str):
                builders[provider] = avail
                continue

            def build(provider=provider, train=train, mode=mode, xin=xin):
                m, call = tebn_module(provider, train)
                return H.ModuleRunner(m, call, xin, g, mode, state=tstate if train else None, extras=tebn_extras)

            builders[provider] = build
        bytes_moved = bytes_per_element_step(mode, dtype) * numel
        H.bench_case(
            rec, kernel="tebn", mode=mode, shape=H.shape_str(shape), dtype=dtype, builders=builders,
            reference=H.SNNORM_TORCH, budget=budget, bytes_moved=bytes_moved, copy_gbps=copy_gbps,
        )

        # BNTT reference rows: snnorm's module against spikingjelly's, same byte model
        builders = {}
        for provider in (H.SNNORM_TORCH, H.SPIKINGJELLY):
            def build(provider=provider, train=train, mode=mode, xin=xin):
                m, reset = make_bntt(provider, T, C, bstate, env.device, dtype)
                m.train(train)
                return H.ModuleRunner(m, m, xin, g, mode, reset=reset, state=bstate if train else None,
                                      extras=bntt_extras)

            builders[provider] = build
        H.bench_case(
            rec, kernel="bntt", mode=mode, shape=H.shape_str(shape), dtype=dtype, builders=builders,
            reference=H.SNNORM_TORCH, budget=budget, bytes_moved=bytes_moved, copy_gbps=copy_gbps,
        )


def main(argv=None) -> list[dict]:
    args, env, name, rec, budget = H.start_session(__doc__, "tebn", argv)
    for cls, shape, dt in grid(name):
        if not H.selected(args, f"{cls} {H.shape_str(shape)} {dt}"):
            continue
        rec.log(f" {cls} {H.shape_str(shape)} {dt}")
        run_point(rec, env, shape, H.DTYPES[dt], H.providers_for(env, args, H.compile_here(name, shape, dt, args.compile_all)), budget)
    H.record_load(rec, "tebn", "end")
    path = H.results_path(env, H.csv_name(args, "tebn"), args.out)
    rec.write_csv(path)
    rec.log(f"[tebn] {len(rec.rows)} rows -> {path}")
    return rec.rows


if __name__ == "__main__":
    main()
