"""Multi-process runs on the CPU (gloo): a free port and a launcher that returns every
rank's result."""

from __future__ import annotations

import os
import time
from typing import Callable

import torch


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a gloo ``init_method``)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker: Callable, *args, world: int = 2, timeout_s: float = 300.0) -> list:
    """Spawn ``world`` processes running ``worker(rank, world, port, out_dir, *args)``; each
    saves its result with ``torch.save`` to ``<out_dir>/rank<r>.pt``. Returns the results
    in rank order. TimeoutError after ``timeout_s`` (the workers are killed)."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(worker, args=(world, free_port(), out_dir, *args), nprocs=world, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world}-process run did not finish within {timeout_s} s")
        finally:
            for p in ctx.processes:  # only the workers started here
                if p.is_alive():
                    p.kill()
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]
