"""Test setup: Triton interpreter on CPU-only machines, hypothesis profiles.

TRITON_INTERPRET must be set before triton is first imported, so it is set here,
before anything imports snnorm's kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

# cpu: sized for CI through the Triton interpreter; gpu: a wider search on a real GPU.
settings.register_profile(
    "cpu",
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "gpu",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("SNNORM_HYPOTHESIS_PROFILE", "gpu" if torch.cuda.is_available() else "cpu"))
