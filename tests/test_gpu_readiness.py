"""What only a GPU sees, checked on CPU (issue 23, DESIGN.md §9): devices and grid limits.

The triton ops run on *meta* tensors that pose as CUDA tensors (``cuda:1`` here while
``cuda:0`` is "current"), with the interpreter's launch step (``InterpretedFunction.run``)
replaced by a recorder: no kernel runs, no memory is allocated, so shapes of billions of
elements cost nothing. ``torch.cuda.device`` / ``current_device`` are replaced by a tracker
of the current device, ``get_device_properties`` by an H100's SM count, and the occupancy
probe's compile (``warmup``) by a stand-in with a register count. The scenarios are the
compile check's (``perf/tools/compile_check.py``): every op of the triton backend, every
mode, forward and backward, synchronised variants included.

- **Device.** Every launch (and every occupancy probe, and every device-properties read)
  happens under the tensors' device; tensors on two devices raise ValueError.
- **Grid limits.** No launch exceeds 2³¹ − 1 programs on axis 0 or 65,535 on axes 1 and 2,
  at extreme shapes (norm → LIF with N·S > 2²⁴, LIF / MPBN with C > 65,535, every
  BN-family op at N = 256, 224 × 224).

A GPU alone confirms that the launches really run there (two devices for the device guard;
the real launch for the grid limits: the interpreter never checks them).
"""

from __future__ import annotations

import types

import pytest
import torch
from devices import SLOW_ON_CPU

pytest.importorskip("triton")

from perf.tools import CaptureSync, posing_as_cuda, run_scenario, scenarios  # noqa: E402

AXIS0_MAX = 2**31 - 1
AXIS12_MAX = 65535


class FakeGPU:
    """Meta tensors posing as ``cuda:<index>``, a tracked current device, and a launch recorder."""

    def __init__(self, monkeypatch, index: int = 1, current: int = 0, sm_count: int = 132):
        from triton.runtime.interpreter import InterpretedFunction

        from snnorm.backends.sync import StatsSync
        from snnorm.kernels import _common

        self.current = current
        self.launches: list = []  # (kernel, grid, current device at the launch)
        self.probes: list = []  # (kernel, current device) of each occupancy probe's compile
        self.options: list = []  # (kernel, compile options) of each launch and probe
        self.args: list = []  # (kernel, positional arguments) of each launch
        self.props_asked: list = []  # the devices whose properties were read
        fake = self

        self.make, self._enter = posing_as_cuda(index)

        class Device:  # torch.cuda.device, tracking the current device
            def __init__(self, device):
                self.target = device.index if isinstance(device, torch.device) else int(device)

            def __enter__(self):
                self.saved, fake.current = fake.current, self.target

            def __exit__(self, *exc):
                fake.current = self.saved
                return False

        def record(kernel, *args, grid, warmup, **kwargs):
            if warmup:
                return None
            grid = grid(kwargs) if callable(grid) else grid
            fake.launches.append((kernel.fn.__name__, tuple(int(g) for g in grid), fake.current))
            fake.options.append((kernel.fn.__name__, {k: v for k, v in kwargs.items() if k in LAUNCH_OPTIONS}))
            fake.args.append((kernel.fn.__name__, args))
            return None

        def probe(kernel, *args, grid, **kwargs):
            fake.probes.append((kernel.fn.__name__, fake.current))
            fake.options.append((kernel.fn.__name__, {k: v for k, v in kwargs.items() if k in LAUNCH_OPTIONS}))
            return types.SimpleNamespace(n_regs=64, metadata=types.SimpleNamespace(shared=0), _init_handles=lambda: None)

        props = types.SimpleNamespace(multi_processor_count=sm_count, major=9, minor=0, name="fake-gpu",
                                      total_memory=80 << 30, max_shared_memory_per_block_optin=227 << 10)

        def get_props(device=None):
            fake.props_asked.append(torch.device(device) if device is not None else None)
            return props

        monkeypatch.setattr(torch.cuda, "device", Device)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: fake.current)
        monkeypatch.setattr(torch.cuda, "get_device_properties", get_props)
        monkeypatch.setattr(torch.cuda._tls, "is_initializing", True, raising=False)
        monkeypatch.setattr(InterpretedFunction, "run", record)
        monkeypatch.setattr(InterpretedFunction, "warmup", probe, raising=False)
        monkeypatch.setattr(_common, "PROGRAMS_PER_SM", {})
        monkeypatch.setattr(_common, "_DEVICE_PROPS", {})
        monkeypatch.setattr(StatsSync, "from_name", staticmethod(
            lambda name: CaptureSync() if name == CaptureSync.group_name else None))

    def run(self, fn):
        with self._enter():
            return fn()


