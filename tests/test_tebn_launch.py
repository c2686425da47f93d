"""How the TEBN launchers size their grids and combine partial statistics.

The agreement with the torch backend is tests/test_triton_tebn.py's; here: the
occupancy arithmetic that sizes the grid from a compiled kernel's registers (its GPU
inputs faked, so it runs on CPU), and the chunked, vectorised combine of the partial
(count, mean, M2) triples, including a last chunk that is only partly filled.
"""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch
from tolerances import CHUNKED_STATS_REL

pytest.importorskip("triton")
from snnorm.kernels import _common as bn_tiles  # noqa: E402
from snnorm.kernels import bn_pipeline as bnp  # noqa: E402

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is off", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(
    "n_regs, num_warps, shared, expected",
    [
        (32, 8, 0, 8),  # 32 regs: the 2048-thread limit (8 × 256 threads) binds first
        (64, 8, 0, 4),  # 64 regs × 256 threads = 16 K of the 64 K registers
        (255, 4, 0, 2),  # 255 regs round up to 8 K per warp: 32 K per program
        (40, 4, 0, 12),  # 40 regs → 1280 per warp (unit 256): 65536 // 5120
        (16, 1, 0, 32),  # one warp, few registers: the 32-programs-per-SM cap
        (32, 4, 100 * 1024, 2),  # shared memory binds: 228 KB // 100 KB
    ],
)
def test_programs_per_sm_from_registers(n_regs, num_warps, shared, expected):
    assert bn_tiles.resident_programs_per_sm(n_regs, num_warps, shared) == expected


class _FakeKernel:
    """A JIT function whose compiled form reports ``n_regs`` (what a GPU's warmup gives)."""

    def __init__(self, n_regs=None):
        self.fn = SimpleNamespace(__name__=f"fake_kernel_{n_regs}")
        self.n_regs = n_regs
        self.warmups = 0

    def warmup(self, *args, grid, **kwargs):
        self.warmups += 1
        if self.n_regs is None:
            raise AttributeError("no n_regs on this triton")
        return SimpleNamespace(n_regs=self.n_regs, metadata=SimpleNamespace(shared=0), _init_handles=lambda: None)


@pytest.fixture
def fake_gpu(monkeypatch):
    props = SimpleNamespace(multi_processor_count=132, regs_per_multiprocessor=65536,
                            max_threads_per_multi_processor=2048, shared_memory_per_multiprocessor=228 * 1024,
                            warp_size=32)
    monkeypatch.setattr(bn_tiles, "device_props", lambda device: props)
    monkeypatch.setattr(bn_tiles, "PROGRAMS_PER_SM", {})
    return torch.device("cuda")


def test_grid_sized_from_the_compiled_kernel(fake_gpu):
    T, N, C, S = 4, 64, 64, 1024
    kernel = _FakeKernel(n_regs=64)
    consts = dict(ACC_DTYPE="fp32")
    built = []
    geo = bn_tiles.fitted_geometry(kernel, T, N, C, S, fake_gpu, torch.float32, lambda g: built.append(g) or (), consts)
    expected = bn_tiles.geometry(T, N, C, S, fake_gpu, programs=4 * 132)  # 64 regs, 8 warps: 4 per SM
    assert geo == expected and geo.num_warps == 8
    assert geo != bn_tiles.geometry(T, N, C, S, fake_gpu)  # not the fixed 8 per SM
    programs = math.prod(geo.grid)
    assert 4 * 132 // 2 <= programs <= 2 * 4 * 132, geo  # whole tiles per program: near the target
    assert len(built) == 1  # compiled once, on the fallback geometry's arguments
    bn_tiles.fitted_geometry(kernel, T, N, C, S, fake_gpu, torch.float32, lambda g: built.append(g) or (), consts)
    assert kernel.warmups == 1 and len(built) == 1  # cached per kernel and configuration: no arguments built


def test_grid_falls_back_to_8_per_sm_when_registers_are_unknown(fake_gpu):
    T, N, C, S = 4, 64, 64, 1024
    with pytest.warns(RuntimeWarning, match="8 programs per SM"):
        geo = bn_tiles.fitted_geometry(_FakeKernel(None), T, N, C, S, fake_gpu, torch.float32, lambda g: (), {})
    assert geo == bn_tiles.geometry(T, N, C, S, fake_gpu, programs=8 * 132)


def _stats(x, monkeypatch, tile, splits):
    """Batch statistics with ``splits`` programs per (channel block, t) and tiles of ``tile``."""
    T, N, C, S = x.shape
    monkeypatch.setitem(bn_tiles.TUNING, "tile_elems", tile)
    monkeypatch.setitem(bn_tiles.TUNING, "programs", None)
    c_blocks = bn_tiles.geometry(T, N, C, S, torch.device(DEVICE)).c_blocks
    monkeypatch.setitem(bn_tiles.TUNING, "programs", splits * T * c_blocks)
    geo = bn_tiles.geometry(T, N, C, S, torch.device(DEVICE))
    rm = torch.zeros(C, dtype=x.dtype, device=x.device)
    rv = torch.ones_like(rm)
    mean, var = bnp.launch_stats(bnp.RULES["tebn"], x, rm, rv, [1.0])
    return geo, (mean, var, rm, rv)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_combine_in_chunks_with_a_partial_last_chunk(monkeypatch, dtype):
    """P = 3·5 partials, combined 2 at a time (BLOCK_P = 2): the last chunk holds one."""
    T, N, C, S = 3, 5, 3, 4
    gen = torch.Generator().manual_seed(0)
    x = 100.0 + torch.randn(T, N, C, S, generator=gen, dtype=torch.float64) * torch.arange(1, C + 1).view(1, 1, C, 1)
    x = x.to(dtype).to(DEVICE)
    geo, (mean, var, rm, rv) = _stats(x, monkeypatch, 4, 5)
    assert geo.parts == 15
    block_p, _ = bn_tiles.combine_tiles(geo.parts, C, DEVICE != "cuda")
    assert block_p == 2 and geo.parts % block_p == 1
    tol = CHUNKED_STATS_REL[dtype]
    flat = x.double().transpose(0, 2).reshape(C, -1)
    var_scale = flat.var(1).max().item()
    assert (mean.double() - flat.mean(1)).abs().max().item() <= tol * flat.abs().max().item()
    assert (var.double() - flat.var(1, unbiased=False)).abs().max().item() <= tol * var_scale
    assert (rv.double() - flat.var(1)).abs().max().item() <= tol * var_scale
    # one program per (channel block, t), one chunk: the same statistics
    one_geo, one = _stats(x, monkeypatch, 1 << 16, 1)
    assert one_geo.parts == T and bn_tiles.combine_tiles(T, C, DEVICE != "cuda")[0] >= T
    assert (one[1].double() - var.double()).abs().max().item() <= tol * var_scale
    # deterministic: the same bits when run again
    _, again = _stats(x, monkeypatch, 4, 5)
    assert all(torch.equal(a, b) for a, b in zip((mean, var, rm, rv), again))
