"""MPBN-LIF benchmark: training forward, training forward+backward, eval, folded.

Providers, same process, same inputs, same parameters and running statistics:

* ``snnorm-torch``: :class:`snnorm.neuron.MPBNLIFNode` with the reference torch backend;
* ``snnorm-torch-compile``: ``torch.compile`` of that module (failures become rows);
* ``snnorm-triton``: the same module with ``backend="triton"`` (CUDA only);
* ``spikingjelly``: ``spikingjelly.activation_based.neuron.MPBNLIFNode`` 2.0.0
  (folded: ``re_parameterize_v_threshold(normalize_residual=True)``, the exact fold for
  its post-BN carry with hard reset and γ > 0, the configuration benchmarked here).

Modes: ``train_fwd`` (forward with autograd recording, as in training), ``train_fwdbwd``
(forward + backward of a random upstream gradient), ``eval_fwd`` (running statistics,
no grad), ``folded_fwd`` (BN folded into a per-channel threshold, eval, no grad).

Byte model (per element-step, e = element size of the dtype; see perf/README.md):
train_fwd 2e + 4 (read x, write s, save h in fp32), train_fwdbwd 5e + 8 (backward reads
grad_s, s, h and writes grad_x), eval/folded 2e.

Run: ``python -m perf.bench_mpbn_lif [--full | --smoke] [--no-compile]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from perf import tools  # noqa: E402

KERNEL = "mpbn_lif"
MODES = ("train_fwd", "train_fwdbwd", "eval_fwd", "folded_fwd")

# Per-step [N, C, H, W] size classes: from launch-bound (a few thousand elements per
# step: per-op overhead dominates) to bandwidth-bound (millions per step).
SIZES = {
    "smoke": {"tiny": (2, 4, 4, 4)},
    "quick": {"small": (2, 8, 8, 8), "medium": (8, 32, 16, 16), "large": (8, 64, 32, 32)},
    "full": {
        "small": (2, 8, 8, 8),
        "medium": (8, 32, 16, 16),
        "large": (32, 64, 32, 32),
        "xlarge": (64, 128, 32, 32),
        "xxlarge": (64, 256, 32, 32),
    },
}
# T sweep at one size class; the size sweep runs at T=4.
T_SWEEP_AT = {"smoke": "tiny", "quick": "medium", "full": "large"}
T_VALUES = {"smoke": (1, 3), "quick": (1, 2, 4, 8, 16), "full": (1, 2, 4, 8, 16)}
DTYPES = {"smoke": ("fp32",), "quick": ("fp32", "bf16"), "full": ("fp32", "bf16")}
# bf16 runs the size sweep only (T=4): the T sweep is a fp32 question on CPU.
BF16_T_SWEEP = {"smoke": False, "quick": False, "full": True}


def grid(name: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(size class, [T, N, C, H, W], dtype) points: the size sweep at T=4, the T sweep."""
    points = []
    for dt in DTYPES[name]:
        for cls, (n, c, h, w) in SIZES[name].items():
            points.append((cls, (4 if name != "smoke" else 3, n, c, h, w), dt))
        if dt == "fp32" or BF16_T_SWEEP[name]:
            n, c, h, w = SIZES[name][T_SWEEP_AT[name]]
            for T in T_VALUES[name]:
                p = (T_SWEEP_AT[name], (T, n, c, h, w), dt)
                if p not in points:
                    points.append(p)
    return points


def bytes_per_element_step(mode: str, dtype: torch.dtype) -> int:
    e = torch.tensor([], dtype=dtype).element_size()
    return {"train_fwd": 2 * e + 4, "train_fwdbwd": 5 * e + 8, "eval_fwd": 2 * e, "folded_fwd": 2 * e}[mode]


# -- modules ------------------------------------------------------------------------------


def reference_state(C: int, seed: int) -> dict:
    """γ > 0, β, running statistics: non-trivial and shared by every provider."""
    g = torch.Generator().manual_seed(seed)
    return {
        "vbn.weight": torch.rand(C, generator=g) + 0.5,
        "vbn.bias": (torch.rand(C, generator=g) - 0.5) * 0.4,
        "vbn.running_mean": torch.randn(C, generator=g) * 0.5,
        "vbn.running_var": torch.rand(C, generator=g) * 1.5 + 0.5,
        "vbn.num_batches_tracked": torch.tensor(10),
    }


def make_module(provider: str, C: int, state: dict, device, dtype) -> tuple[torch.nn.Module, callable]:
    """(module, reset function) for ``provider``, loaded with ``state``."""
    if provider == tools.SPIKINGJELLY:
        from spikingjelly.activation_based import functional as sjf
        from spikingjelly.activation_based import neuron as sjn

        m = sjn.MPBNLIFNode(tau=2.0, out_channels=C, step_mode="m")
        reset = sjf.reset_net
    else:
        from snnorm import functional as snf
        from snnorm.neuron import MPBNLIFNode

        backend = "triton" if provider == tools.SNNORM_TRITON else "torch"
        m = MPBNLIFNode(tau=2.0, out_channels=C, step_mode="m", backend=backend)
        reset = snf.reset_net
    m.load_state_dict(state)
    return m.to(device=device, dtype=dtype), reset


def fold(module: torch.nn.Module, provider: str) -> None:
    module.eval()
    if provider == tools.SPIKINGJELLY:
        module.re_parameterize_v_threshold(normalize_residual=True)
    else:
        module.re_parameterize_v_threshold()


def extras(module, mode):
    """Final membrane; in fwd+bwd also the BN parameter gradients and running statistics."""
    out = {"v": module.v}
    if mode == "train_fwdbwd":
        bn = module.vbn
        out.update(grad_weight=bn.weight.grad, grad_bias=bn.bias.grad,
                   running_mean=bn.running_mean, running_var=bn.running_var)
    return out


def run_point(session, shape, dtype, providers, seed=0):
    """Every mode at one grid point ([T, N, C, H, W] in ``dtype``)."""
    C = shape[2]
    state = reference_state(C, seed)
    point = tools.start_point(session, shape, dtype, providers, seed=seed)

    def make(provider, kind):
        m, reset = make_module(provider, C, state, session.env.device, dtype)
        if kind == "folded":
            fold(m, provider)
        else:
            m.train(kind == "train")
        return m, m, reset

    point.modes(KERNEL, MODES, tools.Modules(make), providers, bytes_per_element_step, state=state, extras=extras,
                out_key="spikes")


def main(argv=None) -> list[dict]:
    return tools.run_sweep(__doc__, KERNEL, grid, run_point, argv).rec.rows


if __name__ == "__main__":
    main()
