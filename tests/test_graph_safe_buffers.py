"""Buffers ops keep between calls, made outside CUDA graph pools; on CPU with stand-ins for CUDA.

CUDA graph trees route the calling thread's allocations into their pool during warm-up, so cached
buffers are made on a helper thread (kernels/library.py: outside_graph_pools). The SymmetricMemory
workspace of the fused collective ops also grows in powers of two, keeps replaced workspaces alive
for graphs captured earlier, and refuses to grow inside a capture. The GPU side:
tests/gpu/test_cuda_graphs.py and the CUDA graph tests in tests/gpu/test_async_tp_gpu.py.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch
from fusionpasses.kernels import _symm_mem_pipeline as pipeline
from fusionpasses.kernels.library import cached_buffer, outside_graph_pools


class FakeSymmMem:
    """torch.distributed._symmetric_memory's workspace API: replaced by a larger one when asked."""

    def __init__(self) -> None:
        self._group_name_to_workspace_tensor: dict[str, torch.Tensor] = {}
        self.calls: list[tuple[str, int, str]] = []
        self.fail_with: BaseException | None = None

    def get_symm_mem_workspace(self, group_name: str, min_size: int):
        self.calls.append((group_name, min_size, threading.current_thread().name))
        if self.fail_with is not None:
            raise self.fail_with
        current = self._group_name_to_workspace_tensor.get(group_name)
        if current is None or current.numel() < min_size:
            current = torch.empty(min_size, dtype=torch.uint8)
            self._group_name_to_workspace_tensor[group_name] = current
        return SimpleNamespace(buffer=current)

    def growths(self) -> list[tuple[int, str]]:
        # A growth is a call the main thread did not make.
        return [(size, thread) for _, size, thread in self.calls if thread != threading.current_thread().name]


@pytest.fixture
def fake(monkeypatch):
    fake = FakeSymmMem()
    state = SimpleNamespace(capturing=False, devices=[])
    monkeypatch.setattr(pipeline, "_sm", fake)
    monkeypatch.setattr(pipeline, "_workspace_bytes", {})
    monkeypatch.setattr(pipeline, "_replaced_workspaces", [])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "set_device", state.devices.append)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: SimpleNamespace(synchronize=lambda: None))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: state.capturing)
    fake.state = state
    return fake


def test_outside_graph_pools_runs_on_a_helper_thread_and_returns_or_raises(fake):
    made_on = []

    def make():
        made_on.append(threading.current_thread().name)
        return "buffer"

    assert outside_graph_pools(make, 5) == "buffer"
    assert made_on == ["fusionpasses-outside-graph-pools"] and fake.state.devices == [5]
    assert outside_graph_pools(make) == "buffer" and fake.state.devices == [5, 3]  # default: the caller's device

    def broken():
        raise ValueError("out of memory")

    with pytest.raises(ValueError, match="out of memory"):
        outside_graph_pools(broken)


def test_cached_buffer_is_made_once_outside_pools_and_per_call_inside_a_capture(fake):
    made_on = []

    def make():
        made_on.append(threading.current_thread().name)
        return torch.empty(4)

    cache: dict = {}
    cuda = torch.device("cuda", 0)
    fake.state.capturing = True
    during_capture = cached_buffer(cache, "k", make, cuda)
    assert cache == {} and made_on == [threading.current_thread().name]  # the graph owns it
    fake.state.capturing = False
    first = cached_buffer(cache, "k", make, cuda)
    assert cached_buffer(cache, "k", make, cuda) is first is cache["k"] and first is not during_capture
    assert made_on[1:] == ["fusionpasses-outside-graph-pools"]
    on_cpu = cached_buffer(cache, "cpu", make, torch.device("cpu"))  # no pools, no thread
    assert cache["cpu"] is on_cpu and made_on[2:] == [threading.current_thread().name]


def test_growth_runs_on_a_helper_thread_in_powers_of_two(fake):
    handle = pipeline.workspace("g", 3 << 20)
    assert fake.growths() == [(4 << 20, "fusionpasses-outside-graph-pools")]
    assert fake.state.devices == [3]  # the helper thread uses the caller's device
    assert handle.buffer.numel() == 4 << 20
    # The caller's own call only rendezvouses the workspace that is already there.
    assert fake.calls[-1] == ("g", 3 << 20, threading.current_thread().name)


