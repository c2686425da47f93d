"""The Triton LIF / MPBN-LIF ops agree with the torch backend (the specification).

Every comparison runs the torch backend op on float64 copies of the very same inputs
(low-precision inputs are rounded first, so both sides see identical values) and checks
spikes, final membrane, every gradient and the running statistics. Spikes are
discontinuous: up to each unit's first flip (tests/tolerances.py: an element, or a channel
when batch statistics couple it) every spike that differs must sit at the threshold — the
reference's firing variable z (recorded from the torch op's own surrogate call) within
FLIP_MARGIN_EPS eps of 0 (helpers.assert_flips_placed) — and every other quantity is
compared on the units that no flip reached. The large-mean precision of the chunked
combination is tests/test_triton_mpbn_lif_paths.py's. Tensors live on tests/devices.py's DEVICE (CUDA when present).
"""

from __future__ import annotations


import pytest
import torch
from hypothesis import given, note, settings
from hypothesis.control import currently_in_test_context
from hypothesis import strategies as st

from devices import DEVICE, SIZES, SLOW_ON_CPU, property_examples, wide_examples
from helpers import FLIPS_SEEN, RecordingSurrogate, assert_flips_placed
from tolerances import REORDERED_FP64, assert_op_close, comparable_entries

from snnorm import surrogate as sg
from snnorm.backends import torch_backend as ref

pytest.importorskip("triton")
from snnorm.backends import triton_backend as K  # noqa: E402
from snnorm.kernels import _common  # noqa: E402
from snnorm.kernels import mpbn_lif_train as train_kernels  # noqa: E402
from snnorm.params import AdaptParameters, BNKernelParameters, BNStatistics, LIFParameters, MPBNParameters  # noqa: E402

#: the MPBNLIFNode defaults (hard reset to 0, decay_input=False, post-BN carry) as op bundles
LIF = LIFParameters(sg.Sigmoid(), tau=2.0, decay_input=False, v_reset=0.0, detach_reset=False)
NORM = MPBNParameters(eps=1e-5, carry="normalized")
TRAIN = BNStatistics(training=True, momentum=0.1, batches_tracked=0)
#: the adaptation the property tests use
ADAPT = AdaptParameters(mode="none", momentum=0.3, decay=0.5, min_momentum=0.05)


def _lif_params(cfg, surrogate) -> LIFParameters:
    return LIFParameters(surrogate, tau=cfg["tau"], decay_input=cfg["decay_input"], v_reset=cfg["v_reset"],
                         detach_reset=cfg["detach_reset"])

#: largest errors seen, per dtype (printed with -s when the module ends; informative only)
OBSERVED: dict[str, float] = {}
FLIPS: dict[str, int] = {}


@pytest.fixture(scope="module", autouse=True)
def _report_observed_errors():
    yield
    if OBSERVED:
        print("\nlargest |triton − fp64 reference| / (|ref| + max(1, max|ref|)) per dtype:", OBSERVED)
        print("flipped spikes per dtype:", FLIPS, "largest |z| of a flip in eps·scale:", FLIPS_SEEN)


def _surrogate(kind: str, alpha: float):
    return sg.Sigmoid(alpha) if kind == "sigmoid" else sg.ATan(alpha)


def _close(name, got, want, dtype, mask=None):
    """|got − want| within the dtype's bound (tests/tolerances.py), where ``mask`` (None: all) holds."""
    rel = assert_op_close(name, got, want, dtype, mask)
    if rel is not None:
        key = str(dtype).replace("torch.", "")
        OBSERVED[key] = max(OBSERVED.get(key, 0.0), rel)


def _make_x(shape, dtype, layout, gen):
    T, N, C, *sp = shape
    if layout == "sliced":  # every other element of a larger tensor
        base = torch.randn(*shape[:-1], shape[-1] * 2, generator=gen, dtype=torch.float64)
        x = base[..., ::2]
    elif layout == "channels_last":
        x = torch.randn(T, N, *sp, C, generator=gen, dtype=torch.float64).movedim(-1, 2)
    else:
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return x


