"""What the tests share: the module catalogue, the "a rejected call changes nothing" checks,
random inputs of the batch-statistics norms and the hypothesis strategies that draw them.

* :data:`NORM_CASES` / :data:`WRAPPER_CASES`: every snnorm module class, built small, with an
  input that fits it (the class-wide tests: validation, dtype policy, empty sequences,
  deepcopy run over them); :func:`with_backends` makes their pytest params.
* :func:`snapshot`, :func:`assert_unchanged`, :func:`rejects`: what a call could change
  (state_dict tensors, memories, the MPBN adaptation momentum), and that a rejected call
  raised the expected error and changed none of it.
* :func:`norm_case`: one call's random inputs for a batch-statistics norm (BN/tdBN, TEBN,
  BNTT, TAB); :func:`norm_params`: the hypothesis strategy that draws its arguments.
* :func:`assert_flips_placed`: spikes that differ between two implementations must sit at
  the threshold (the reference's firing variable within a few eps of 0, recorded by
  :class:`RecordingSurrogate`); it returns the units that stay comparable past a flip.

Where the tests run is tests/devices.py (imported by conftest.py before triton is), the
tolerances are tests/tolerances.py.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn as nn
from devices import DEVICE, SIZES
from hypothesis import strategies as st
from tolerances import FLIP_MARGIN_EPS, comparable_mask, flip_margin

from snnorm import functional, layer, neuron, surrogate

# ------------------------------------------------------------------------ the module catalogue

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
    Case("LayerNorm-m", lambda: layer.LayerNorm(C, step_mode="m"), (T, N, 5, C), backends=BOTH),
    Case("LayerNorm-2d-s", lambda: layer.LayerNorm((H, W), bias=False), (N, C, H, W), multi_step=False),
    Case("RMSNorm-m", lambda: layer.RMSNorm(C, eps=1e-6, step_mode="m"), (T, N, C), backends=BOTH),
    Case("RMSNorm-s", lambda: layer.RMSNorm(C), (N, 5, C), multi_step=False),  # eps=None: torch's default
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
    return [pytest.param(case, backend, id=f"{case.name}-{backend}") for case in cases for backend in case.backends]


# ------------------------------------------------------------------- a rejected call changes nothing


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


def rejects(module, x, exc, *patterns) -> str:
    """``module(x)`` raises ``exc`` whose message contains every pattern, and nothing that a call
    could change has changed; returns the message."""
    before = snapshot(module)
    with pytest.raises(exc) as info:
        module(x)
    for pattern in patterns:
        assert pattern in str(info.value), f"{pattern!r} not in message: {info.value}"
    assert_unchanged(module, before)
    return str(info.value)


# --------------------------------------------------------------- random inputs of the norms

#: the batch-statistics norms: statistics per channel over all steps (BN/tdBN, TEBN with its
#: per-step scale p) or per step (BNTT: γ_t and no β; TAB: prefix statistics, γ_t, β_t, p_t)
NORM_RULES = ("batch_norm", "tebn", "bntt", "tab")
PER_STEP_RULES = ("bntt", "tab")


def norm_case(rule: str, shape, seed: int, *, dtype=torch.float32, param_dtype=None, grad_dtype=None,
              affine: str = "both", running: bool = True, noncontig: bool = False, mean_shift: float = 0.0,
              device=DEVICE) -> dict:
    """Random inputs of one call of the norm ``rule`` on ``shape`` = [T, N, C, *spatial].

    ``x = 2·randn + mean_shift`` and the upstream gradient ``grad`` (``noncontig``: a
    [N, T, ...] tensor seen as [T, N, ...]) in ``dtype`` (``grad_dtype``, default ``dtype``);
    in ``param_dtype`` (default ``dtype``; float32 with a bf16 input is mixed precision) the
    parameters and running statistics, per channel ``[C]`` or per step and channel ``[T, C]``
    (:data:`PER_STEP_RULES`): ``w`` (γ) and ``b`` (β; never for BNTT) as ``affine`` says
    (``both``, ``weight``, ``bias``, ``none``), ``p`` ([T], TEBN and TAB), ``rm``/``rv`` when
    ``running``, and ``momentum``, one factor per statistics row (per step: 0.1 + 0.05·t).
    Keys: x, grad, w, b, p, rm, rv, momentum (absent tensors are None).
    """
    if rule not in NORM_RULES:
        raise ValueError(f"rule must be one of {NORM_RULES}, got {rule!r}")
    gen = torch.Generator().manual_seed(seed)
    T, N, C, *spatial = shape
    if noncontig:
        x = (torch.randn((N, T, C, *spatial), generator=gen) * 2 + mean_shift).transpose(0, 1)
        grad = torch.randn((N, T, C, *spatial), generator=gen).transpose(0, 1)
    else:
        x = torch.randn(shape, generator=gen) * 2 + mean_shift
        grad = torch.randn(shape, generator=gen)
    rows = (T, C) if rule in PER_STEP_RULES else (C,)
    w = torch.randn(rows, generator=gen) if affine in ("both", "weight") else None
    b = torch.randn(rows, generator=gen) if affine in ("both", "bias") and rule != "bntt" else None
    p = torch.rand(T, generator=gen) * 2 - 0.5 if rule in ("tebn", "tab") else None
    rm = torch.randn(rows, generator=gen) if running else None
    rv = torch.rand(rows, generator=gen) + 0.5 if running else None
    momentum = [0.1 + 0.05 * t for t in range(T)] if rule in PER_STEP_RULES else [0.1]
    cast = lambda t, d: None if t is None else t.to(device=device, dtype=d)  # noqa: E731 (keeps the strides)
    param_dtype = param_dtype or dtype
    return dict(x=cast(x, dtype), grad=cast(grad, grad_dtype or dtype), w=cast(w, param_dtype), b=cast(b, param_dtype),
                p=cast(p, param_dtype), rm=cast(rm, param_dtype), rv=cast(rv, param_dtype), momentum=momentum)


LOWP = (torch.float16, torch.bfloat16)


@st.composite
def norm_params(draw, rule: str, dtypes, max_T: int = 6, max_spatial_dims: int = 2) -> dict:
    """The keyword arguments of :func:`norm_case` (``shape`` included) and ``training``.

    On the CPU prime C (up to 11) and odd spatial sizes reach the interpreter's masks and tile
    loops; on a GPU the wide pools of tests/devices.py. A low-precision ``dtype`` draws float32
    or its own ``param_dtype``. Batch statistics (training, or no running statistics) get at
    least two values per channel (per step for BNTT): one value is rejected, tested apart.
    """
    if SIZES.gpu:
        T, N, C, *spatial = draw(SIZES.shapes(min_per_channel=2))
    else:
        T = draw(st.integers(1, max_T))
        N = draw(st.integers(1, 5))
        C = draw(st.sampled_from([1, 2, 3, 5, 7, 11]))
        spatial = draw(st.lists(st.sampled_from([1, 2, 3, 5, 7]), min_size=0, max_size=max_spatial_dims))
    dtype = draw(st.sampled_from(dtypes))
    params = dict(
        dtype=dtype,
        param_dtype=draw(st.sampled_from([dtype, torch.float32])) if dtype in LOWP else dtype,
        affine=draw(st.sampled_from(["weight", "none"] if rule == "bntt" else ["both", "none", "weight", "bias"])),
        running=draw(st.booleans()),
        noncontig=draw(st.booleans()),
        mean_shift=draw(st.sampled_from([0.0, 3.0, -20.0])),
        training=draw(st.booleans()),
    )
    per_channel = N * math.prod(spatial) * (1 if rule == "bntt" else T)
    if (params["training"] or not params["running"]) and per_channel < 2:
        N = 2
    return dict(shape=(T, N, C, *spatial), **params)


# ------------------------------------------------------------- constructors given a bad argument
# One table for tests/test_validation.py (every row refused with a message naming the argument),
# tests/test_peer_compat.py (eps = 0 taken by every EPS_CONSTRUCTORS entry) and
# tests/test_layer_checks.py (where spikingjelly asserts instead).

#: every constructor that takes an eps and accepts eps = 0 (running statistics in eval, weight
#: standardisation), as ``make(eps)``
EPS_CONSTRUCTORS = {
    "BatchNorm1d": lambda eps: layer.BatchNorm1d(C, eps=eps),
    "BatchNorm2d": lambda eps: layer.BatchNorm2d(C, eps=eps),
    "BatchNorm3d": lambda eps: layer.BatchNorm3d(C, eps=eps),
    "tdBN2d": lambda eps: layer.ThresholdDependentBatchNorm2d(1.0, 0.5, C, eps=eps),
    "TEBN3d": lambda eps: layer.TemporalEffectiveBatchNorm3d(T, C, eps=eps),
    "BNTT3d": lambda eps: layer.BatchNormThroughTime3d(T, C, eps=eps),
    "BatchNormTT1d": lambda eps: layer.BatchNormTT1d(C, T, eps=eps),
    "TAB1d": lambda eps: layer.TemporalAccumulatedBatchNorm1d(T, C, eps=eps),
    "WSConv2d": lambda eps: layer.WSConv2d(C, C, 3, eps=eps),
    "WSLinear": lambda eps: layer.WSLinear(C, C, eps=eps),
}
#: eps values every constructor refuses
BAD_EPS = (-1e-5, math.nan, math.inf, -math.inf)

#: (constructor, exception, text its message must hold): each row one bad argument
BAD_CONSTRUCTORS = [
    # (constructor, exception, text of the message): the argument named as ": <argument> must"
    *[
        row
        for cls in (layer.BatchNorm1d, layer.BatchNorm2d, layer.BatchNorm3d)
        for row in [
            (lambda cls=cls: cls(0), ValueError, ": num_features must"),
            (lambda cls=cls: cls(2.5), TypeError, ": num_features must"),
            (lambda cls=cls: cls(C, momentum=1.1), ValueError, ": momentum must"),
            (lambda cls=cls: cls(C, momentum="0.1"), TypeError, ": momentum must"),
        ]
    ],
    *[
        row
        for cls in (layer.ThresholdDependentBatchNorm1d, layer.ThresholdDependentBatchNorm2d,
                    layer.ThresholdDependentBatchNorm3d)
        for row in [
            (lambda cls=cls: cls(1.0, 0.5, 0), ValueError, ": num_features must"),
            (lambda cls=cls: cls(1.0, 0.5, C, momentum=-0.5), ValueError, ": momentum must"),
            (lambda cls=cls: cls(1.0, math.inf, C), ValueError, ": v_th must"),
            (lambda cls=cls: cls(math.nan, 0.5, C), ValueError, ": alpha must"),
        ]
    ],
    *[
        row
        for cls in (layer.TemporalEffectiveBatchNorm1d, layer.TemporalEffectiveBatchNorm2d,
                    layer.TemporalEffectiveBatchNorm3d)
        for row in [
            (lambda cls=cls: cls(0, C), ValueError, ": T must"),
            (lambda cls=cls: cls(2.0, C), TypeError, ": T must"),
            (lambda cls=cls: cls(2, 0), ValueError, ": num_features must"),
            (lambda cls=cls: cls(2, C, momentum=2.0), ValueError, ": momentum must"),
        ]
    ],
    *[
        row
        for cls in (layer.BatchNormThroughTime1d, layer.BatchNormThroughTime2d, layer.BatchNormThroughTime3d)
        for row in [
            (lambda cls=cls: cls(-1, C), ValueError, ": T must"),
            (lambda cls=cls: cls(2, 0), ValueError, ": num_features must"),
            (lambda cls=cls: cls(2, C, momentum=-1.0), ValueError, ": momentum must"),
        ]
    ],
    *[
        row
        for cls in (layer.BatchNormTT1d, layer.BatchNormTT2d)
        for row in [
            (lambda cls=cls: cls(C, 0), ValueError, ": time_steps must"),
            (lambda cls=cls: cls(0, 2), ValueError, ": input_features must"),
            (lambda cls=cls: cls(C, 2, momentum=1.01), ValueError, ": momentum must"),
        ]
    ],
    (lambda: layer.GroupNorm(0, C), ValueError, ": num_groups must"),
    (lambda: layer.GroupNorm(2, 0), ValueError, ": num_channels must"),
    (lambda: layer.NeuNorm(0, 3, 3), ValueError, ": in_channels must"),
    (lambda: layer.NeuNorm(C, 0, 3), ValueError, ": height must"),
    (lambda: layer.NeuNorm(C, 3, 3, k=1.5), ValueError, ": k must"),
    (lambda: layer.WSConv2d(0, C, 3), ValueError, ": in_channels must"),
    (lambda: layer.WSLinear(C, 0), ValueError, ": out_features must"),
    (lambda: neuron.LIFNode(v_threshold=math.inf), ValueError, ": v_threshold must"),
    (lambda: neuron.LIFNode(v_threshold=math.nan), ValueError, ": v_threshold must"),
    (lambda: neuron.LIFNode(v_reset=-math.inf), ValueError, ": v_reset must"),
    (lambda: neuron.LIFNode(tau=math.nan), ValueError, ": tau must"),
    (lambda: neuron.IFNode(v_threshold="1"), TypeError, ": v_threshold must"),
    (lambda: neuron.MPBNLIFNode(out_channels=0), ValueError, ": out_channels must"),
    (lambda: neuron.MPBNLIFNode(out_features=2.0), TypeError, ": out_features must"),
    (lambda: neuron.MPBNLIFNode(out_features=C, v_threshold=math.nan), ValueError, ": v_threshold must"),
    (lambda: neuron.MPBNLIFNode(out_features=C, bn_momentum=1.5), ValueError, ": bn_momentum must"),
    (lambda: neuron.MPBNLIFNode(out_features=C, bn_decay_momentum=-0.1), ValueError, ": bn_decay_momentum must"),
    (lambda: neuron.MPBNLIFNode(out_features=C, bn_min_momentum=2.0), ValueError, ": bn_min_momentum must"),
    (lambda: neuron.MPBNLIFNode(out_features=C, mpbn=1), TypeError, ": mpbn must"),
    (lambda: surrogate.Sigmoid(alpha=0.0), ValueError, ": alpha must"),
    (lambda: surrogate.ATan(alpha=math.inf), ValueError, ": alpha must"),
    # step modes, containers, dropout and tdBN's affine (spikingjelly asserts, tests/test_layer_checks.py)
    (lambda: layer.ThresholdDependentBatchNorm2d(1.0, 0.5, C, affine=False), ValueError, "affine=True"),
    (lambda: layer.ThresholdDependentBatchNorm2d(1.0, 0.5, C, step_mode="s"), ValueError, "step_mode"),
    (lambda: layer.TemporalEffectiveBatchNorm2d(0, C), ValueError, "positive int"),
    (lambda: layer.TemporalEffectiveBatchNorm2d(T, C, step_mode="s"), ValueError, "step_mode"),
    (lambda: layer.BatchNormThroughTime2d(0, C), ValueError, "positive int"),
    (lambda: layer.BatchNormTT1d(C, -1), ValueError, "positive int"),
    (lambda: layer.BatchNorm2d(C, step_mode="x"), ValueError, "step_mode"),
    (lambda: layer.Conv2d(C, 4, 3, step_mode="multi"), ValueError, "step_mode"),
    (lambda: layer.Dropout(1.0), ValueError, "[0, 1)"),
    (lambda: layer.Dropout(-0.1), ValueError, "[0, 1)"),
    (lambda: layer.SeqToANNContainer(layer.Conv2d(C, 4, 3, step_mode="m")), ValueError, "step_mode='s'"),
    (lambda: layer.MultiStepContainer(layer.BatchNorm2d(4, step_mode="m")), ValueError, "step_mode='s'"),
    # eps: every constructor that takes it refuses these (GroupNorm refuses 0 too: test_careless_users.py)
    *[(lambda make=make, bad=bad: make(bad), ValueError, f": eps must be a finite number >= 0, got {bad}")
      for make in EPS_CONSTRUCTORS.values() for bad in BAD_EPS],
    (lambda: layer.GroupNorm(2, C, eps=-1e-5), ValueError, ": eps must be a finite number >= 0"),
]


# ------------------------------------------------------------------------ spikes that flip


class RecordingSurrogate(nn.Module):
    """Wraps a neuron's surrogate and records the firing variable ``z`` of each call (the
    reference's ``h − θ``, normalised for MPBN, sign-folded for a folded threshold) before
    calling it; :meth:`firing_variable` stacks them in the spikes' layout. Put it on the
    reference only (``node.surrogate_function = RecordingSurrogate(node.surrogate_function)``
    after the copy that runs the other backend was made)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.zs: list[torch.Tensor] = []

    def forward(self, z):
        self.zs.append(z.detach())
        return self.inner(z)

    def firing_variable(self, spikes: torch.Tensor) -> torch.Tensor:
        """The recorded z of every spike, shaped as ``spikes`` ([T, ...]: one call a step)."""
        if not self.zs:
            raise AssertionError("the reference never called its surrogate: nothing recorded")
        return torch.stack(self.zs).reshape(spikes.shape)


