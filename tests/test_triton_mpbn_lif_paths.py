"""Corners of the Triton LIF / MPBN-LIF ops the property tests do not reach.

- the backward with no gradient for the final membrane (gv None) on 3-d and 4-d inputs;
- LIF / IF with no channel dimension ([T, N] multi-step, [N] single-step);
- double backward (create_graph=True) names its limit.
"""

from __future__ import annotations

import pytest
import torch
from devices import SLOW_ON_CPU
from tolerances import EXACT, LARGE_MEAN_FP32, TRITON_FP64, TRITON_VS_TORCH_FP32, TRITON_VS_TORCH_GRAD_FP32

pytest.importorskip("triton")

from snnorm import neuron  # noqa: E402
from snnorm import surrogate as sg  # noqa: E402
from snnorm.backends import get_ops  # noqa: E402
from snnorm.backends import torch_backend as ref  # noqa: E402
from snnorm.backends import triton_backend as K  # noqa: E402
from snnorm.functional import set_backend  # noqa: E402
from snnorm.kernels import lif as lif_kernels  # noqa: E402
from snnorm.kernels import mpbn_lif_train as train_kernels  # noqa: E402
from snnorm.params import (  # noqa: E402
    AdaptParameters, BNKernelParameters, BNStatistics, LIFParameters, MPBNParameters,
)

LIF = LIFParameters(sg.Sigmoid(), tau=2.0, decay_input=False, v_reset=0.0, detach_reset=False)
NORM = MPBNParameters(eps=1e-5, carry="normalized")
TRAIN = BNStatistics(training=True, momentum=0.1, batches_tracked=0)
#: the kernels' plain-value twin of LIF with the sigmoid kernel
LIF_K = LIF.for_kernel("sigmoid", 4.0)


def _triton():
    return get_ops("triton")


@pytest.mark.parametrize("shape", [(3, 4, 2), (3, 4, 2, 5), (2, 3, 2, 3, 3)])
def test_lif_backward_without_final_membrane_gradient(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    v = torch.zeros(shape[1:])
    th = torch.full((shape[2],), 0.4)
    lif = LIF_K.to_op_args()
    _, _, h = K.lif_elementwise_op(x, v, th, None, None, None, None, None, *lif, 0, False, True, torch.float32)
    gs = torch.randn(shape, generator=g)
    flags = (*lif, 0, False, True)
    without = K.lif_elementwise_bwd_op(gs, None, h, torch.float32, th, None, None, None, None, None, *flags)
    zeros = K.lif_elementwise_bwd_op(gs, torch.zeros(shape[1:]), h, torch.float32, th, None, None, None, None, None, *flags)
    for a, b in zip(without, zeros):
        torch.testing.assert_close(a, b, **EXACT)


@pytest.mark.parametrize("shape", [(3, 4, 2), (3, 4, 2, 5)])
def test_mpbn_lif_resident_backward_without_final_membrane_gradient(shape):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g)
    v = torch.zeros(shape[1:])
    C = shape[2]
    w, b, th = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g), torch.full((C,), 0.4)
    lif = LIF._replace(surrogate=sg.ATan()).for_kernel("atan", 2.0).to_op_args()
    bn = BNKernelParameters(1e-5, 0.1, 0).to_op_args()
    _, _, h, mean, rstd, _, _ = K.mpbn_lif_train_op(x, v, w, b, None, None, th, *bn, *lif, True, True, torch.float32, "")
    cfg = (*lif, True, True, "")
    gs = torch.randn(shape, generator=g)
    without = K.mpbn_lif_train_bwd_op(gs, None, h, torch.float32, mean, rstd, w, b, th, *cfg)
    zeros = K.mpbn_lif_train_bwd_op(gs, torch.zeros(shape[1:]), h, torch.float32, mean, rstd, w, b, th, *cfg)
    for a, b_ in zip(without, zeros):
        torch.testing.assert_close(a, b_, **EXACT)