@st.composite
def configs(draw, modes=("lif", "train", "eval", "folded")):
    mode = draw(st.sampled_from(modes))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float64, torch.float16, torch.bfloat16]))
    lowp = dtype in (torch.float16, torch.bfloat16)
    shape = draw(SIZES.shapes(min_per_channel=2 if mode == "train" else 1, lowp=lowp))
    cfg = dict(
        mode=mode, dtype=dtype, shape=shape,
        layout=draw(st.sampled_from(["contiguous", "sliced", "channels_last"])),
        v_expanded=draw(st.booleans()),
        v_reset=draw(st.sampled_from([None, 0.0, -0.3, 0.25])),
        detach_reset=draw(st.booleans()),
        decay_input=draw(st.booleans()),
        tau=draw(st.sampled_from([2.0, 1.5, 4.0 / 3.0, 3.0])),
        surrogate=draw(st.sampled_from(["sigmoid", "atan"])),
        alpha=draw(st.sampled_from([2.0, 4.0, 5.0])),
        gamma_sign=draw(st.sampled_from(["pos", "neg", "mixed"])),
        carry=draw(st.sampled_from(["normalized", "raw"])),
        threshold_tensor=draw(st.booleans()),
        affine=draw(st.booleans()),
        track=draw(st.booleans()),
        momentum=draw(st.sampled_from([0.1, None, 0.5])),
        batches_tracked=draw(st.integers(0, 5)),
        adapt=draw(st.sampled_from(["none", "none", "batch", "running"])),
        grad_kind=draw(st.sampled_from(["random", "sum"])),
        seed=draw(st.integers(0, 2**16)),
    )
    return cfg


def _inputs(cfg):
    """fp64 master copies of every input, already rounded through the test dtype."""
    gen = torch.Generator().manual_seed(cfg["seed"])
    dtype = cfg["dtype"]
    T, N, C, *sp = cfg["shape"]

    def rnd(t):  # round through dtype, keep fp64
        return t.to(dtype).to(torch.float64)

    x = _make_x(cfg["shape"], dtype, cfg["layout"], gen)
    x = x * 1.5 + 0.3
    x.copy_(rnd(x))
    v = rnd(torch.randn(1 if cfg["v_expanded"] else N, C, *sp, generator=gen, dtype=torch.float64) * 0.5)
    sign = {"pos": torch.ones(C), "neg": -torch.ones(C), "mixed": torch.where(torch.arange(C) % 2 == 0, 1.0, -1.0)}[cfg["gamma_sign"]]
    gamma = sign.double() * (0.5 + torch.rand(C, generator=gen, dtype=torch.float64))
    beta = 0.3 * torch.randn(C, generator=gen, dtype=torch.float64)
    th = 0.5 + 0.5 * torch.rand(C, generator=gen, dtype=torch.float64)
    rm = 0.2 * torch.randn(C, generator=gen, dtype=torch.float64)
    rv = 0.5 + torch.rand(C, generator=gen, dtype=torch.float64)
    gs = rnd(torch.randn(cfg["shape"], generator=gen, dtype=torch.float64))
    gv = rnd(torch.randn(N, C, *sp, generator=gen, dtype=torch.float64))
    return dict(x=x, v=v, gamma=gamma, beta=beta, th=th, rm=rm, rv=rv, gs=gs, gv=gv)