def test_small_requests_get_the_minimum_and_no_regrowth(fake):
    pipeline.workspace("g", 10)
    pipeline.workspace("g", 1 << 20)
    pipeline.workspace("g", 1000)
    assert fake.growths() == [(pipeline.MIN_WORKSPACE_BYTES, "fusionpasses-outside-graph-pools")]
    assert pipeline._workspace_bytes == {"g": pipeline.MIN_WORKSPACE_BYTES}


def test_groups_have_their_own_workspace(fake):
    pipeline.workspace("a", 2 << 20)
    pipeline.workspace("b", 8 << 20)
    assert [size for size, _ in fake.growths()] == [2 << 20, 8 << 20]
    assert pipeline._workspace_bytes == {"a": 2 << 20, "b": 8 << 20}


def test_a_replaced_workspace_stays_alive(fake):
    first = pipeline.workspace("g", 2 << 20).buffer
    second = pipeline.workspace("g", 5 << 20).buffer
    assert second.numel() == 8 << 20 and second.data_ptr() != first.data_ptr()
    assert len(pipeline._replaced_workspaces) == 1 and pipeline._replaced_workspaces[0] is first


def test_no_growth_inside_a_capture(fake):
    pipeline.workspace("g", 2 << 20)
    fake.state.capturing = True
    assert pipeline.workspace("g", 2 << 20).buffer.numel() == 2 << 20  # big enough: fine
    with pytest.raises(RuntimeError, match="cannot grow during CUDA graph capture.*warm-up"):
        pipeline.workspace("g", 3 << 20)
    assert len(fake.growths()) == 1


def test_a_failed_growth_raises_on_the_caller(fake):
    fake.fail_with = RuntimeError("rendezvous timed out")
    with pytest.raises(RuntimeError, match="rendezvous timed out"):
        pipeline.workspace("g", 1 << 20)
    assert pipeline._workspace_bytes == {}


def test_a_workspace_someone_else_grew_is_not_counted_as_replaced(fake):
    fake.get_symm_mem_workspace("g", 16 << 20)  # e.g. torch's own fused ops grew it
    assert pipeline.workspace("g", 3 << 20).buffer.numel() == 16 << 20
    assert pipeline._replaced_workspaces == [] and pipeline._workspace_bytes == {"g": 4 << 20}


@pytest.mark.parametrize("world_size", [2, 3, 4, 8])
def test_all_gather_slots_stay_put_whatever_the_shard_size(world_size):
    """A sender's slot must not move between calls of different sizes (it could land on another
    sender's unread slot), and the slots of one call must fit the workspace side by side."""
    buffer_bytes = 1 << 20
    for element_size in (1, 2):
        stride = pipeline.slot_stride_elements(buffer_bytes, world_size, element_size)
        for shard_bytes in (16, 1000, 4096, buffer_bytes // world_size // 16 * 16):
            slot_bytes = -(-shard_bytes // 16) * 16
            assert world_size * slot_bytes <= buffer_bytes  # what pipelined_all_gather reserves
            numel = shard_bytes // element_size
            assert stride >= numel and (world_size - 1) * stride + numel <= buffer_bytes // element_size
            assert stride * element_size % 16 == 0  # every slot starts 16-byte aligned


def test_sm_count_is_asked_once_per_cuda_device_and_stands_in_under_the_interpreter(monkeypatch):
    # Launchers size their grids by it on every call; the CUDA query runs once per device.
    from fusionpasses.kernels import library

    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: asked.append(index) or SimpleNamespace(multi_processor_count=132))
    library._cuda_sm_count.cache_clear()
    try:
        assert library.sm_count(torch.device("cpu"), interpreted=3) == 3
        assert [library.sm_count(torch.device("cuda", 1), interpreted=3) for _ in range(3)] == [132] * 3
        assert asked == [1]
    finally:
        library._cuda_sm_count.cache_clear()
