"""The fused Triton TAB op against the torch backend's ``tab`` (the specification).

Oracle: :func:`snnorm.backends.torch_backend.tab` on float64 copies of the inputs (ref64).
fp32/fp64 are compared to ref64 tightly; bf16 by flash-attention's rule
``max|kernel − ref64| ≤ 2·max|torch_bf16 − ref64| + atol``. Outputs, ∂x, ∂γ_t, ∂β_t, ∂p and
the per-step running statistics after the call are all checked, for whole sequences and
for a continuation with a prefix (single-step mode). On CPU the kernels run through the
Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""

import os

import pytest
import torch
from devices import SLOW_ON_CPU, property_examples
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tolerances import LARGE_MEAN_FP32_VAR_REL, TAB_LOWP_ATOL, TAB_RTOL, TAB_TRITON_VS_TORCH_FP32, TAB_TRITON_VS_TORCH_GRAD_FP32
from tolerances import TAB_TRITON_VS_TORCH_OUTPUT_FP32, TAB_UNIFORM_MOMENTUM_REL, assert_close_to_reference, assert_rel_close

pytest.importorskip("triton")
from snnorm import functional, layer  # noqa: E402
from snnorm.backends import torch_backend  # noqa: E402
from snnorm.backends import triton_backend as tab_mod  # noqa: E402
from snnorm.kernels import _common as bn_tiles  # noqa: E402

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is off", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5
NAMES = ("y", "dx", "dweight", "dbias", "dp", "running_mean", "running_var")


def run_op(op, x, w, b, rm, rv, p, g, *, training, momentum, prefix=None):
    """[y, ∂x, ∂γ, ∂β, ∂p, running_mean, running_var] after one call (None where absent)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b, p)]
    rm_c = rm.clone() if rm is not None else None
    rv_c = rv.clone() if rv is not None else None
    if prefix is not None and prefix[1] is not None:
        prefix = (prefix[0], prefix[1].clone().requires_grad_(), prefix[2].clone().requires_grad_())
    y, state = op(leaves[0], leaves[1], leaves[2], rm_c, rv_c, leaves[3],
                  training=training, momentum=momentum, eps=EPS, prefix=prefix)
    loss = (y * g).sum()
    if state is not None and state[1] is not None:  # the state must carry the gradient too
        loss = loss + state[1].sum() + 0.1 * state[2].sum()
    wrt = [t for t in leaves if t is not None]
    extra = [prefix[1], prefix[2]] if prefix is not None and prefix[1] is not None else []
    grads = iter(torch.autograd.grad(loss, wrt + extra))
    out = [y] + [next(grads) if t is not None else None for t in leaves] + [rm_c, rv_c]
    return out + list(grads)  # then ∂prefix_mean, ∂prefix_m2 when a prefix was given


def to64(t):
    return t.double() if isinstance(t, torch.Tensor) else t


def compare(what, ours, ref64, dtype, lowp=None):
    if ref64 is None:
        assert ours is None, what
        return
    if lowp is None:
        assert_close_to_reference(f"{what} ({dtype})", ours, ref64, rtol=TAB_RTOL[dtype])
    else:
        assert_close_to_reference(f"{what} ({dtype})", ours, ref64, lowp=lowp, lowp_atol=TAB_LOWP_ATOL[dtype])


def check(T, N, C, spatial, dtype, affine, has_running, training, mean_shift, seed, prefix_steps=0):
    gen = torch.Generator().manual_seed(seed)
    pdtype = torch.float32 if dtype == torch.bfloat16 else dtype  # bf16 activations, fp32 parameters
    mk = lambda *s, scale=1.0, shift=0.0: (torch.randn(*s, generator=gen) * scale + shift).to(DEVICE)  # noqa: E731
    x = mk(T, N, C, *spatial, scale=2.0, shift=mean_shift)
    x = x + torch.arange(T, device=DEVICE).view(T, *[1] * (x.dim() - 1))  # drift over t
    x = x.to(dtype)
    g = mk(T, N, C, *spatial)
    w = mk(T, C, shift=1.0).to(pdtype) if affine else None
    b = mk(T, C).to(pdtype) if affine else None
    p = (torch.rand(T, generator=gen) + 0.5).to(DEVICE, pdtype)
    rm = mk(T, C).to(pdtype) if has_running else None
    rv = (torch.rand(T, C, generator=gen) + 0.5).to(DEVICE, pdtype) if has_running else None
    momentum = [0.1 + 0.2 * t for t in range(T)]
    prefix = None
    if prefix_steps:  # statistics of earlier steps, as single-step mode carries them
        earlier = mk(prefix_steps, N, C, *spatial, shift=mean_shift).double()
        n, m, m2 = torch_backend.tab_step_stats(earlier)
        count, mean, m2 = torch_backend.chan_prefix(n, m, m2)
        prefix = (float(count[-1]), mean[-1].to(pdtype), m2[-1].to(pdtype))
    pre64 = None if prefix is None else (prefix[0], to64(prefix[1]), to64(prefix[2]))
    kw = dict(training=training, momentum=momentum)
    ours = run_op(tab_mod.tab, x, w, b, rm, rv, p, g, prefix=prefix, **kw)
    ref = run_op(torch_backend.tab, *map(to64, (x, w, b, rm, rv, p, g)), prefix=pre64, **kw)
    lowp = run_op(torch_backend.tab, x, w, b, rm, rv, p, g, prefix=prefix, **kw) if dtype == torch.bfloat16 else None
    assert ours[0].dtype == torch.promote_types(dtype, pdtype)
    for i, (o, r) in enumerate(zip(ours, ref)):
        name = NAMES[i] if i < len(NAMES) else f"dprefix{i - len(NAMES)}"
        compare(name, o, r, dtype, lowp[i] if lowp else None)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("prefix_steps", [0, 2], ids=["whole", "continued"])
