"""Test harness: fake process groups, gloo/torchrun helpers, GPU markers, Triton interpreter on CPU."""

from __future__ import annotations

import contextlib
import os
import random

import pytest
import torch

# On a machine without CUDA the Triton kernels run in Triton's CPU interpreter, so the CPU suite
# checks them bit for bit against their references. Must be set before the kernels are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.distributed as dist  # noqa: E402

import fusionpasses.kernels  # noqa: E402,F401  (registers the ops)


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    for item in items:
        if item.get_closest_marker("gpu") and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        marker = item.get_closest_marker("multi_gpu")
        if marker is not None:
            n = marker.args[0] if marker.args else 2
            # exact=False: written for any world size from n up (torchrun --nproc-per-node 4 runs it too).
            exact = marker.kwargs.get("exact", True)
            if not has_cuda:
                item.add_marker(pytest.mark.skip(reason=f"needs {n} CUDA GPUs"))
            elif not under_torchrun():
                item.add_marker(pytest.mark.skip(
                    reason=f"multi-GPU test: run under `torchrun --nproc-per-node {n} -m pytest ...`"))
            else:
                ws = int(os.environ["WORLD_SIZE"])
                if (ws != n) if exact else (ws < n):
                    wanted = f"WORLD_SIZE={n}" if exact else f"WORLD_SIZE>={n}"
                    item.add_marker(pytest.mark.skip(reason=f"needs {wanted}, got {ws}"))


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)


@contextlib.contextmanager
def fake_process_group(world_size: int, rank: int = 0):
    """A single-process 'fake' process group: collectives trace and run without moving data."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    assert not dist.is_initialized(), "a process group is already initialized"
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.fixture(params=[2, 4], ids=["ws2", "ws4"])
def fake_pg(request):
    """The WORLD group of a fake process group of world size 2 and 4 (the test runs once for each)."""
    with fake_process_group(request.param) as group:
        yield group


@pytest.fixture
def fake_pg2():
    with fake_process_group(2) as group:
        yield group


@pytest.fixture(scope="session")
def nccl_group():
    """The WORLD NCCL group under torchrun, one per test session; each rank on its LOCAL_RANK GPU."""
    if not under_torchrun():
        pytest.skip("needs torchrun")
    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    yield dist.group.WORLD
    dist.barrier()
