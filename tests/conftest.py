"""Test setup: the kernel device, the Triton interpreter, hypothesis profiles.

The default run (``pytest``, pyproject's addopts) leaves out the tests marked ``slow``;
``pytest -m slow`` runs them. Every test has pyproject's timeout unless it carries its own.

tests/devices.py decides where the Triton tests run (CUDA when present, else CPU through
the interpreter; ``SNNORM_TEST_DEVICE=cpu`` forces the CPU). TRITON_INTERPRET must be set
before triton is first imported, so it is set here, before anything imports the kernels —
and only when the tests will build CPU tensors: on a GPU the kernels must be compiled.
"""

import os

from devices import DEFAULT_PROFILE, ON_GPU

if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]
# cpu: the default run through the Triton interpreter (tests/devices.py keeps shapes small);
# cpu-long: 4.5× the draws, after the default run in CI (.ci/run: -m hypothesis
# --hypothesis-profile=cpu-long).
settings.register_profile("cpu", max_examples=8, deadline=None, derandomize=True, suppress_health_check=_SLOW_OK)
settings.register_profile("cpu-long", max_examples=36, deadline=None, derandomize=True, suppress_health_check=_SLOW_OK)
# gpu: the wide shape pools of tests/devices.py; bounded so the triton tests finish in minutes.
settings.register_profile("gpu", max_examples=60, deadline=None, suppress_health_check=_SLOW_OK)
# gpu-quick: what perf/gpu_check.py runs inside its time budget.
settings.register_profile("gpu-quick", max_examples=15, deadline=None, derandomize=True, suppress_health_check=_SLOW_OK)
settings.load_profile(os.environ.get("SNNORM_HYPOTHESIS_PROFILE", DEFAULT_PROFILE))


@pytest.fixture(scope="module")
def sync(tmp_path_factory):
    """A process group of one rank (this process) and its cross-rank hook: the synchronised
    code paths with W = 1 (gloo; on a GPU, nccl for CUDA tensors). Destroyed with the module."""
    import torch.distributed as dist

    from snnorm.backends.sync import StatsSync

    if dist.is_initialized():
        raise RuntimeError("the sync fixture needs its own process group, but one is already initialised here")
    store = tmp_path_factory.mktemp("gloo") / "store"
    dist.init_process_group("cpu:gloo,cuda:nccl" if ON_GPU else "gloo", init_method=f"file://{store}", rank=0,
                            world_size=1)
    try:
        yield StatsSync(dist.group.WORLD)
    finally:
        dist.destroy_process_group()