@pytest.mark.parametrize("op", ["lif", "mpbn_lif"])
def test_autograd_with_unused_final_membrane_matches_torch(op):
    x = torch.randn(3, 4, 2, 5, generator=torch.Generator().manual_seed(2)) * 1.5
    v = torch.zeros(4, 2, 5)
    weights = torch.arange(x.numel(), dtype=torch.float32).view(x.shape) / x.numel()
    grads = []
    for ops in (_triton(), ref):
        xr = x.clone().requires_grad_(True)
        if op == "lif":
            s, _ = ops.lif(xr, v, 0.5, LIF)
        else:
            s, _ = ops.mpbn_lif(xr, v, None, None, torch.zeros(2), torch.ones(2), 0.5, LIF, NORM, TRAIN)
        (s * weights).sum().backward()  # v_T unused: its gradient is None, not zeros
        grads.append(xr.grad)
    torch.testing.assert_close(grads[0], grads[1], **TRITON_VS_TORCH_GRAD_FP32)


@pytest.mark.parametrize("op", ["lif", "mpbn_lif", "mpbn_lif_eval"])
def test_autograd_with_unused_spikes_matches_torch(op):
    # only v_T enters the loss: the spike gradient is None and the kernels read no ∂s
    x = torch.randn(3, 4, 2, 5, generator=torch.Generator().manual_seed(5)) * 1.5
    v = torch.zeros(4, 2, 5)
    grads = []
    for ops in (_triton(), ref):
        xr = x.clone().requires_grad_(True)
        if op == "lif":
            _, v_out = ops.lif(xr, v, 0.5, LIF)
        else:
            stats = TRAIN._replace(training=op == "mpbn_lif")
            _, v_out = ops.mpbn_lif(xr, v, None, None, torch.zeros(2), torch.ones(2), 0.5, LIF, NORM, stats)
        (v_out * 1.3).sum().backward()
        grads.append(xr.grad)
    torch.testing.assert_close(grads[0], grads[1], **TRITON_VS_TORCH_GRAD_FP32)


@pytest.mark.parametrize("cls", [neuron.LIFNode, neuron.IFNode])
@pytest.mark.parametrize("step_mode, shape", [("m", (4, 6)), ("s", (6,))])
def test_neuron_without_channel_dim_matches_torch(cls, step_mode, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3)) * 2
    results = []
    for backend in ("torch", "triton"):
        node = cls(step_mode=step_mode)
        set_backend(node, backend)
        xr = x.clone().requires_grad_(True)
        s = node(xr)
        s2 = node(xr * 0.5)  # a second call carries the membrane
        (s * 1.5 + s2).sum().backward()
        results.append((s, s2, node.v, xr.grad))
    for got, want in zip(results[1], results[0]):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, **TRITON_VS_TORCH_FP32)


@pytest.mark.parametrize("op", ["lif", "mpbn_lif"])
def test_double_backward_names_the_limit(op):
    x = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(4), requires_grad=True)
    v = torch.zeros(4, 2)
    if op == "lif":
        s, v_out = _triton().lif(x, v, 0.5, LIF)
        s_ref, v_ref = ref.lif(x, v, 0.5, LIF)
    else:
        s, v_out = _triton().mpbn_lif(x, v, None, None, None, None, 0.5, LIF, NORM, TRAIN)
        s_ref, v_ref = ref.mpbn_lif(x, v, None, None, None, None, 0.5, LIF, NORM, TRAIN)
    # first-order gradients with create_graph=True still work and agree
    (g,) = torch.autograd.grad((s * x).sum() + v_out.sum(), x, create_graph=True)
    (g_ref,) = torch.autograd.grad((s_ref * x).sum() + v_ref.sum(), x, create_graph=True)
    torch.testing.assert_close(g, g_ref, **TRITON_VS_TORCH_GRAD_FP32)
    with pytest.raises(NotImplementedError, match="double backward.*create_graph=True.*torch backend"):
        torch.autograd.grad(g.sum(), x)


# ------------------------------------------------------------------------------------------
# both training paths, every surrogate, int64 offsets, layouts: fp64 against the torch backend
# ------------------------------------------------------------------------------------------

SURROGATES = [sg.Sigmoid(4.0), sg.ATan(2.0), sg.PiecewiseQuadratic(1.0), sg.PiecewiseExp(2.0)]