@settings(max_examples=property_examples(4))  # every mode every run, a few draws each
@given(
    T=st.integers(1, 4),
    N=st.integers(1, 3),
    C=st.integers(1, 5),
    spatial=st.sampled_from([(), (1,), (5,), (2, 3), (2, 1, 3)]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    affine=st.booleans(),
    has_running=st.booleans(),
    mean_shift=st.sampled_from([0.0, 30.0]),
    seed=st.integers(0, 2**16),
)
def test_matches_torch_backend(training, prefix_steps, T, N, C, spatial, dtype, affine, has_running, mean_shift, seed):
    """Train and eval, a whole sequence and one continued from a 2-step prefix state: each
    every run; hypothesis draws shape, dtype, affine, running statistics and mean."""
    uses_batch_stats = training or not has_running
    S = 1
    for s in spatial:
        S *= s
    assume(not uses_batch_stats or N * S > 1)  # batch statistics need > 1 value per channel at step 0
    check(T, N, C, spatial, dtype, affine, has_running, training, mean_shift, seed, prefix_steps)


@pytest.mark.parametrize("dtype", [torch.float64, pytest.param(torch.float32, marks=SLOW_ON_CPU)])
def test_many_partials_per_step_combined_in_chunks(monkeypatch, dtype):
    """Tiny tiles, 5 programs per (channel block, step): the prefix kernel combines each
    step's 5 partials 2 at a time (the last chunk holds one) before merging them into the
    prefix; the same bits when run again."""
    T, N, C, S = 3, 5, 3, 4
    monkeypatch.setitem(bn_tiles.TUNING, "tile_elems", 4)
    c_blocks = bn_tiles.geometry(T, N, C, S, torch.device(DEVICE)).c_blocks
    monkeypatch.setitem(bn_tiles.TUNING, "programs", 5 * T * c_blocks)
    per_step = bn_tiles.geometry(T, N, C, S, torch.device(DEVICE)).parts // T
    block_p, _ = bn_tiles.combine_tiles(per_step, C, DEVICE != "cuda")
    assert per_step == 5 and block_p == 2
    check(T, N, C, (S,), dtype, True, True, True, 30.0, seed=1)
    x = (30.0 + torch.randn(T, N, C, S, generator=torch.Generator().manual_seed(2))).to(dtype).to(DEVICE)
    runs = [torch.ops.snnorm.bn_stats(x, None, None, [0.1] * T, "tab") for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_uniform_momentum_running_statistics(dtype):
    """One factor for every step reaches the kernel as a scalar (fp32) or, for fp64, as
    the per-step tensor: running statistics as the torch backend's either way."""
    x = (3.0 + torch.randn(3, 4, 2, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)).to(dtype)
    got = []
    for op, dev in ((tab_mod.tab, DEVICE), (torch_backend.tab, "cpu")):
        rm = torch.full((3, 2), 0.5, dtype=dtype, device=dev)
        rv = torch.full((3, 2), 2.0, dtype=dtype, device=dev)
        op(x.to(dev), None, None, rm, rv, torch.ones(3, dtype=dtype, device=dev), training=True,
           momentum=[0.1] * 3, eps=EPS)
        got.append(torch.cat([rm, rv]).double().cpu())
    assert_rel_close(got[0], got[1], TAB_UNIFORM_MOMENTUM_REL[dtype], f"running statistics ({dtype})")


def test_statistics_precise_at_large_mean():
    """mean/std = 1e4 in fp32: Chan's combination keeps the per-step running variance."""
    x = (1e4 + torch.randn(3, 8, 4, 33, generator=torch.Generator().manual_seed(0))).to(DEVICE)
    rm, rv = torch.zeros(3, 4, device=DEVICE), torch.ones(3, 4, device=DEVICE)
    tab_mod.tab(x, None, None, rm, rv, torch.ones(3, device=DEVICE), training=True, momentum=[1.0] * 3, eps=EPS)
    for t in range(3):
        ref = x[: t + 1].double().movedim(2, 0).reshape(4, -1).var(dim=1)
        assert_rel_close(rv[t], ref, LARGE_MEAN_FP32_VAR_REL, f"running_var[{t}]")


def test_single_value_rejected_and_nothing_changes():
    x = torch.randn(2, 1, 3, device=DEVICE)
    rm, rv = torch.zeros(2, 3, device=DEVICE), torch.ones(2, 3, device=DEVICE)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        tab_mod.tab(x, None, None, rm, rv, torch.ones(2, device=DEVICE), training=True, momentum=[0.1] * 2, eps=EPS)
    assert torch.equal(rm, torch.zeros(2, 3, device=DEVICE)) and torch.equal(rv, torch.ones(2, 3, device=DEVICE))


def test_empty_batch_in_eval_gives_zero_gradients():
    """N = 0 in eval (running statistics): an empty output and zero parameter gradients,
    as the torch backend gives (no partials: the coefficient kernel sums nothing)."""
    grads = []
    for op, dev in ((tab_mod.tab, DEVICE), (torch_backend.tab, "cpu")):
        leaves = [torch.randn(2, 0, 3, 4, device=dev), torch.rand(2, 3, device=dev) + 0.5,
                  torch.rand(2, 3, device=dev), torch.rand(2, device=dev) + 0.5]
        leaves = [t.requires_grad_() for t in leaves]
        x, w, b, p = leaves
        y, _ = op(x, w, b, torch.zeros(2, 3, device=dev), torch.ones(2, 3, device=dev), p,
                  training=False, momentum=[0.1] * 2, eps=EPS)
        assert y.shape == x.shape
        grads.append([g.cpu() for g in torch.autograd.grad(y.sum(), leaves)])
    for ours, ref in zip(*grads):
        assert ours.shape == ref.shape and torch.equal(ours, ref) and not ours.any()


def test_opcheck():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 3, 2, generator=gen, dtype=torch.float64).to(DEVICE)
    rm, rv = torch.zeros(2, 3, dtype=torch.float64, device=DEVICE), torch.ones(2, 3, dtype=torch.float64, device=DEVICE)
    torch.library.opcheck(torch.ops.snnorm.bn_stats.default, (x, rm.clone(), rv.clone(), [0.1, 0.3], "tab"))
    m, v = torch.ops.snnorm.bn_stats(x, None, None, [0.1] * 2, "tab")
    w = torch.rand(2, 3, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    b = torch.rand(2, 3, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    p = torch.rand(2, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    xg = x.clone().requires_grad_()
    torch.library.opcheck(torch.ops.snnorm.bn_apply.default, (xg, w, b, m, v, p, EPS, "tab", True))
    # without affine; (mean, var) carrying a graph of their own, as in single-step mode
    torch.library.opcheck(
        torch.ops.snnorm.bn_apply.default, (xg, None, None, m.requires_grad_(), v.requires_grad_(), p, EPS, "tab", False)
    )


def test_module_backends_agree_and_compile_fullgraph():
    """The layer on both backends (train then eval), and torch.compile(fullgraph=True) of a
    training step on the triton backend: no graph break, same loss, grads and statistics."""
    torch.manual_seed(0)
    ref = layer.TemporalAccumulatedBatchNorm2d(3, 4).to(DEVICE)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5), ref.bias.uniform_(-0.5, 0.5), ref.p.uniform_(0.5, 1.5)
    tri = layer.TemporalAccumulatedBatchNorm2d(3, 4).to(DEVICE)
    tri.load_state_dict(ref.state_dict())
    functional.set_backend(tri, "triton")
    assert tri.backend == "triton"
    x = torch.randn(3, 2, 4, 3, 3, device=DEVICE) + 1.0

    def forward_loss(module, x):
        y = module(x)
        return (y * y).mean()

    loss_ref = forward_loss(ref, x)
    loss_tri = torch.compile(forward_loss, fullgraph=True, backend="aot_eager")(tri, x)
    loss_ref.backward(), loss_tri.backward()
    torch.testing.assert_close(loss_tri, loss_ref, **TAB_TRITON_VS_TORCH_FP32)
    for name in ("weight", "bias", "p"):
        torch.testing.assert_close(getattr(tri, name).grad, getattr(ref, name).grad, **TAB_TRITON_VS_TORCH_GRAD_FP32)
    for a, b in zip(tri.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, **TAB_TRITON_VS_TORCH_FP32)
    ref.eval(), tri.eval()
    torch.testing.assert_close(tri(x), ref(x), **TAB_TRITON_VS_TORCH_OUTPUT_FP32)
    # single-step mode on the triton backend: T calls equal the multi-step result
    functional.set_step_mode(tri, "s"), tri.train(), ref.train()
    ys = torch.stack([tri(x[t]) for t in range(3)])
    torch.testing.assert_close(ys, ref(x), **TAB_TRITON_VS_TORCH_OUTPUT_FP32)