def _run(backend, cfg, inp, dtype, surrogate):
    """Call ``backend``'s op with inputs in ``dtype`` (params fp32 for fp16/bf16); return outputs and grads."""
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    # fresh copies on DEVICE with the master's strides (a sliced / channels-last layout survives)
    x = torch.empty_strided(inp["x"].shape, inp["x"].stride(), dtype=dtype, device=DEVICE).copy_(inp["x"])
    x.requires_grad_(True)
    N = cfg["shape"][1]
    v_leaf = inp["v"].to(DEVICE, dtype, copy=True).requires_grad_(True)
    v = v_leaf.expand(N, *v_leaf.shape[1:]) if cfg["v_expanded"] else v_leaf
    params = {k: inp[k].to(DEVICE, pdtype, copy=True).requires_grad_(True) for k in ("gamma", "beta", "th")}
    th = params["th"] if cfg["threshold_tensor"] else 0.7
    lif = _lif_params(cfg, surrogate)
    norm = MPBNParameters(eps=1e-5, carry=cfg["carry"])
    mode = cfg["mode"]
    out = {}
    leaves = {"x": x, "v": v_leaf}
    if cfg["threshold_tensor"]:
        leaves["th"] = params["th"]
    if mode == "lif":
        s, v_out = backend.lif(x, v, th, lif)
    elif mode in ("train", "eval"):
        w = params["gamma"] if cfg["affine"] else None
        b = params["beta"] if cfg["affine"] else None
        if cfg["affine"]:
            leaves.update(weight=w, bias=b)
        keep = mode == "eval" or cfg["track"]
        rm = inp["rm"].to(DEVICE, pdtype, copy=True) if keep else None
        rv = inp["rv"].to(DEVICE, pdtype, copy=True) if keep else None
        stats = BNStatistics(training=mode == "train", momentum=cfg["momentum"], batches_tracked=cfg["batches_tracked"])
        s, v_out = backend.mpbn_lif(x, v, w, b, rm, rv, th, lif, norm, stats)
        if rm is not None:
            out["running_mean"], out["running_var"] = rm, rv
    else:
        mu = inp["rm"].to(DEVICE, pdtype, copy=True).requires_grad_(True)
        s2 = inp["rv"].to(DEVICE, pdtype, copy=True).requires_grad_(True)
        adapt = cfg["adapt"]
        if adapt == "none":
            leaves.update(mu=mu, sigma2=s2, gamma=params["gamma"], beta=params["beta"])
        s, v_out, mu_o, s2_o, m = backend.mpbn_lif_folded(
            x, v, mu, s2, params["gamma"], params["beta"], th, lif, norm, ADAPT._replace(mode=adapt),
        )
        out.update(mu_out=mu_o, sigma2_out=s2_o, m=torch.tensor(m))
    out.update(s=s, v_out=v_out)
    if mode == "folded" and cfg["adapt"] != "none":
        return out
    if cfg["grad_kind"] == "sum":
        loss = s.sum() + v_out.sum()  # expanded (stride-0) incoming gradients
    else:
        loss = (s * inp["gs"].to(DEVICE, s.dtype)).sum() + (v_out * inp["gv"].to(DEVICE, v_out.dtype)).sum()
    names = list(leaves)
    grads = torch.autograd.grad(loss, [leaves[k] for k in names], allow_unused=True)
    for k, g in zip(names, grads):
        out["grad_" + k] = g if g is not None else torch.zeros_like(leaves[k])
    return out


def _check(cfg):
    dtype = cfg["dtype"]
    inp = _inputs(cfg)
    rec = RecordingSurrogate(_surrogate(cfg["surrogate"], cfg["alpha"]))
    want = _run(ref, cfg, inp, torch.float64, rec)
    got = _run(K, cfg, inp, dtype, _surrogate(cfg["surrogate"], cfg["alpha"]))
    # dtypes as the torch backend gives them in the same dtype
    with torch.no_grad():
        low = _run_nograd(cfg, inp, dtype)
    assert got["s"].dtype == low["s"].dtype and got["v_out"].dtype == low["v_out"].dtype

    # batch statistics (training, test-time adaptation) couple a channel's elements
    coupled = cfg["mode"] == "train" or (cfg["mode"] == "folded" and cfg["adapt"] != "none")
    clean = assert_flips_placed(f"{cfg['mode']} {dtype}", got["s"], want["s"], rec.firing_variable(want["s"]), dtype,
                                channel_coupled=coupled)
    flipped = int((got["s"].double() != want["s"].double()).sum())
    FLIPS[str(dtype)] = FLIPS.get(str(dtype), 0) + flipped
    if currently_in_test_context():
        note(f"{flipped} spikes flipped (each at the threshold); {int(clean.sum())} of {clean.numel()} units clean")
    for key in want:
        if key == "s":
            continue
        _close(key, got[key], want[key], dtype, comparable_entries(want[key], clean, key))
    for key in got:
        assert key in want, f"triton gave {key} that the reference does not"