#: the compile options :func:`snnorm.kernels._common.launch_options` sets on every launch
LAUNCH_OPTIONS = ("num_warps", "maxnreg", "enable_fp_fusion")


@pytest.fixture
def ops():
    from snnorm import backends

    return backends.get_ops("triton")


def _every_mode():
    """One compile-check scenario per mode (the CI grid's first shape, fp32)."""
    seen = {}
    for name, T, N, C, sp, dtype, mode in scenarios("ci"):
        seen.setdefault(mode, (T, N, C, sp, dtype, mode))
    return list(seen.values())


# ------------------------------------------------------------------------------------------
# devices
# ------------------------------------------------------------------------------------------


def test_every_launch_and_probe_runs_under_the_tensors_device(monkeypatch, ops):
    from snnorm import surrogate as sg

    gpu = FakeGPU(monkeypatch, index=1, current=0)
    modes = _every_mode()
    assert len(modes) >= 20
    for T, N, C, sp, dtype, mode in modes:
        before = len(gpu.launches)
        gpu.run(lambda: run_scenario(ops, sg, gpu.make, T, N, C, sp, dtype, mode))
        assert len(gpu.launches) > before, f"{mode}: no launch captured"
        assert gpu.current == 0, f"{mode}: the current device was not restored"
    wrong = [(k, cur) for k, _, cur in gpu.launches if cur != 1]
    assert not wrong, f"launches not under cuda:1 (current device at launch): {wrong[:10]}"
    kernels = {k for k, _, _ in gpu.launches}
    assert {"_lif_fwd_kernel", "_lif_bwd_kernel", "_norm_lif_fwd_kernel", "_norm_lif_bwd_kernel",
            "stats_partial_kernel", "_apply_kernel"} <= kernels, kernels
    assert gpu.probes, "no occupancy probe ran"
    assert all(cur == 1 for _, cur in gpu.probes), gpu.probes
    assert gpu.props_asked and all(d == torch.device("cuda", 1) for d in gpu.props_asked), gpu.props_asked
    # every launch and probe compiles as launched: fp-fusion off (forward and recompute round
    # alike); in fp32 ptxas keeps its own register target but in the backward reduce with a ∂y
    # of another layout than x (here the expanded ∂y of a sum)
    wrong = [(k, o) for k, o in gpu.options
             if o.get("enable_fp_fusion") is not False or ("maxnreg" in o and k != "_bwd_reduce_kernel")]
    assert not wrong, f"launches without launch_options(num_warps, fp32): {wrong[:10]}"


