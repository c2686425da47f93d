"""Every snnorm module class, built small, with an input that fits it: the catalogue the
class-wide tests (validation, dtype policy, empty sequences, deepcopy) run over.

Also ``snapshot`` / ``assert_unchanged``: what a call could change (state_dict tensors,
memories, the MPBN adaptation momentum), to check that a rejected call changed nothing.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from snnorm import functional, layer, neuron

T, N, C, H, W = 2, 3, 4, 3, 3


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], nn.Module]
    shape: tuple[int, ...]
    multi_step: bool = True
    #: has floating parameters/buffers, so the dtype policy applies
    has_params: bool = True
    #: backends to run on ("triton" runs under the interpreter on CPU)
    backends: tuple[str, ...] = ("torch",)

    def build(self, backend: str = "torch") -> nn.Module:
        torch.manual_seed(0)
        module = self.make()
        if backend != "torch":
            functional.set_backend(module, backend)
        return module

    def input(self, dtype=torch.float32, device="cpu", T_override: int | None = None) -> torch.Tensor:
        torch.manual_seed(1)
        shape = self.shape if T_override is None or not self.multi_step else (T_override, *self.shape[1:])
        return (torch.randn(shape) * 2 + 0.5).to(dtype=dtype, device=device)


def _folded_mpbn(**kw) -> nn.Module:
    node = neuron.MPBNLIFNode(out_channels=C, step_mode="m", **kw)
    node(torch.randn(T, N, C, H, W))
    functional.reset_net(node)
    node.eval()
    node.re_parameterize_v_threshold(running_stats=True)
    return node.train()  # test-time adaptation: its state moves on every call


BOTH = ("torch", "triton")
# normalization layers and neurons: stateful or with parameters
NORM_CASES = [
    Case("BatchNorm1d-m", lambda: layer.BatchNorm1d(C, step_mode="m"), (T, N, C, 5)),
    Case("BatchNorm2d-m", lambda: layer.BatchNorm2d(C, step_mode="m", momentum=None), (T, N, C, H, W),
         backends=BOTH),
    Case("BatchNorm3d-m", lambda: layer.BatchNorm3d(C, step_mode="m"), (T, N, C, 2, H, W)),
    Case("BatchNorm2d-s", lambda: layer.BatchNorm2d(C), (N, C, H, W), multi_step=False),
    Case("tdBN1d", lambda: layer.ThresholdDependentBatchNorm1d(1.0, 0.5, C), (T, N, C)),
    Case("tdBN2d", lambda: layer.ThresholdDependentBatchNorm2d(1.0, 0.5, C, momentum=None), (T, N, C, H, W),
         backends=BOTH),
    Case("tdBN3d", lambda: layer.ThresholdDependentBatchNorm3d(1.0, 0.5, C), (T, N, C, 2, H, W)),
    Case("TEBN1d", lambda: layer.TemporalEffectiveBatchNorm1d(T, C), (T, N, C, 5), backends=BOTH),
    Case("TEBN2d", lambda: layer.TemporalEffectiveBatchNorm2d(T, C, momentum=None), (T, N, C, H, W), backends=BOTH),
    Case("TEBN3d", lambda: layer.TemporalEffectiveBatchNorm3d(T, C), (T, N, C, 2, H, W)),
    Case("TAB1d", lambda: layer.TemporalAccumulatedBatchNorm1d(T, C), (T, N, C, 5), backends=BOTH),
    Case("TAB2d", lambda: layer.TemporalAccumulatedBatchNorm2d(T, C, momentum=None), (T, N, C, H, W), backends=BOTH),
    Case("TAB2d-s", lambda: layer.TemporalAccumulatedBatchNorm2d(T, C, step_mode="s"), (N, C, H, W),
         multi_step=False, backends=BOTH),
    Case("BNTT1d-s", lambda: layer.BatchNormThroughTime1d(T, C), (N, C), multi_step=False),
    Case("BNTT2d-m", lambda: layer.BatchNormThroughTime2d(T, C, step_mode="m", momentum=None), (T, N, C, H, W),
         backends=BOTH),
    Case("BNTT3d-m", lambda: layer.BatchNormThroughTime3d(T, C, step_mode="m"), (T, N, C, 2, H, W)),
    Case("BatchNormTT1d-m", lambda: layer.BatchNormTT1d(C, T, step_mode="m"), (T, N, C),
         backends=BOTH),
    Case("BatchNormTT2d-s", lambda: layer.BatchNormTT2d(C, T), (N, C, H, W), multi_step=False),
    Case("GroupNorm-m", lambda: layer.GroupNorm(2, C, step_mode="m"), (T, N, C, H, W)),
    Case("NeuNorm-m", lambda: layer.NeuNorm(C, H, W, step_mode="m"), (T, N, C, H, W)),
    Case("NeuNorm-s", lambda: layer.NeuNorm(C, H, W), (N, C, H, W), multi_step=False),
    Case("WSConv2d-m", lambda: layer.WSConv2d(C, C, 3, padding=1, step_mode="m"), (T, N, C, H, W)),
    Case("WSLinear-m", lambda: layer.WSLinear(C, 5, step_mode="m"), (T, N, C)),
    Case("LIFNode-m", lambda: neuron.LIFNode(step_mode="m"), (T, N, C, H, W), has_params=False, backends=BOTH),
    Case("IFNode-m", lambda: neuron.IFNode(step_mode="m", v_reset=None), (T, N, C), has_params=False, backends=BOTH),
    Case("MPBNLIFNode-m", lambda: neuron.MPBNLIFNode(out_channels=C, step_mode="m"), (T, N, C, H, W), backends=BOTH),
    Case("MPBNLIFNode-1d-s", lambda: neuron.MPBNLIFNode(out_features=C), (N, C), multi_step=False, backends=BOTH),
    Case(
        "MPBNLIFNode-learnable-raw",
        lambda: neuron.MPBNLIFNode(out_channels=C, step_mode="m", learnable_vth=True, carry="raw", v_reset=None),
        (T, N, C, H, W),
    ),
    Case("MPBNLIFNode-folded-adapting", _folded_mpbn, (T, N, C, H, W), backends=BOTH),
]

# stateless multi-step wrappers and containers (only the empty-sequence check concerns them)
WRAPPER_CASES = [
    Case("Conv2d-m", lambda: layer.Conv2d(C, C, 3, padding=1, step_mode="m"), (T, N, C, H, W)),
    Case("Conv1d-m", lambda: layer.Conv1d(C, C, 3, step_mode="m"), (T, N, C, 5)),
    Case("Linear-m", lambda: layer.Linear(C, 5, step_mode="m"), (T, N, C)),
    Case("Flatten-m", lambda: layer.Flatten(step_mode="m"), (T, N, C, H, W)),
    Case("MaxPool2d-m", lambda: layer.MaxPool2d(2, step_mode="m"), (T, N, C, 4, 4)),
    Case("AvgPool1d-m", lambda: layer.AvgPool1d(2, step_mode="m"), (T, N, C, 4)),
    Case("AdaptiveAvgPool2d-m", lambda: layer.AdaptiveAvgPool2d(1, step_mode="m"), (T, N, C, H, W)),
    Case("Dropout-m", lambda: layer.Dropout(0.5, step_mode="m"), (T, N, C)),
    Case("Dropout2d-m", lambda: layer.Dropout2d(0.5, step_mode="m"), (T, N, C, H, W)),
    Case("SeqToANNContainer", lambda: layer.SeqToANNContainer(layer.Conv2d(C, C, 1)), (T, N, C, H, W)),
    Case(
        "MultiStepContainer",
        lambda: layer.MultiStepContainer(layer.Conv2d(C, C, 1), neuron.LIFNode()),
        (T, N, C, H, W),
    ),
]


def with_backends(cases):
    """pytest params ``(case, backend)`` for every backend each case runs on."""
    import pytest

    return [pytest.param(case, backend, id=f"{case.name}-{backend}") for case in cases for backend in case.backends]


# -- what a call could change ------------------------------------------------------------


def snapshot(module: nn.Module):
    """Everything a call could change: state_dict tensors and memories."""
    state = {k: v.clone() for k, v in module.state_dict().items()}
    memories = {}
    for name, m in module.named_modules():
        if hasattr(m, "named_memories"):
            for key, value in m.named_memories():
                memories[f"{name}.{key}"] = value.clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)
    return state, memories


def assert_unchanged(module, before):
    state, memories = snapshot(module)
    assert state.keys() == before[0].keys()
    for key, value in before[0].items():
        assert torch.equal(state[key], value), f"{key} changed by a rejected call"
    assert memories.keys() == before[1].keys()
    for key, value in before[1].items():
        now = memories[key]
        if isinstance(value, torch.Tensor):
            assert torch.equal(now, value), f"memory {key} changed by a rejected call"
        else:
            assert now == value, f"memory {key} changed by a rejected call: {value!r} -> {now!r}"