def _run_nograd(cfg, inp, dtype):
    cfg = dict(cfg, grad_kind="none")
    surrogate = _surrogate(cfg["surrogate"], cfg["alpha"])
    out = {}
    inp = {k: t.to(DEVICE) for k, t in inp.items()}
    x = inp["x"].to(dtype)
    N = cfg["shape"][1]
    v = inp["v"].to(dtype).expand(N, *inp["v"].shape[1:])
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    th = inp["th"].to(pdtype) if cfg["threshold_tensor"] else 0.7
    lif = _lif_params(cfg, surrogate)
    norm = MPBNParameters(eps=1e-5, carry=cfg["carry"])
    if cfg["mode"] == "lif":
        out["s"], out["v_out"] = ref.lif(x, v, th, lif)
    elif cfg["mode"] in ("train", "eval"):
        g = inp["gamma"].to(pdtype) if cfg["affine"] else None
        b = inp["beta"].to(pdtype) if cfg["affine"] else None
        rm, rv = inp["rm"].to(pdtype), inp["rv"].to(pdtype)
        out["s"], out["v_out"] = ref.mpbn_lif(x, v, g, b, rm, rv, th, lif, norm, TRAIN._replace(training=cfg["mode"] == "train"))
    else:
        out["s"], out["v_out"], *_ = ref.mpbn_lif_folded(
            x, v, inp["rm"].to(pdtype), inp["rv"].to(pdtype), inp["gamma"].to(pdtype), inp["beta"].to(pdtype), th,
            lif, norm, ADAPT._replace(mode=cfg["adapt"]),
        )
    return out


# ------------------------------------------------------------------------------------------
# property tests, one per op family (the CPU profile bounds the examples)
# ------------------------------------------------------------------------------------------


@given(cfg=configs(modes=("lif",)))
def test_lif_matches_torch_backend(cfg):
    note(str(cfg))
    _check(cfg)


@settings(max_examples=property_examples(2))  # ~5 s an example through the interpreter: its wide twin below
@given(cfg=configs(modes=("train",)))
def test_mpbn_lif_training_matches_torch_backend(cfg):
    note(str(cfg))
    _check(cfg)


@pytest.mark.slow
@settings(max_examples=wide_examples())
@given(cfg=configs(modes=("train",)))
def test_mpbn_lif_training_matches_torch_backend_wide(cfg):
    note(str(cfg))
    _check(cfg)


@given(cfg=configs(modes=("eval",)))
def test_mpbn_lif_eval_matches_torch_backend(cfg):
    note(str(cfg))
    _check(cfg)


@given(cfg=configs(modes=("folded",)))
def test_mpbn_lif_folded_matches_torch_backend(cfg):
    note(str(cfg))
    _check(cfg)


# ------------------------------------------------------------------------------------------
# the large-M split path, determinism, fallbacks, errors
# ------------------------------------------------------------------------------------------


def _split_cfg(**over):
    cfg = dict(
        mode="train", dtype=torch.float32, shape=(3, 5, 2, 3, 1), layout="sliced", v_expanded=False, v_reset=0.0,
        detach_reset=False, decay_input=False, tau=2.0, surrogate="atan", alpha=2.0, gamma_sign="mixed", carry="normalized",
        threshold_tensor=True, affine=True, track=True, momentum=None, batches_tracked=2, adapt="none", grad_kind="random", seed=7,
    )
    cfg.update(over)
    return cfg


@pytest.mark.parametrize(
    "over",
    [
        dict(),
        pytest.param(dict(dtype=torch.float64, carry="raw", v_reset=None, decay_input=True, momentum=0.1),
                     marks=SLOW_ON_CPU),
        dict(mode="folded", adapt="running", dtype=torch.float64),
        pytest.param(dict(mode="folded", adapt="batch", carry="raw"), marks=SLOW_ON_CPU),
    ],
)
def test_split_path_matches_torch_backend(monkeypatch, over):
    # M = 15 elements per channel over blocks of 4: four programs per channel
    monkeypatch.setattr(train_kernels, "RESIDENT_MAX_M", 8)
    monkeypatch.setattr(train_kernels, "SPLIT_BLOCK", 4)
    monkeypatch.setattr(train_kernels, "SPLIT_MIN_BLOCK", 4)
    _check(_split_cfg(**over))