def test_fp64_launches_declare_their_register_budget(monkeypatch, ops):
    """launch_options: an fp64 launch tells ptxas one program's register budget (the SM's
    register file over its threads), which triton 3.6's ptxas spilled without."""
    from snnorm import surrogate as sg

    gpu = FakeGPU(monkeypatch, index=1, current=0)
    for mode in ("mpbn-train", "bn-train", "lif", "norm-lif-train", "layer-norm-lif"):
        C = 256 if mode.startswith("layer") else 16
        gpu.run(lambda: run_scenario(ops, sg, gpu.make, 4, 8, C, () if mode.startswith("layer") else (4, 4),
                                     "float64", mode))
    kernels = {k for k, _ in gpu.options}
    assert {"_mpbn_lif_pipelined_fwd_kernel", "_apply_kernel", "_lif_fwd_kernel", "_norm_lif_bwd_kernel",
            "_row_norm_lif_bwd_kernel"} <= kernels, kernels
    wrong = [(k, o) for k, o in gpu.options
             if o.get("enable_fp_fusion") is not False or o.get("maxnreg") != min(255, 65536 // (32 * o["num_warps"]))]
    assert not wrong, f"fp64 launches without their register budget: {wrong[:10]}"


def test_tensors_on_two_devices_raise_value_error(monkeypatch, ops):
    from snnorm.params import BNStatistics, LIFParameters, MPBNParameters
    from snnorm import surrogate as sg

    gpu = FakeGPU(monkeypatch, index=1, current=0)
    T, N, C = 2, 4, 3
    f32 = torch.float32
    x = gpu.make((T, N, C, 4), f32)
    v = gpu.make((N, C, 4), f32)
    w1, w0 = gpu.make((C,), f32), gpu.make((C,), f32, index=0)
    p0, v0, rv0 = gpu.make((T,), f32, index=0), gpu.make((N, C, 4), f32, index=0), gpu.make((C,), f32, index=0)
    rm, rv = gpu.make((C,), f32), gpu.make((C,), f32)
    lif = LIFParameters(sg.Sigmoid(), tau=2.0, decay_input=False, v_reset=0.0, detach_reset=False)
    calls = {
        "batch_norm_seq": lambda: ops.batch_norm_seq(x, w0, w1, rm, rv, training=True, momentum=0.1, eps=1e-5),
        "tebn": lambda: ops.tebn(x, w1, w1, rm, rv, p0, training=True, momentum=0.1, eps=1e-5),
        "lif": lambda: ops.lif(x, v0, 1.0, lif),
        "mpbn_lif": lambda: ops.mpbn_lif(x, v, w1, w1, rm, rv0, 1.0, lif,
                                         MPBNParameters(eps=1e-5, carry="normalized"),
                                         BNStatistics(training=True, momentum=0.1, batches_tracked=0)),
        "norm_lif": lambda: ops.norm_lif("batch_norm", x, 0.0, w0, w1, None, rm, rv, momentum=[0.1], eps=1e-5,
                                         batch_stats=True, threshold=1.0, neuron=lif),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="cuda:0.*cuda:1"):
            gpu.run(call)
            pytest.fail(f"{name}: no ValueError")
    assert not gpu.launches, "a launch happened before the device check"


def test_a_launcher_refuses_mixed_devices_directly():
    """The launcher's guard itself (not only the op layer): a real CPU and a meta tensor."""
    from snnorm.kernels import _common

    with pytest.raises(ValueError, match="cpu.*meta|meta.*cpu"):
        _common.common_device("probe", torch.zeros(2), [torch.zeros(2, device="meta")])
    assert _common.common_device("probe", torch.zeros(1), None, 3.0) == torch.device("cpu")
    assert _common.common_device("probe", None, 1.0) is None


# ------------------------------------------------------------------------------------------
# grid limits
# ------------------------------------------------------------------------------------------


def _grid_violations(launches) -> list:
    bad = []
    for kernel, grid, _ in launches:
        grid = tuple(grid) + (1,) * (3 - len(grid))
        if not (1 <= grid[0] <= AXIS0_MAX and 1 <= grid[1] <= AXIS12_MAX and 1 <= grid[2] <= AXIS12_MAX):
            bad.append((kernel, grid))
    return bad


#: (mode, T, N, C, spatial): the issue's extreme shapes
EXTREME = [
    # norm → LIF with N·S > 2^24 (the old (C, N·S/128) grid had 131,072 programs on axis 1)
    ("norm-lif-train", 4, 1025, 2, (128, 128)),
    ("norm-lif-train-soft", 2, 1025, 2, (128, 128)),
    ("norm-lif-eval", 2, 1025, 2, (128, 128)),
    # LIF and MPBN with C > 65,535 (a flattened 256×16×16 feature map, and past it)
    ("lif", 4, 8, 70000, ()),
    ("lif-soft-decay", 4, 8, 65536, ()),
    ("mpbn-eval", 4, 8, 70000, ()),
    ("mpbn-folded", 4, 8, 70000, ()),
    ("mpbn-train", 4, 8, 70000, ()),  # resident: one program per channel
    ("mpbn-train", 4, 3, 70000, (32, 32)),  # pipelined (3072 elements a channel): P·C programs
    ("mpbn-adapt-running", 4, 8, 70000, ()),
    # every BN-family op at N = 256, 224×224
    *[(m, 4, 256, 64, (224, 224)) for m in ("bn-train", "bn-eval", "tebn-train", "tebn-eval", "bntt-train",
                                            "bntt-eval", "tab-train", "tab-eval", "mpbn-train", "mpbn-eval",
                                            "bn-train-sync", "tab-train-sync", "mpbn-train-sync",
                                            "norm-lif-train")],
]


@pytest.mark.parametrize("mode,T,N,C,sp", EXTREME, ids=[f"{m}-T{T}-N{N}-C{C}-{'x'.join(map(str, sp)) or '-'}"
                                                         for m, T, N, C, sp in EXTREME])
def test_no_launch_exceeds_the_grid_limits(monkeypatch, ops, mode, T, N, C, sp):
    from snnorm import surrogate as sg

    gpu = FakeGPU(monkeypatch, index=0, current=0)
    gpu.run(lambda: run_scenario(ops, sg, gpu.make, T, N, C, sp, "float16", mode))
    assert gpu.launches, "no launch captured"
    assert not _grid_violations(gpu.launches), _grid_violations(gpu.launches)


@pytest.mark.parametrize("stride,copied", [(3, False), (1 << 21, True)])
def test_row_norm_lif_backward_copies_a_grad_s_past_int32_column_offsets(monkeypatch, stride, copied):
    """The fused row-norm → LIF backward addresses ∂s's columns in int32 (at D = 2048 the int64
    offsets spilled under triton 3.6): a ∂s whose (D − 1)·|column stride| reaches 2³¹ is read
    from a contiguous copy, any other in place."""
    from snnorm.kernels.row_norm_lif import launch_row_norm_lif_backward
    from snnorm.params import LIFKernelParameters

    gpu = FakeGPU(monkeypatch, index=0, current=0)
    T, R, D = 4, 8, 2048
    x = gpu.make((T, R, D), torch.float32)
    gs = gpu.make((T, R, D), torch.float32, strides=(R * D * stride, D * stride, stride))
    w = gpu.make((D,), torch.float32)
    stats = [gpu.make((R,), torch.float32) for _ in range(2)]
    ckpt = gpu.make((0, R, D), torch.float32)
    lif = LIFKernelParameters(2.0, False, 0.0, False, False, "sigmoid", 4.0)
    gpu.run(lambda: launch_row_norm_lif_backward(gs, None, x, None, w, None, *stats, ckpt, False, 1.0, 0.0, lif,
                                                 True, False))
    (launched,) = [a for k, a in gpu.args if k == "_row_norm_lif_bwd_kernel"]
    assert launched[0].stride(-1) == (1 if copied else stride)


def test_the_grid_check_sees_an_oversized_grid():
    """The checker itself: the old norm → LIF grid at N·S = 1025·128·128 is over the limit."""
    assert _grid_violations([("k", (2, 1025 * 128 * 128 // 128 + 1), 0)])
    assert _grid_violations([("k", (1, 70000), 0)])
    assert not _grid_violations([("k", (2**31 - 1, 65535, 65535), 0)])


# ------------------------------------------------------------------------------------------
# host synchronisation (CUDA graphs)
# ------------------------------------------------------------------------------------------


class HostSyncMeter:
    """Counts, inside an op's forward and backward, what stalls the stream or breaks a CUDA-graph
    capture: ``aten._local_scalar_dense`` (``.item()``, ``float(t)``, ``int(t)``, ``bool(t)``),
    ``aten.lift_fresh`` (``torch.tensor(host data)`` / ``new_tensor``: a host copy on a GPU) and
    host-to-device copies (``_to_copy`` / ``copy_`` from a CPU tensor to another device).

    snnorm's custom ops run their implementation (the launchers) under the meter too (a
    dispatch mode sees a custom op as one call otherwise)."""

    def __init__(self):
        self.events: list = []

    def __enter__(self):
        from torch._library.custom_ops import OPDEFS
        from torch.utils._python_dispatch import TorchDispatchMode

        meter = self

        def host_copy(func, args, kwargs) -> bool:
            name = func._schema.name
            if name == "aten::_to_copy":
                src, dst = args[0], kwargs.get("device")
                return src.device.type == "cpu" and dst is not None and torch.device(dst).type != "cpu"
            if name == "aten::copy_":
                return args[1].device.type == "cpu" and args[0].device.type != "cpu"
            return False

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = func._schema.name
                if name in ("aten::_local_scalar_dense", "aten::lift_fresh") or host_copy(func, args, kwargs):
                    import traceback

                    where = [f"{f.filename.split('snnorm/')[-1]}:{f.lineno}" for f in traceback.extract_stack()
                             if "/snnorm/" in f.filename][-2:]
                    meter.events.append((name, where))
                opdef = OPDEFS.get(name) if func.namespace == "snnorm" else None
                if opdef is not None:
                    with Mode():
                        return opdef._init_fn(*args, **kwargs)
                return func(*args, **kwargs)

        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def _cpu_make(shape, dtype, requires_grad=False, strides=None):
    g = torch.Generator().manual_seed(hash(tuple(shape)) % 1000)
    return (torch.rand(shape, generator=g, dtype=torch.float64) + 0.5).to(dtype).requires_grad_(requires_grad)


#: fp64 sends per-step momenta as a tensor (Triton's float arguments are fp32): those paths again
_FP64_MODES = ["tab-train", "bntt-train", "norm-lif-train", "mpbn-adapt-running", "mpbn-adapt-batch", "tab-train-sync"]


#: the default run's fp32 modes: one per kernel family (the rest in the slow set)
_QUICK_MODES = ("lif", "mpbn-train", "mpbn-eval", "mpbn-folded", "mpbn-adapt-batch", "tebn-train", "tab-train",
                "bn-train", "bntt-train", "norm-lif-train", "bn-train-sync", "mpbn-train-sync", "norm-lif-train-sync",
                "layer-norm", "layer-norm-lif")


@pytest.mark.parametrize("mode,dtype", [(m, "float32") if m in _QUICK_MODES else
                                        pytest.param(m, "float32", marks=SLOW_ON_CPU) for *_, m in _every_mode()] +
                         [(m, "float64") for m in _FP64_MODES])
def test_no_host_synchronisation_inside_an_op(monkeypatch, ops, mode, dtype):
    """Each op of the triton backend, forward and backward (training) or forward (eval), on
    CPU tensors through the interpreter: zero host reads and zero host-built tensors."""
    from snnorm import surrogate as sg
    from snnorm.backends.sync import StatsSync

    monkeypatch.setattr(StatsSync, "from_name", staticmethod(
        lambda name: CaptureSync() if name == CaptureSync.group_name else None))
    T, N, C, sp = 3, 2, 3, (2, 3)
    with HostSyncMeter() as meter:
        run_scenario(ops, sg, _cpu_make, T, N, C, sp, dtype, mode)
    assert not meter.events, f"{mode}: host synchronisation inside the op: {meter.events}"


def test_no_host_synchronisation_with_differing_momenta(ops):
    """Per-step momenta that differ (TAB, BNTT) reach the reduce as a device tensor built by fills."""
    T, N, C = 3, 2, 3
    x = _cpu_make((T, N, C, 4), torch.float32, True)
    w, b = _cpu_make((T, C), torch.float32, True), _cpu_make((T, C), torch.float32, True)
    rm, rv, p = _cpu_make((T, C), torch.float32), _cpu_make((T, C), torch.float32), _cpu_make((T,), torch.float32, True)
    expected = rm.clone()
    with HostSyncMeter() as meter:
        y, _ = ops.tab(x, w, b, rm, rv, p, training=True, momentum=[0.1, 0.2, 0.1], eps=1e-5)
        y.sum().backward()
    assert not meter.events, meter.events
    assert not torch.equal(rm, expected)  # the running statistics were updated


@pytest.mark.parametrize("synced", [False, True], ids=["local", "synced"])
def test_no_host_synchronisation_in_tab_single_step(monkeypatch, ops, synced):
    """TAB's single-step path (a continuation with a prefix): the count stays a host number,
    or a device scalar when synchronised; it is never read back."""
    T, N, C = 1, 3, 2
    x0, x1 = _cpu_make((T, N, C, 4), torch.float32, True), _cpu_make((T + 1, N, C, 4), torch.float32, True)
    w, b = _cpu_make((2, C), torch.float32, True), _cpu_make((2, C), torch.float32, True)
    rm, rv, p = _cpu_make((2, C), torch.float32), _cpu_make((2, C), torch.float32), _cpu_make((2,), torch.float32, True)
    sync = CaptureSync() if synced else None
    with HostSyncMeter() as meter:
        y0, prefix = ops.tab(x0, w[:1], b[:1], rm[:1], rv[:1], p[:1], training=True, momentum=[0.1], eps=1e-5,
                             prefix=(0.0, torch.zeros(C), torch.zeros(C)), sync=sync)  # an empty prefix: step 0
        y1, prefix = ops.tab(x1, w, b, rm, rv, p, training=True, momentum=[0.1, 0.1], eps=1e-5, prefix=prefix,
                             sync=sync)
        (y0.sum() + y1.sum() + prefix[1].sum()).backward()
    assert not meter.events, f"host synchronisation in TAB's single-step path: {meter.events}"
    assert float(prefix[0]) == N * 4 * (T + T + 1)


def test_the_meter_sees_host_synchronisation():
    """The meter itself: ``.item()``, ``float(t)`` and ``torch.tensor(list)`` are counted."""
    t = torch.ones(3)
    with HostSyncMeter() as meter:
        t.sum().item()
        float(t[0])
        torch.tensor([0.1, 0.2])
        t.new_tensor([1.0])
        torch.full((2,), 0.1)[1].fill_(0.2)  # a fill is not a host copy
    names = [name for name, _ in meter.events]
    assert names.count("aten::_local_scalar_dense") == 2 and names.count("aten::lift_fresh") == 2, names


def test_device_vector_equals_torch_tensor():
    from snnorm.kernels.api import device_vector

    for values in ([0.1, 0.2, 0.1], [0.1] * 4, [0.3, 0.09, 0.081], []):
        for dtype in (torch.float32, torch.float64):
            assert torch.equal(device_vector(values, dtype, torch.device("cpu")), torch.tensor(values, dtype=dtype))


def test_block_grid_splits_blocks_over_axes_1_and_2():
    from snnorm.kernels._common import block_grid

    assert block_grid(3, 10) == (3, 10, 1)
    assert block_grid(3, 65535) == (3, 65535, 1)
    for blocks in (65536, 131071, 10**7, 4 * 10**9):
        c, b1, b2 = block_grid(5, blocks)
        assert b1 <= AXIS12_MAX and b2 <= AXIS12_MAX and b1 * b2 >= blocks and (b1 - 1) * b2 < blocks


def test_norm_lif_with_blocks_split_over_two_axes_equals_one_axis(monkeypatch, ops):
    """The fused norm → LIF with its blocks split over grid axes 1 and 2 (an overshooting
    B1·B2, forced here with a 2-program axis limit and 16-element blocks) equals the one-axis
    grid: spikes, membrane and every gradient (the overshoot programs write nothing)."""
    from snnorm import surrogate as sg
    from snnorm.kernels import _common, norm_lif
    from snnorm.params import LIFParameters

    monkeypatch.setattr(norm_lif, "INTERPRETER_BLOCK_M", 16)
    lif = LIFParameters(sg.Sigmoid(), tau=2.0, decay_input=False, v_reset=0.0, detach_reset=False)
    T, N, C = 3, 4, 2
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(T, N, C, 20, generator=g) * 2 + 0.5  # M = N·S = 80: 5 blocks of 16
    w0, b0 = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g)

    def run():
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        rm, rv = torch.zeros(C), torch.ones(C)
        s, v = ops.norm_lif("batch_norm", x, 0.0, w, b, None, rm, rv, momentum=[0.1], eps=1e-5, batch_stats=True,
                            threshold=1.0, neuron=lif)
        (s * torch.linspace(0.5, 1.5, s.numel()).view(s.shape)).sum().add(v.square().sum()).backward()
        return s.detach(), v.detach(), x.grad, w.grad, b.grad, rm

    one_axis = run()
    monkeypatch.setattr(_common, "GRID_AXIS_MAX", 2)  # 5 blocks -> B2 = 3, B1 = 2: one program past the end
    two_axes = run()
    for a, b_ in zip(one_axis, two_axes):
        assert torch.equal(a, b_)
