"""One full training step of a small convolutional SNN with TEBN + MPBN-LIF layers.

Network (multi-step, ``[T, N, 3, H, W]`` in, class logits averaged over T)::

    Conv2d(3, w1, 3, pad 1, no bias) → TEBN(T, w1) → MPBNLIFNode(w1)
    → Conv2d(w1, w2, 3, stride 2, pad 1, no bias) → TEBN(T, w2) → MPBNLIFNode(w2)
    → AdaptiveAvgPool2d(1) → Flatten → Linear(w2, 10)

A step is ``zero_grad → reset_net → forward → cross-entropy → backward → SGD(momentum
0.9).step``. Providers, same weights and inputs: ``snnorm-torch`` (``snnorm.layer`` /
``snnorm.neuron``, torch backend), ``snnorm-torch-compile`` (``torch.compile`` of the
network; loss and optimizer eager), ``snnorm-triton`` (``set_backend(net, "triton")``,
CUDA only) and ``spikingjelly`` (the same network from
``spikingjelly.activation_based``; weights loaded from snnorm's ``state_dict``).
Agreement is checked on one forward+backward (logits, loss, every parameter gradient,
running statistics) before timing. No byte model: the convolutions are compute-bound.

Widths: quick/smoke (w1, w2) = (16, 32), full (64, 128).
Run: ``python -m perf.bench_train_step [--full | --smoke] [--no-compile]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from perf import tools  # noqa: E402

KERNEL = "train_step"
CLASSES = 10

# (T, N, H=W) points and the widths of the two conv layers.
GRID = {
    "smoke": {"points": [(2, 2, 8)], "widths": (4, 8), "dtypes": ("fp32",)},
    "quick": {"points": [(2, 8, 32), (4, 8, 32), (8, 8, 32)], "widths": (16, 32), "dtypes": ("fp32",)},
    "full": {
        "points": [(1, 32, 32), (2, 32, 32), (4, 32, 32), (8, 32, 32), (16, 32, 32), (4, 128, 32)],
        "widths": (64, 128),
        "dtypes": ("fp32", "bf16"),
    },
}


def compile_here(name: str, T: int, compile_all: bool) -> bool:
    return compile_all or name != "quick" or T == 4


def make_net(provider: str, T: int, widths) -> tuple[nn.Module, callable]:
    """(network, reset function) of ``provider``'s library."""
    w1, w2 = widths
    if provider == tools.SPIKINGJELLY:
        from spikingjelly.activation_based import functional as fn
        from spikingjelly.activation_based import layer as L
        from spikingjelly.activation_based import neuron as Nn
    else:
        from snnorm import functional as fn
        from snnorm import layer as L
        from snnorm import neuron as Nn
    m = "m"
    net = nn.Sequential(
        L.Conv2d(3, w1, 3, padding=1, bias=False, step_mode=m),
        L.TemporalEffectiveBatchNorm2d(T, w1),
        Nn.MPBNLIFNode(tau=2.0, out_channels=w1, step_mode=m),
        L.Conv2d(w1, w2, 3, stride=2, padding=1, bias=False, step_mode=m),
        L.TemporalEffectiveBatchNorm2d(T, w2),
        Nn.MPBNLIFNode(tau=2.0, out_channels=w2, step_mode=m),
        L.AdaptiveAvgPool2d(1, step_mode=m),
        L.Flatten(step_mode=m),
        L.Linear(w2, CLASSES, step_mode=m),
    )
    if provider == tools.SNNORM_TRITON:
        fn.set_backend(net, "triton")
    return net, fn.reset_net


class StepRunner(tools.Runner):
    def __init__(self, net, call, reset, state, x, labels):
        self.net, self.call, self.reset, self.state = net, call, reset, state
        self.x, self.labels = x, labels
        self.opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        self.grad_to_none = []

    def _loss(self):
        self.reset(self.net)
        logits = self.call(self.x).mean(0)
        return logits, F.cross_entropy(logits.float(), self.labels)

    def check(self):
        self.net.load_state_dict(self.state)
        self.opt.zero_grad(set_to_none=True)
        logits, loss = self._loss()
        loss.backward()
        out = {"logits": logits.detach().clone(), "loss": loss.detach().reshape(1).clone()}
        for name, p in self.net.named_parameters():
            out[f"grad:{name}"] = p.grad.detach().clone()
        for name, b in self.net.named_buffers():
            if "running" in name:
                out[name] = b.detach().clone()
        self.opt.zero_grad(set_to_none=True)
        return out

    def step(self):
        self.opt.zero_grad(set_to_none=True)
        _, loss = self._loss()
        loss.backward()
        self.opt.step()


def grid(name: str):
    """(widths label, [T, N, 3, H, W], dtype) points of a grid."""
    spec = GRID[name]
    for dt in spec["dtypes"]:
        for T, N, HW in spec["points"]:
            yield f"w{spec['widths'][0]}", (T, N, 3, HW, HW), dt


def run_point(session, shape, dtype, providers, seed=0):
    """One training step per provider, same weights and inputs."""
    env, (T, N, _, HW, _) = session.env, shape
    widths = GRID[session.grid_name]["widths"]
    tools.seed_all(seed)
    ref_net, _ = make_net(tools.SNNORM_TORCH, T, widths)
    state = {k: v.clone() for k, v in ref_net.state_dict().items()}
    x = torch.randn(shape, device=env.device).to(dtype)
    labels = torch.randint(0, CLASSES, (N,), device=env.device)
    if providers.get(tools.SNNORM_COMPILE, False) is True:
        tools.reset_compiler()

    def build(provider):
        base = tools.SNNORM_TORCH if provider == tools.SNNORM_COMPILE else provider
        net, reset = make_net(base, T, widths)
        net.load_state_dict(state)
        net = net.to(device=env.device, dtype=dtype).train()
        call = tools.compile_module(net) if provider == tools.SNNORM_COMPILE else net
        return StepRunner(net, call, reset, state, x, labels)

    tools.bench_case(session.rec, kernel=KERNEL, mode="train_step", shape=tools.shape_str(shape), dtype=dtype,
                     builders=tools.builders_for(providers, build), reference=tools.SNNORM_TORCH,
                     budget=session.budget)


def providers(session, shape, dt):
    """The quick grid compiles T = 4 only."""
    return tools.providers_for(
        session.env, session.args, compile_here(session.grid_name, shape[0], session.args.compile_all),
        "quick grid compiles T=4 only (about a minute per point on CPU); --full compiles every point",
    )


def main(argv=None) -> list[dict]:
    return tools.run_sweep(__doc__, KERNEL, grid, run_point, argv, providers=providers).rec.rows


if __name__ == "__main__":
    main()
