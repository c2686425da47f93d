"""Test setup: the kernel device, the Triton interpreter, hypothesis profiles.

The default run (``pytest``, pyproject's addopts) leaves out the tests marked ``slow``;
``pytest -m slow`` runs them. Every test has pyproject's timeout unless it carries its own.

tests/devices.py decides where the Triton tests run (CUDA when present, else CPU through
the interpreter; ``SNNORM_TEST_DEVICE=cpu`` forces the CPU). TRITON_INTERPRET must be set
before triton is first imported, so it is set here, before anything imports the kernels —
and only when the tests will build CPU tensors: on a GPU the kernels must be compiled.

Under ``CI=true`` (.ci/run sets it) nothing that the suite's verdict rests on may be missing:
the numerical oracles (spikingjelly, snntorch, and h5py for spikingjelly's model zoo), the
kernel dependency (triton) and, without a GPU, the Triton interpreter. The test files skip
when one is absent (a developer's machine may lack an oracle); in CI that skip would turn a
whole file green unseen, so the session stops with a message naming what is missing instead.
"""

import os
import random

from devices import DEFAULT_PROFILE, ON_GPU

if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]
# cpu: the default run through the Triton interpreter (tests/devices.py keeps shapes small),
# the same draws every run (5: the README's command stays under 5 minutes on 2 cores);
# cpu-long: 7× the draws, fresh ones every run, after the default run in CI (.ci/run:
# -m hypothesis --hypothesis-profile=cpu-long). The seed of a run that is not derandomized
# is printed (pytest_report_header, pytest_terminal_summary): --hypothesis-seed=N replays it.
settings.register_profile("cpu", max_examples=5, deadline=None, derandomize=True, suppress_health_check=_SLOW_OK)
settings.register_profile("cpu-long", max_examples=36, deadline=None, derandomize=False, print_blob=True,
                          suppress_health_check=_SLOW_OK)
# gpu: the wide shape pools of tests/devices.py; bounded so the triton tests finish in minutes.
settings.register_profile("gpu", max_examples=60, deadline=None, suppress_health_check=_SLOW_OK)
# gpu-quick: what perf/gpu_check.py runs inside its time budget.
settings.register_profile("gpu-quick", max_examples=15, deadline=None, derandomize=True, suppress_health_check=_SLOW_OK)
# mutation: this device's profile without shrinking (tests/mutation.py only needs to know
# that a test fails, and shrinking through the interpreter costs a minute per mutant), at
# the 8 draws its table was measured with on the CPU
settings.register_profile("mutation", settings.get_profile(DEFAULT_PROFILE),
                          phases=(Phase.explicit, Phase.reuse, Phase.generate),
                          max_examples=max(8, settings.get_profile(DEFAULT_PROFILE).max_examples))
settings.load_profile(os.environ.get("SNNORM_HYPOTHESIS_PROFILE", DEFAULT_PROFILE))

#: modules whose absence makes test files skip; in CI each must import. Oracles first, then
#: the kernel dependency, then the demo's extra (tests/test_demo.py).
CI_REQUIRED = {
    "spikingjelly.activation_based": "oracle (tests/run.sh: pip install --no-deps spikingjelly==2.0.0)",
    "snntorch": "oracle (tests/run.sh: pip install --no-deps snntorch==1.0.0)",
    "h5py": "spikingjelly's model zoo imports it (tests/run.sh: pip install h5py)",
    "triton": "kernel dependency (pip install -e '.[triton]')",
    "sklearn": "the demo's extra (pip install -e '.[demo]')",
    "matplotlib": "the demo's extra (pip install -e '.[demo]')",
    "tqdm": "the demo's extra (pip install -e '.[demo]')",
}


def in_ci() -> bool:
    """True when the environment says this is a CI run (``CI=true``, as .ci/run exports)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def ci_problems() -> list[str]:
    """What would make test files skip quietly here: missing modules of :data:`CI_REQUIRED`,
    the triton backend unavailable, or (no GPU) the Triton interpreter switched off."""
    import importlib

    problems = []
    for name, why in CI_REQUIRED.items():
        try:
            importlib.import_module(name)
        except Exception as err:  # ImportError, or a broken install failing at import
            problems.append(f"cannot import {name} ({why}): {type(err).__name__}: {err}")
    if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
        problems.append(f"no GPU and TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}: "
                        "the Triton kernel tests would skip (unset it or set TRITON_INTERPRET=1)")
    if not any(p.startswith("cannot import triton") for p in problems):
        from snnorm import backends

        reason = backends.available_backends().get("triton")
        if reason is not None:
            problems.append(f"the triton backend is unavailable: {reason}")
    return problems


#: the seed a run that draws fresh examples shares with its xdist workers (they inherit it)
SEED_ENV = "SNNORM_HYPOTHESIS_SEED"


def _profile_name(config) -> str:
    return (config.getoption("--hypothesis-profile", default=None)
            or os.environ.get("SNNORM_HYPOTHESIS_PROFILE", DEFAULT_PROFILE))


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """A profile that draws fresh examples (``derandomize=False``: cpu-long, gpu) runs under one
    seed, chosen here unless ``--hypothesis-seed`` gives it, and shown in the run's output;
    ``--hypothesis-seed=N`` with the same profile replays the run's draws. (Runs before
    hypothesis's own pytest_configure, which turns the option into the global seed.)"""
    if config.getoption("--hypothesis-seed", default=None) is not None:
        return
    try:
        derandomized = settings.get_profile(_profile_name(config)).derandomize
    except Exception:  # an unknown profile: hypothesis reports it
        return
    if derandomized:
        return
    seed = os.environ.get(SEED_ENV) or str(random.SystemRandom().randrange(2**32))
    os.environ[SEED_ENV] = seed  # xdist workers start later and inherit it
    config.option.hypothesis_seed = seed


def _seed_line(config) -> str | None:
    seed = config.getoption("--hypothesis-seed", default=None)
    if seed is None:
        return None
    profile = _profile_name(config)
    return (f"hypothesis seed {seed} (profile {profile}): replay with "
            f"--hypothesis-profile={profile} --hypothesis-seed={seed}")


def pytest_report_header(config):
    line = _seed_line(config)
    return [line] if line else None


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    line = _seed_line(config)
    if line:
        terminalreporter.write_line(line)


def pytest_sessionstart(session):
    """Under ``CI=true``, stop before collecting when a skip would hide a file (see the
    module docstring)."""
    if not in_ci():
        return
    problems = ci_problems()
    if problems:
        lines = "\n  ".join(problems)
        pytest.exit(f"CI=true and the test environment is incomplete; these tests would skip silently:\n  {lines}",
                    returncode=pytest.ExitCode.USAGE_ERROR)


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
