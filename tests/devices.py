"""Where the kernel tests run — decided here and nowhere else.

On a machine with CUDA the Triton tests build CUDA tensors and the kernels are compiled
for the GPU; without CUDA (or with ``SNNORM_TEST_DEVICE=cpu``) they build CPU tensors and
tests/conftest.py turns the Triton interpreter on before triton is first imported.
The hypothesis profile follows the device: "gpu" draws the sizes the interpreter cannot
afford (:data:`SIZES`), "cpu" stays small. ``SNNORM_HYPOTHESIS_PROFILE`` overrides the
profile (e.g. a shorter "gpu-quick" for perf/gpu_check.py).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import strategies as st

_forced = os.environ.get("SNNORM_TEST_DEVICE", "").strip().lower()
if _forced not in ("", "cpu", "cuda"):
    raise ValueError(f"SNNORM_TEST_DEVICE must be 'cpu' or 'cuda', got {_forced!r}")
if _forced == "cuda" and not torch.cuda.is_available():
    raise RuntimeError("SNNORM_TEST_DEVICE=cuda but torch.cuda.is_available() is False")

#: True when the kernel tests run compiled kernels on a CUDA GPU
ON_GPU = torch.cuda.is_available() and _forced != "cpu"
#: the device every kernel test builds its tensors on
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
#: the hypothesis profile loaded by conftest.py unless SNNORM_HYPOTHESIS_PROFILE says otherwise
DEFAULT_PROFILE = "gpu" if ON_GPU else "cpu"


#: ``marks=`` of a ``pytest.param`` that is slow only through the interpreter
SLOW_ON_CPU = () if ON_GPU else (pytest.mark.slow,)


def slow_on_cpu(test):
    """Marks ``test`` slow where the kernels run through the interpreter; on a GPU it stays in
    the default run (perf/gpu_check.py names such tests)."""
    return test if ON_GPU else pytest.mark.slow(test)


def property_examples(cases: int = 1, at_least: int = 2) -> int:
    """Examples for each of ``cases`` parametrized cases of one property test: the loaded
    profile's ``max_examples`` shared among them, at least ``at_least`` each. A test that
    parametrizes its mode instead of drawing it so keeps its time in the default run, and
    the longer profiles (cpu-long, gpu) scale it up. Call it at decoration time (the
    profile, --hypothesis-profile included, is loaded before the test modules are)."""
    from hypothesis import settings

    return max(at_least, -(-settings.default.max_examples // cases))


#: examples of the wide (slow-set) twin of a property test whose default run draws few
WIDE_EXAMPLES_MIN = 20


def wide_examples() -> int:
    """Examples of a property test's wide twin (marked slow): at least
    :data:`WIDE_EXAMPLES_MIN`, or the profile's count when that is larger."""
    from hypothesis import settings

    return max(WIDE_EXAMPLES_MIN, settings.default.max_examples)


class _Sizes:
    """Shape pools for the property tests. The GPU pools reach past what the interpreter
    can run: M = N·H·W past the one-program-per-channel limit (8192), C past the SM count
    (132), 7×7 and 56×56 maps, T up to 16 — capped at ``max_elems`` per tensor."""

    def __init__(self, gpu: bool):
        self.gpu = gpu
        if gpu:
            self.t_max, self.t_max_lowp = 16, 16
            self.n = [1, 2, 3, 4, 5, 8, 32]
            self.c = [1, 2, 3, 4, 7, 64, 133, 256]
            self.spatial = [(), (1,), (5,), (3, 5), (7, 7), (8, 8), (14, 14), (32, 32), (56, 56), (2, 3, 4)]
            self.max_elems = 1 << 23
        else:
            self.t_max, self.t_max_lowp = 8, 4
            self.n = [1, 2, 3, 4, 5]
            self.c = [1, 2, 3, 4]
            self.spatial = [(), (1,), (2,), (3,), (5,), (7,), (2, 3), (3, 5), (5, 7), (3, 3)]
            self.max_elems = 1 << 12

    def shapes(self, min_per_channel: int = 1, lowp: bool = False, t_max: int | None = None):
        """[T, N, C, *spatial] with at least ``min_per_channel`` values per channel and step
        (``t_max`` caps T further, e.g. for a test whose cost grows with T on the CPU)."""
        top = self.t_max_lowp if lowp else self.t_max
        top = min(top, t_max) if t_max else top

        @st.composite
        def draw_shape(draw):
            T = draw(st.integers(1, top))
            sp = draw(st.sampled_from(self.spatial))
            C = draw(st.sampled_from(self.c))
            N = draw(st.sampled_from(self.n))
            S = math.prod(sp)
            if N * S < min_per_channel:
                N = -(-min_per_channel // S)
            while N > 1 and T * N * C * S > self.max_elems:  # stay within the time budget
                N //= 2
            if T * N * C * S > self.max_elems:
                C = max(1, self.max_elems // (T * N * S))
            if N * S < min_per_channel:
                N = -(-min_per_channel // S)
            return (T, N, C, *sp)

        return draw_shape()


#: the shape pools of this run's device
SIZES = _Sizes(ON_GPU)


def to_device(t):
    """``t`` moved to :data:`DEVICE`, keeping its strides (None passes through)."""
    if t is None or not isinstance(t, torch.Tensor):
        return t
    if t.device == DEVICE:
        return t
    out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=DEVICE)
    return out.copy_(t)