#: the training kernels' path choice at its real constants (no monkeypatching): a padded channel
#: of exactly RESIDENT_MAX_M elements with MIN_PROGRAMS channels is resident, one channel fewer
#: pipelined; a channel of MAX_BLOCK_P + 1 tiles of SPLIT_MIN_BLOCK combines its partials in chunks
_N_RES = 8
_RESIDENT = (2, _N_RES, train_kernels.MIN_PROGRAMS, train_kernels.RESIDENT_MAX_M // _N_RES)
_SHORT = (2, _N_RES, train_kernels.MIN_PROGRAMS - 1, train_kernels.RESIDENT_MAX_M // _N_RES)
_CHUNKED = (2, 1, 1, (train_kernels.MAX_BLOCK_P + 1) * train_kernels.SPLIT_MIN_BLOCK)
REAL_THRESHOLDS = [  # (shape, resident, dtype); the boundary case in fp32 only (~2 min interpreted)
    pytest.param(_RESIDENT, True, torch.float32, id="resident-fp32"),
    pytest.param(_RESIDENT, True, torch.float64, id="resident-fp64"),
    pytest.param(_SHORT, False, torch.float32, id="one-channel-short-pipelined-fp32"),
    pytest.param(_CHUNKED, False, torch.float32, id="chunked-combine-fp32"),
    pytest.param(_CHUNKED, False, torch.float64, id="chunked-combine-fp64"),
]


@pytest.mark.slow  # ~10^5-10^6 elements through the interpreter: 0.5-2 min each on a free core
@pytest.mark.timeout(900)
@pytest.mark.parametrize("shape, resident, dtype", REAL_THRESHOLDS)
def test_training_paths_at_their_real_thresholds(shape, resident, dtype):
    T, N, C, S = shape
    assert train_kernels.uses_resident_path(N, C, S) == resident
    if not resident:
        tiles = train_kernels.pipelined_tiling(N, C, S)
        assert tiles.P * C >= train_kernels.MIN_PROGRAMS or tiles.block == train_kernels.SPLIT_MIN_BLOCK
        if C == 1:  # the chunked combine: more partials than one chunk holds
            assert tiles.P > train_kernels.MAX_BLOCK_P, tiles
    _check(_split_cfg(shape=shape, dtype=dtype, layout="contiguous", momentum=0.1))


def test_split_path_is_deterministic_and_equals_resident(monkeypatch):
    cfg = _split_cfg(dtype=torch.float64)
    inp = _inputs(cfg)
    surrogate = _surrogate("atan", 2.0)
    monkeypatch.setattr(train_kernels, "MIN_PROGRAMS", 1)  # C = 2 channels: the resident path only when asked
    resident = _run(K, cfg, inp, torch.float64, surrogate)
    monkeypatch.setattr(train_kernels, "RESIDENT_MAX_M", 8)
    monkeypatch.setattr(train_kernels, "SPLIT_BLOCK", 4)
    monkeypatch.setattr(train_kernels, "SPLIT_MIN_BLOCK", 4)
    a = _run(K, cfg, inp, torch.float64, surrogate)
    b = _run(K, cfg, inp, torch.float64, surrogate)
    for key in a:
        assert torch.equal(a[key], b[key]), f"split path not deterministic in {key}"
        torch.testing.assert_close(a[key], resident[key], **REORDERED_FP64)


def test_unsupported_surrogate_falls_back_with_warning():
    x = torch.randn(2, 3, 2, 4, device=DEVICE)
    v = torch.zeros(3, 2, 4, device=DEVICE)
    lif = LIF._replace(surrogate=sg.Sigmoid(spiking=False))
    with pytest.warns(RuntimeWarning, match="Sigmoid.spiking=False.*runs on the torch backend"):
        s, v_out = K.lif(x, v, 0.5, lif)
    s_ref, v_ref = ref.lif(x, v, 0.5, lif)
    assert torch.equal(s, s_ref) and torch.equal(v_out, v_ref)


def test_training_with_one_value_per_channel_raises_and_changes_nothing():
    x = torch.randn(3, 1, 2, device=DEVICE)
    rm, rv = torch.zeros(2, device=DEVICE), torch.ones(2, device=DEVICE)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        K.mpbn_lif(x, torch.zeros(1, 2, device=DEVICE), None, None, rm, rv, 0.5, LIF, NORM, TRAIN)
    assert torch.equal(rm.cpu(), torch.zeros(2)) and torch.equal(rv.cpu(), torch.ones(2))


def test_backward_through_adaptive_fold_raises_not_implemented():
    x = torch.randn(2, 4, 2, device=DEVICE, requires_grad=True)
    z, o = torch.zeros(2, device=DEVICE), torch.ones(2, device=DEVICE)
    adapt = AdaptParameters(mode="batch", momentum=0.1, decay=1.0, min_momentum=0.0)
    s, *_ = K.mpbn_lif_folded(x, torch.zeros(4, 2, device=DEVICE), z, o, o, z, 0.5, LIF, NORM, adapt)
    with pytest.raises(NotImplementedError, match="adapt"):
        s.sum().backward()


_REFUSAL = """
import torch
from snnorm import backends, neuron
from snnorm import surrogate as sg
from snnorm.backends import triton_backend as K
from snnorm.params import LIFParameters

assert not torch.cuda.is_available()
print("AVAILABLE", backends.available_backends()["triton"])
lif = LIFParameters(sg.Sigmoid(), tau=2.0, decay_input=False, v_reset=0.0, detach_reset=False)
x, v = torch.randn(2, 3, 4), torch.zeros(3, 4)
try:
    K.lif(x, v, 0.5, lif)
except RuntimeError as err:
    print("OP RAISED", err)
else:
    print("OP RAN")
node = neuron.LIFNode(step_mode="m")
try:
    node.backend = "triton"
    node(x)
except Exception as err:
    print("MODULE RAISED", type(err).__name__, err)
else:
    print("MODULE RAN")
"""


@pytest.mark.slow  # a subprocess
def test_cpu_tensor_without_interpreter_is_refused():
    """No CUDA and TRITON_INTERPRET unset: the op refuses CPU tensors, naming the fix, and
    neither the op nor a neuron on the triton backend runs (in a subprocess: the interpreter
    is chosen when triton is first imported)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(root))
    out = subprocess.run([sys.executable, "-c", _REFUSAL], env=env, cwd=root, capture_output=True, text=True,
                         timeout=240)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "OP RAISED" in out.stdout and "OP RAN" not in out.stdout, text
    op_line = next(line for line in out.stdout.splitlines() if line.startswith("OP RAISED"))
    assert "TRITON_INTERPRET=1" in op_line, op_line
    assert "AVAILABLE None" not in out.stdout, text  # the backend says it cannot run here
    assert "MODULE RAISED BackendUnavailableError" in out.stdout and "MODULE RAN" not in out.stdout, text


def test_device_error_names_the_fix():
    """The refusal's reason (kernels/_common.device_error), per device and interpreter state."""
    reason = _common.device_error("cpu", interpreting=False)
    assert reason is not None and "TRITON_INTERPRET=1" in reason
    assert _common.device_error("cpu", interpreting=True) is None
    assert _common.device_error("cuda", interpreting=False) is None
    assert "cuda" in _common.device_error("mps", interpreting=True)
    with pytest.raises(RuntimeError, match="device 'meta'"):
        K.lif(torch.zeros(1, 2, 3, device="meta"), torch.zeros(2, 3, device="meta"), 0.5, LIF)


# ------------------------------------------------------------------------------------------
# memory: what the op keeps for backward
# ------------------------------------------------------------------------------------------


def _saved_bytes(fn, x, *bundles):
    storages = {}

    def pack(t):
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    C = x.shape[2]
    d = dict(device=x.device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x, torch.zeros(x.shape[1:], **d), torch.ones(C, requires_grad=True, **d), torch.zeros(C, requires_grad=True, **d),
           torch.zeros(C, **d), torch.ones(C, **d), torch.full((C,), 0.5, requires_grad=True, **d), *bundles)
    return sum(storages.values())


def test_training_saves_at_most_a_third_of_the_reference():
    # MPBNLIFNode defaults: hard reset to 0, decay_input=False, post-BN carry; fp32
    x = torch.randn(4, 8, 3, 5, 5, device=DEVICE, requires_grad=True)
    ours = _saved_bytes(K.mpbn_lif, x, LIF, NORM, TRAIN)
    theirs = _saved_bytes(ref.mpbn_lif, x, LIF, NORM, TRAIN)
    print(f"\nsaved for backward: triton {ours} B, torch reference {theirs} B (input {x.numel() * 4} B)")
    assert ours * 3 <= theirs


# ------------------------------------------------------------------------------------------
# torch.library registration
# ------------------------------------------------------------------------------------------


def _op_args(kind):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 2, 2, generator=g, requires_grad=True)
    v = torch.randn(3, 2, 2, generator=g, requires_grad=True)
    th = torch.full((2,), 0.3, requires_grad=True)
    flags = LIF.for_kernel("sigmoid", 4.0).to_op_args()
    if kind == "lif":
        return K.lif_elementwise_op, (x, v, th, None, None, None, None, None, *flags, 0, False, True, torch.float32)
    if kind == "eval":
        mu = torch.randn(2, generator=g)
        r = torch.rand(2, generator=g).add(0.5).requires_grad_()
        b = torch.randn(2, generator=g, requires_grad=True)
        return K.lif_elementwise_op, (x, v, th, mu, r, b, None, None, *flags, 1, True, True, torch.float32)
    if kind == "train":
        w = torch.rand(2, generator=g).add(0.5).requires_grad_()
        b = torch.randn(2, generator=g, requires_grad=True)
        return K.mpbn_lif_train_op, (x, v, w, b, torch.zeros(2), torch.ones(2), th, *BNKernelParameters(1e-5, 0.1, 0).to_op_args(), *flags, True, True, torch.float32, "")
    raise AssertionError(kind)


def _on_device(args):
    return tuple(a.to(DEVICE).detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args)


@pytest.mark.parametrize("kind", ["lif", "eval", "train"])
def test_opcheck(kind):
    op, args = _op_args(kind)
    args = _on_device(args)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_opcheck_adapt_forward():
    x = torch.randn(2, 3, 2)
    args = (x, torch.zeros(3, 2), torch.zeros(2), torch.ones(2), torch.ones(2), torch.zeros(2), torch.full((2,), 0.4),
            torch.tensor([0.3, 0.2], dtype=torch.float64), True, 1e-5, *LIF.for_kernel("sigmoid", 4.0).to_op_args(), True,
            torch.float32)
    args = _on_device(args)
    torch.library.opcheck(K.mpbn_lif_adapt_op, args, test_utils=("test_schema", "test_faketensor"))


def test_compiles_fullgraph():
    d = dict(device=DEVICE)
    x = torch.randn(2, 4, 2, 3, requires_grad=True, **d)
    v = torch.zeros(4, 2, 3, **d)
    w = torch.ones(2, requires_grad=True, **d)
    b = torch.zeros(2, requires_grad=True, **d)
    rm, rv = torch.zeros(2, **d), torch.ones(2, **d)

    def f(x, rm, rv):
        s, v_out = K.mpbn_lif(x, v, w, b, rm, rv, 0.5, LIF, NORM, TRAIN)
        return s.sum() + v_out.sum()

    rm2, rv2 = rm.clone(), rv.clone()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, rm, rv)
    out.backward()
    g_compiled = x.grad.clone()
    x.grad = None
    eager = f(x, rm2, rv2)
    eager.backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(g_compiled, x.grad)
    torch.testing.assert_close(rm, rm2)
    torch.testing.assert_close(rv, rv2)


@pytest.mark.parametrize(
    "name, signature",
    [
        ("lif_elementwise", K.LIF_FWD), ("lif_elementwise_bwd", K.LIF_BWD),
        ("mpbn_lif_train", K.TRAIN_FWD), ("mpbn_lif_train_bwd", K.TRAIN_BWD),
        ("mpbn_lif_adapt", K.ADAPT_FWD),
    ],
)
def test_op_schemas_carry_the_bundle_fields_in_order(name, signature):
    # the registered schema is the generated one: the backward's None padding counts from it
    args = [a.name for a in getattr(torch.ops.snnorm, name).default._schema.arguments]
    assert len(args) == signature.n_args
    fields = list(LIFParameters(sg.Sigmoid()).for_kernel("sigmoid", 4.0)._fields)
    start = args.index(fields[0])
    assert args[start : start + len(fields)] == fields
    assert signature.grads(None, None) == (None,) * signature.n_args
    with pytest.raises(ValueError, match="gradients for an op of"):
        signature.grads(*([None] * (signature.n_args + 1)))
