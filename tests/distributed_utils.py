"""run_gloo: run a test body in N CPU processes with a real gloo process group.

The body must be a module-level function ``body(rank, world_size, *args)`` (it is pickled into spawned
processes). An exception on any rank fails the calling test with that rank's traceback.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, body: Callable[..., Any], world_size: int, port: int, cache_dir: str, args: tuple) -> None:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    torch.set_num_threads(1)
    import fusionpasses.kernels  # noqa: F401

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        body(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_gloo(body: Callable[..., Any], *args: Any, world_size: int = 2) -> None:
    """Run ``body(rank, world_size, *args)`` on ``world_size`` gloo ranks; re-raise the first failure."""
    cache_dir = os.environ.get("FUSIONPASSES_TEST_INDUCTOR_CACHE") or tempfile.mkdtemp(prefix="fp_inductor_")
    mp.start_processes(
        _worker,
        args=(body, world_size, _free_port(), cache_dir, args),
        nprocs=world_size,
        join=True,
        start_method="spawn",
    )
