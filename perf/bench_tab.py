"""TAB benchmark: snnorm's O(T) op against the official code's O(T²) algorithm.

TAB (Jiang et al., ICLR 2024): y_t = p_t²·(γ_t x̂_t + β_t), x̂_t normalised with the
statistics of steps 0..t. Providers, same process, same inputs and parameters:

* ``snnorm-torch``: :class:`snnorm.layer.TemporalAccumulatedBatchNorm2d` (torch backend:
  per-step partial statistics combined in order, O(T)); the reference;
* ``snnorm-torch-compile``: ``torch.compile`` of it;
* ``snnorm-triton``: ``backend="triton"`` (CUDA only);
* ``official-quadratic``: perf/tab_baseline.py, the official ``TAB_Layer``'s algorithm (a
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

from perf import harness as H  # noqa: E402
from perf.bench_tebn import MODES, bytes_per_element_step  # noqa: E402
from perf.tab_baseline import QuadraticTAB, run_on_tncs  # noqa: E402

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
    state = {"p": (torch.rand(T, generator=g) + 0.5).view(T, 1, 1, 1, 1)}
    for t in range(T):
        state[f"bn_list.{t}.weight"] = torch.rand(C, generator=g) + 0.5
        state[f"bn_list.{t}.bias"] = (torch.rand(C, generator=g) - 0.5) * 0.4
        state[f"bn_list.{t}.running_mean"] = torch.randn(C, generator=g) * 0.5
        state[f"bn_list.{t}.running_var"] = torch.rand(C, generator=g) * 1.5 + 0.5
        state[f"bn_list.{t}.num_batches_tracked"] = torch.tensor(10)
    return state


def make_tab(provider: str, T: int, C: int, state: dict, device, dtype):
    if provider == QUADRATIC:
        m = QuadraticTAB(C, T)
    else:
        from snnorm import layer

        m = layer.TemporalAccumulatedBatchNorm2d(T, C)
        m.backend = "triton" if provider == H.SNNORM_TRITON else "torch"
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


def run_point(rec, env, shape, dtype, providers, budget, seed=0):
    T, N, C, Hh, W = shape
    H.seed_all(seed)
    x = (torch.randn(shape, device=env.device) * 1.5 + 0.3).to(dtype)
    x = (x + torch.arange(T, device=env.device, dtype=dtype).view(T, 1, 1, 1, 1) * 0.2).requires_grad_()
    g = torch.randn(shape, device=env.device).to(dtype)
    numel = x.numel()
    copy_gbps = H.copy_bandwidth_gbps(env, numel, dtype, budget) if env.is_cuda else None
    if not isinstance(providers.get(H.SNNORM_COMPILE), str):
        H.reset_compiler()
    state = tab_state(T, C, seed)
    cache = {}

    def module(provider, train):
        key = (provider, train)
        if key not in cache:
            base = H.SNNORM_TORCH if provider == H.SNNORM_COMPILE else provider
            m = make_tab(base, T, C, state, env.device, dtype).train(train)
            if provider == QUADRATIC:
                call = lambda x, m=m: run_on_tncs(m, x)  # noqa: E731
            else:
                call = H.compile_module(m) if provider == H.SNNORM_COMPILE else m
            cache[key] = (m, call)
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
                m, call = module(provider, train)
                return H.ModuleRunner(m, call, xin, g, mode, state=state if train else None, extras=tab_extras)

            builders[provider] = build
        timings = H.bench_case(
            rec, kernel="tab", mode=mode, shape=H.shape_str(shape), dtype=dtype, builders=builders,
            reference=H.SNNORM_TORCH, budget=budget, bytes_moved=bytes_per_element_step(mode, dtype) * numel,
            copy_gbps=copy_gbps,
        )
        if QUADRATIC in timings:
            for name, t in timings.items():
                if name != QUADRATIC:
                    rec.add("tab", name, mode, H.shape_str(shape), H.dtype_name(dtype), "speedup_vs_quadratic",
                            timings[QUADRATIC].median_ms / t.median_ms)


def providers(env, args, compile_point: bool, **kwargs) -> dict:
    out = H.providers_for(env, args, compile_point, **kwargs)
    out.pop(H.SPIKINGJELLY)  # spikingjelly has no TAB
    out[QUADRATIC] = True
    return out


def main(argv=None) -> list[dict]:
    args, env, name, rec, budget = H.start_session(__doc__, "tab", argv)
    for cls, shape, dt in grid(name):
        if not H.selected(args, f"{cls} {H.shape_str(shape)} {dt}"):
            continue
        rec.log(f" {cls} {H.shape_str(shape)} {dt}")
        compile_point = H.compile_here(name, shape, dt, args.compile_all)
        run_point(rec, env, shape, H.DTYPES[dt], providers(env, args, compile_point), budget)
    H.record_load(rec, "tab", "end")
    path = H.results_path(env, H.csv_name(args, "tab"), args.out)
    rec.write_csv(path)
    rec.log(f"[tab] {len(rec.rows)} rows -> {path}")
    speedups = [r for r in rec.rows if r["metric"] == "speedup_vs_quadratic"]
    if speedups:
        rec.log("[tab] speedup of snnorm over the official O(T^2) algorithm (median times):")
        for r in speedups:
            rec.log(f"  {r['provider']:<22} {r['mode']:<13} {r['shape']:<16} {r['value']:.2f}x")
    return rec.rows


if __name__ == "__main__":
    main()