# the pipelined path runs 3–11 s per case through the interpreter: in the slow set (the
# default run still reaches it through test_triton_mpbn_lif.py's split-path tests)
@pytest.fixture(params=["resident", pytest.param("pipelined", marks=SLOW_ON_CPU)])
def path(request, monkeypatch):
    """Force the MPBN-LIF training path (C is small here, so the default would be pipelined)."""
    if request.param == "resident":
        monkeypatch.setattr(train_kernels, "MIN_PROGRAMS", 1)
    else:  # several tiles per channel, combined in chunks of 2: both Chan combines really combine
        monkeypatch.setattr(train_kernels, "SPLIT_BLOCK", 8)
        monkeypatch.setattr(train_kernels, "SPLIT_MIN_BLOCK", 8)
        monkeypatch.setattr(train_kernels, "MAX_BLOCK_P", 2)
    return request.param


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "transposed":  # spatial dims that cannot merge: the launcher copies
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "channels_last":
        return x.movedim(2, -1).contiguous().movedim(-1, 2)
    return x


def _compare(op, shape, surrogate, layout="contiguous", **kw):
    """Run ``op`` on both backends in fp64 with the same inputs; compare outputs, every gradient and running stats."""
    g = torch.Generator().manual_seed(sum(shape) + len(kw))
    T, N, C = shape[:3]
    x0 = _layout(torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + 0.3, layout)
    v0 = torch.randn(shape[1:], generator=g, dtype=torch.float64) * 0.3
    w0 = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    b0 = torch.randn(C, generator=g, dtype=torch.float64) * 0.2
    th0 = torch.rand(C, generator=g, dtype=torch.float64) * 0.5 + 0.5
    gs = torch.randn(shape, generator=g, dtype=torch.float64)
    results = []
    if kw.get("v_scalar"):  # one value broadcast to every element: the kernels load it once
        v0 = torch.tensor(0.2, dtype=torch.float64).expand(shape[1:])
    for ops in (_triton(), ref):
        x = x0.clone().requires_grad_(True)
        v_leaf = v0.clone().requires_grad_(True) if kw.get("v_grad", True) else v0
        leaves = [x, v_leaf] if kw.get("v_grad", True) else [x]
        out = {}
        lif_params = LIFParameters(surrogate, tau=2.0, decay_input=kw.get("decay_input", False),
                                v_reset=kw.get("v_reset", 0.0), detach_reset=kw.get("detach_reset", False))
        norm = MPBNParameters(eps=1e-5, carry=kw.get("carry", "normalized"))
        if op == "lif":
            s, v = ops.lif(x, v_leaf, 0.6, lif_params)
        elif op == "train":
            w, b, th = (t.clone().requires_grad_(True) for t in (w0, b0, th0))
            leaves += [w, b, th]
            rm, rv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
            stats = BNStatistics(training=True, momentum=kw.get("momentum", 0.1), batches_tracked=3)
            s, v = ops.mpbn_lif(x, v_leaf, w, b, rm, rv, th, lif_params, norm, stats)
            out.update(rm=rm, rv=rv)
        else:  # adaptive fold, forward only
            adapt = AdaptParameters(mode=op, momentum=0.3, decay=0.5, min_momentum=0.05)
            s, v, mu, s2, _ = ops.mpbn_lif_folded(x0, v0, b0.clone(), w0.clone(), w0 * torch.sign(b0), b0, th0, lif_params, norm, adapt)
            out.update(mu=mu, s2=s2)
            leaves = []
        out.update(s=s, v=v)
        if leaves:
            grads = torch.autograd.grad((s * gs).sum() + (v * 0.7).sum(), leaves)
            out.update({f"grad{i}": gr for i, gr in enumerate(grads)})
        results.append(out)
    got, want = results
    assert torch.equal(got["s"], want["s"])
    for key in want:
        # fp64 tensors, but scalars (τ, ε, momentum, α) reach the kernels as fp32: ~1e-7
        torch.testing.assert_close(got[key], want[key], **TRITON_FP64, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize(
    "surrogate, shape",
    [(SURROGATES[0], (3, 5, 2, 3, 3)), (SURROGATES[1], (2, 4, 3, 7)), (SURROGATES[2], (2, 4, 3, 7)), (SURROGATES[3], (3, 5, 2, 3, 3))],
    ids=lambda p: type(p).__name__ if isinstance(p, sg.SurrogateFunctionBase) else "x".join(map(str, p)),
)
def test_training_paths_match_torch_for_every_surrogate(path, surrogate, shape):
    _compare("train", shape, surrogate)


@pytest.mark.parametrize(
    "kw", [dict(carry="raw", v_reset=None, momentum=None), dict(decay_input=True, detach_reset=True, carry="raw")],
)
def test_training_paths_match_torch_raw_carry_and_soft_reset(path, kw):
    _compare("train", (3, 3, 2, 2, 5), sg.ATan(), **kw)


@pytest.mark.parametrize("adapt", ["batch", "running"])
def test_adaptive_fold_paths_match_torch(path, adapt):
    _compare(adapt, (3, 4, 2, 3, 2), sg.Sigmoid(), carry="raw")
    _compare(adapt, (2, 3, 3, 5), sg.Sigmoid(), v_reset=None)


@pytest.mark.parametrize("surrogate", SURROGATES[2:], ids=lambda s: type(s).__name__)
def test_lif_matches_torch_for_new_surrogates(surrogate):
    _compare("lif", (3, 4, 2, 3, 3), surrogate, v_reset=None)


@pytest.mark.parametrize("layout", ["transposed", "channels_last"])
def test_layouts_match_torch(path, layout):
    _compare("train", (2, 3, 2, 4, 3), sg.Sigmoid(), layout=layout)
    _compare("lif", (2, 3, 2, 4, 3), sg.Sigmoid(), layout=layout)


@pytest.mark.parametrize("v_grad", [True, False])
def test_broadcast_initial_membrane_matches_torch(path, v_grad):
    # v = one value (all strides 0): a scalar load; without its gradient ∂v0 is not written
    _compare("train", (3, 4, 2, 3, 3), sg.Sigmoid(), v_scalar=True, v_grad=v_grad)
    _compare("lif", (3, 4, 2, 3, 3), sg.Sigmoid(), v_scalar=True, v_grad=v_grad)


def test_chunked_combine_keeps_precision_with_large_mean(monkeypatch):
    # mean/std = 1e4 in fp32, over 6 tiles combined 2 at a time (3 chunks);
    # the real MAX_BLOCK_P: test_triton_mpbn_lif.py::test_training_paths_at_their_real_thresholds (slow)
    monkeypatch.setattr(train_kernels, "SPLIT_BLOCK", 4)
    monkeypatch.setattr(train_kernels, "SPLIT_MIN_BLOCK", 4)
    monkeypatch.setattr(train_kernels, "MAX_BLOCK_P", 2)
    x = (1e4 + torch.randn(2, 3, 3, 6, generator=torch.Generator().manual_seed(0))).float()
    rm, rv = torch.zeros(3), torch.ones(3)
    rm64, rv64 = rm.double(), rv.double()
    args = (LIF._replace(detach_reset=True), MPBNParameters(1e-5, "raw"), BNStatistics(True, 0.5, 0))
    _triton().mpbn_lif(x, torch.zeros(3, 3, 6), None, None, rm, rv, 0.5, *args)
    ref.mpbn_lif(x.double(), torch.zeros(3, 3, 6, dtype=torch.float64), None, None, rm64, rv64, 0.5, *args)
    torch.testing.assert_close(rv.double(), rv64, **LARGE_MEAN_FP32["var"])
    torch.testing.assert_close(rm.double(), rm64, **LARGE_MEAN_FP32["mean"])


def test_int64_offsets_match_torch(path, monkeypatch):
    # the int64 index path, forced on a small tensor (a real one would need 2**31 elements)
    monkeypatch.setattr(train_kernels, "needs_int64", lambda *tensors: True)
    monkeypatch.setattr(lif_kernels, "needs_int64", lambda *tensors: True)
    _compare("train", (2, 3, 2, 3, 3), sg.ATan())
    _compare("lif", (2, 3, 2, 3, 3), sg.ATan())


def test_needs_int64_rule():
    from snnorm.kernels._common import needs_int64

    small = torch.empty(2, 3)
    assert not needs_int64(small, None)
    wide = torch.empty(1).expand(2**16, 2**16)  # stride 0: one element, no offset past 0
    assert not needs_int64(wide)
    assert not needs_int64(torch.empty(2**31 - 1, device="meta"))  # last offset 2**31 − 2 fits int32
    assert needs_int64(small, torch.empty(2, 2**30 + 1, device="meta"))


# ------------------------------------------------------------------------------------------
# launches and grids
# ------------------------------------------------------------------------------------------


class _Recorder:
    """Stands in for a kernel: records each launch's grid and constexprs (and runs nothing)."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.name, tuple(grid), kwargs))

        return launch


def _record_launches(monkeypatch):
    log = []
    for name in dir(train_kernels):
        if name.endswith("_kernel"):
            monkeypatch.setattr(train_kernels, name, _Recorder(name, log))
    return log


@pytest.mark.parametrize("T", [1, 4])
def test_pipelined_training_launches_at_most_T_plus_2_each_way(monkeypatch, T):
    log = _record_launches(monkeypatch)
    N, C, S = 64, 8, 1024
    x = torch.empty(T, N, C, S)
    h = torch.empty(T, N, C, S)
    assert not train_kernels.uses_resident_path(N, C, S)
    train_kernels.launch_batch_stats_fwd(
        x, torch.zeros(N, C, S), None, None, None, None, torch.ones(C), None, None, None, torch.float32,
        lif=LIF_K, bn=BNKernelParameters(1e-5, 0.1, 0), stats=0, carry_norm=True, save=True,
    )
    fwd = len(log)
    train_kernels.launch_train_bwd(
        x, None, h, torch.float32, torch.empty(T, C), torch.empty(T, C), None, None, torch.ones(C), lif=LIF_K,
        carry_norm=True,
    )
    bwd = len(log) - fwd
    assert fwd == T + 1 and bwd == T + 1  # + one torch reduction of the θ partials in backward: T + 2


PERF_SHAPES = [(4, 64, 128, 32, 32), (4, 128, 256, 8, 8), (8, 32, 64, 56, 56)]


@pytest.mark.parametrize("shape", PERF_SHAPES)
def test_training_launches_fill_an_h100_at_the_perf_shapes(monkeypatch, shape):
    log = _record_launches(monkeypatch)
    T, N, C, H, W = shape
    x = torch.empty(shape)
    train_kernels.launch_batch_stats_fwd(
        x, torch.zeros(shape[1:]), None, None, None, None, torch.ones(C), None, None, None, torch.float32,
        lif=LIF_K, bn=BNKernelParameters(1e-5, 0.1, 0), stats=0, carry_norm=True, save=True,
    )
    train_kernels.launch_train_bwd(
        x, None, x, torch.float32, torch.empty(T, C), torch.empty(T, C), None, None, torch.ones(C), lif=LIF_K,
        carry_norm=True,
    )
    for name, grid, kwargs in log:
        programs = grid[0] * (grid[1] if len(grid) > 1 else 1)
        assert programs >= 132, f"{name} at {shape}: {programs} programs"
        assert kwargs["BLOCK_S"] * kwargs["BLOCK_N"] <= train_kernels.SPLIT_BLOCK


# ------------------------------------------------------------------------------------------
# what the kernels cannot run: named, once
# ------------------------------------------------------------------------------------------


class _HomeMadeSurrogate(sg.SurrogateFunctionBase):
    def __init__(self):
        super().__init__(alpha=1.0)

    @staticmethod
    def derivative(x, alpha):
        return alpha / (1.0 + x.abs()) ** 2


def test_surrogate_without_kernel_warns_once_naming_it_and_runs_torch():
    import warnings

    x = torch.randn(2, 3, 2)
    v = torch.zeros(3, 2)
    home_made = LIF._replace(surrogate=_HomeMadeSurrogate())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s1, v1 = _triton().lif(x, v, 0.5, home_made)
        s2, _ = _triton().lif(x, v, 0.5, home_made)
    named = [w for w in caught if "_HomeMadeSurrogate" in str(w.message)]
    assert len(named) == 1 and "torch backend" in str(named[0].message)
    s_ref, v_ref = ref.lif(x, v, 0.5, home_made)
    assert torch.equal(s1, s_ref) and torch.equal(v1, v_ref) and torch.equal(s2, s_ref)