#: per dtype, the largest |z| / (eps·scale) of a flipped spike seen in this process (informative:
#: how close to the margin of tolerances.FLIP_MARGIN_EPS the flips come; printed by some tests)
FLIPS_SEEN: dict[str, float] = {}


def assert_flips_placed(what: str, got_s: torch.Tensor, want_s: torch.Tensor, z: torch.Tensor, dtype: torch.dtype,
                        channel_coupled: bool) -> torch.Tensor:
    """Spikes ``got_s`` against the reference's ``want_s``: every spike that differs among the
    comparable ones (each unit up to and including its first flip, tolerances.comparable_mask)
    must be placed at the threshold: the reference's firing variable ``z`` there lies within
    :func:`tolerances.flip_margin` (FLIP_MARGIN_EPS[dtype] eps of ``dtype``, times
    max(1, max|z|)) of 0. No share of flips is allowed anywhere else. Returns the clean units
    ([N, C, *spatial], True where no flip reached): compare every other quantity on them, with
    :func:`tolerances.comparable_entries`, so that the comparison continues past a flip."""
    flipped, spike_mask, clean = comparable_mask(got_s, want_s, channel_coupled=channel_coupled)
    compared = flipped & spike_mask
    if bool(compared.any()):
        z = z.detach().to(torch.float64).to(compared.device)
        margin, unit = flip_margin(dtype, z)
        dist = z.abs()[compared]
        key = str(dtype).replace("torch.", "")
        FLIPS_SEEN[key] = max(FLIPS_SEEN.get(key, 0.0), dist.max().item() / unit)
        far = int((dist > margin).sum())
        if far:
            raise AssertionError(
                f"{what}: {far} of {int(compared.sum())} flipped spikes lie away from the threshold: "
                f"|z| up to {dist.max().item():.3e} > margin {margin:.3e} "
                f"({FLIP_MARGIN_EPS[dtype]} eps of {dtype} × max(1, max|z|))"
            )
    return clean
