"""Where the numbers come from and where they go: the environment every row carries, the
long-format rows (:data:`COLUMNS`) and their CSV files, the provider names.

``shape`` is ``TxNxCxHxW`` for kernels (``[T, N, C, H, W]``); times are in milliseconds;
``note`` carries error messages and skip reasons.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Sequence

import torch

COLUMNS = (
    "kernel", "provider", "mode", "shape", "dtype", "metric", "value",
    "device", "torch", "triton", "git_sha", "note",
)

# Provider names (one spelling everywhere: the report keys on them).
SNNORM_TORCH = "snnorm-torch"
SNNORM_COMPILE = "snnorm-torch-compile"
SNNORM_TRITON = "snnorm-triton"
SPIKINGJELLY = "spikingjelly"
TORCH_COPY = "torch-copy"

PERF_DIR = Path(__file__).resolve().parents[1]
RESULTS_DIR = PERF_DIR / "results"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


# -- environment ------------------------------------------------------------------------


def slug(text: str) -> str:
    """``text`` as a folder or file name: lower case, runs of other characters as one ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_sha() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=PERF_DIR, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "snnorm"], cwd=PERF_DIR.parent, capture_output=True, text=True
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@dataclasses.dataclass(frozen=True)
class Env:
    """Where the numbers come from; every row carries it."""

    device: torch.device
    device_name: str  # human-readable, goes in every row
    slug: str  # results folder name: perf/results/<slug>/
    torch_version: str
    triton_version: str
    git_sha: str

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def environment(device: str | None = None) -> Env:
    """The device to benchmark on: CUDA when available (or ``device``), else the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        folder = slug(name)
    else:
        name = f"{_cpu_model()} ({os.cpu_count()} cores)"
        folder = "cpu-" + slug(_cpu_model()) + f"-{os.cpu_count()}c"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return Env(dev, name, folder, torch.__version__, triton_version, _git_sha())


# -- rows -------------------------------------------------------------------------------


class Recorder:
    """Collects long-format rows (dicts keyed by :data:`COLUMNS`)."""

    def __init__(self, env: Env, verbose: bool = True):
        self.env = env
        self.rows: list[dict] = []
        self.verbose = verbose

    def add(self, kernel, provider, mode, shape, dtype, metric, value, note: str = "") -> None:
        row = dict(
            kernel=kernel, provider=provider, mode=mode, shape=shape, dtype=dtype, metric=metric,
            value=float(value) if value is not None else math.nan,
            device=self.env.device_name, torch=self.env.torch_version, triton=self.env.triton_version,
            git_sha=self.env.git_sha, note=note,
        )
        self.rows.append(row)

    def log(self, msg: str) -> None:
        if self.verbose:
            print(msg, flush=True)

    def write_csv(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            for row in self.rows:
                out = dict(row)
                v = out["value"]
                out["value"] = "" if isinstance(v, float) and math.isnan(v) else f"{v:.6g}"
                w.writerow(out)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["value"] = float(row["value"]) if row["value"] not in ("", None) else math.nan
    return rows


def results_path(env: Env, name: str, out_dir: Path | None = None) -> Path:
    base = Path(out_dir) if out_dir is not None else RESULTS_DIR / env.slug
    return base / f"{name}.csv"


def shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def short_error(err: BaseException, limit: int = 300) -> str:
    """``err`` on one line, cut to ``limit`` characters (for a row's note)."""
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."
