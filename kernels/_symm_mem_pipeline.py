"""The SymmetricMemory pipelines the fused collective ops run on CUDA.

Two schedules, one interface:

``"one_compute_stream"``: every GEMM chunk runs on the caller's stream, one after the other; only the
peer copies (device-to-device memcpys over NVLink) run on a side stream::

    all_gather:      compute  [mv][b][ gemm(own shard) ][ gemm(peer 1) ][ gemm(peer 2) ]..[b]
                     copies           [ cp peer 1 ][ cp peer 2 ]..
    reduce_scatter:  compute  [ gemm(for peer 1) ][b][ gemm(for peer 2) ][b].. [ gemm(own rows) ]
                     copies                           [ cp ][b']              [ cp ][b']

``"two_streams"``: torch's private pipelines (``torch.distributed._symmetric_memory``), which run GEMM
chunks on two streams at once to fill the GPU's last wave.

Which one wins depends on the GEMM (2x H200, scripts/bench_async_tp.py, docs/benchmarks.md):
``torch._scaled_mm`` and bf16 ``mm`` chunks already fill the GPU, and two of them side by side run
slower than one after the other (one stream: up to 1.24x over unfused, two streams up to 1.22x, and
0.63x vs 1.11x at 2048x8192x8192). For FlashInfer's cuBLASLt ``bmm_fp8`` two streams are 3-7% faster
from 8192 rows (1.06-1.13x vs 1.00-1.10x over unfused). ``SCHEDULE_BY_GEMM`` records that choice; two
streams need a GEMM that is safe on concurrent streams (its own workspace per stream,
gemm_kinds.safe_on_concurrent_streams).

``b`` is a SymmetricMemory barrier across the ranks of the group. Barriers that wait for peers run on
the compute stream right after the GEMM whose output the peers read: a barrier queued on the copies
stream behind a running GEMM could not start until that GEMM frees an SM, and the copy would then
wait for the next GEMM as well. Both pipelines need SymmetricMemory enabled for the group
(``fusionpasses.symm_mem.setup_symm_mem``). This file is the only place the kernel backend touches
torch's private distributed APIs (the workspace buffer and the two-stream pipelines).

The workspace and CUDA graphs (:func:`workspace`): torch keeps one SymmetricMemory workspace per
group and replaces it when a call needs more. Growing it inside Inductor's CUDA graph trees broke
them: their warm-up routes every allocation of the calling thread into the graph pool, and the
rendezvous of a new workspace allocates its peer-pointer tables there, so the warm-up check found
two untracked tensors in the pool. Growth therefore runs on a helper thread (outside any pool), in
powers of two, and a replaced workspace is kept alive because graphs captured earlier still hold its
addresses. A capture itself cannot grow it (every rank would have to rendezvous inside the capture):
it raises, and a warm-up run of the same shapes before capturing avoids that, as CUDA graph trees do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch.distributed import _symmetric_memory as _sm

from . import gemm_kinds
from .library import FP8_DTYPES, outside_graph_pools

SCHEDULES = ("one_compute_stream", "two_streams")
SCHEDULE_BY_GEMM = {"bmm_fp8": "two_streams", "scaled_mm": "one_compute_stream", "mm": "one_compute_stream"}
_forced_schedule: str | None = None
_copy_streams: dict[int, torch.cuda.Stream] = {}
_workspace_bytes: dict[str, int] = {}
"""Bytes of the workspace this module last reserved per group (torch's may only be larger)."""
_replaced_workspaces: list[torch.Tensor] = []
"""Workspaces torch replaced: CUDA graphs captured before a growth still read and write them."""
MIN_WORKSPACE_BYTES = 1 << 20


@contextlib.contextmanager
def force_schedule(name: str) -> Iterator[None]:
    """Run every fused op with schedule ``name`` inside the block (benchmarks compare the two)."""
    global _forced_schedule
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")
    previous, _forced_schedule = _forced_schedule, name
    try:
        yield
    finally:
        _forced_schedule = previous


def schedule_for(gemm: str) -> str:
    """The schedule for a GEMM kind of gemm_kinds.py; two streams only where that GEMM is safe on them."""
    name = _forced_schedule or SCHEDULE_BY_GEMM[gemm_kinds.split_kind(gemm)[0]]
    if name == "two_streams" and not gemm_kinds.safe_on_concurrent_streams(gemm):
        return "one_compute_stream"
    return name


def _copy_stream() -> torch.cuda.Stream:
    device = torch.cuda.current_device()
    if device not in _copy_streams:
        _copy_streams[device] = torch.cuda.Stream(device=device)
    return _copy_streams[device]


def workspace(group_name: str, nbytes: int):
    """The group's SymmetricMemory workspace with at least ``nbytes``; collective when it grows
    (every rank of the group calls it with the same size, as the pipelines do)."""
    if _workspace_bytes.get(group_name, 0) < nbytes:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"fusionpasses: the SymmetricMemory workspace of group {group_name!r} has "
                f"{_workspace_bytes.get(group_name, 0)} bytes and this call needs {nbytes}; it cannot grow "
                "during CUDA graph capture. Run the captured function once with the same shapes before "
                "capturing it (a warm-up, as torch.compile's CUDA graphs do)."
            )
        reserve(group_name, nbytes)
    # The rendezvous of an existing workspace is cached by torch: no allocation here.
    return _sm.get_symm_mem_workspace(group_name, min_size=nbytes)


def reserve(group_name: str, nbytes: int) -> None:
    """Grow the group's workspace to a power of two >= ``nbytes``, outside CUDA graph pools.
    Collective, like ``workspace``."""
    size = max(MIN_WORKSPACE_BYTES, 1 << max(nbytes - 1, 0).bit_length())
    if _workspace_bytes.get(group_name, 0) >= size:
        return
    workspaces = getattr(_sm, "_group_name_to_workspace_tensor", {})
    current = workspaces.get(group_name)
    outside_graph_pools(lambda: _sm.get_symm_mem_workspace(group_name, min_size=size))
    if current is not None and workspaces.get(group_name) is not current:
        _replaced_workspaces.append(current)
    _workspace_bytes[group_name] = size


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    # Peer copies move bytes; uint8 views keep the pipelines independent of fp8 dtype support.
    return t.view(torch.uint8) if t.dtype in FP8_DTYPES else t


def pipelined_all_gather(
    shard: torch.Tensor,
    consume: Callable[[torch.Tensor, int], None],
    gathered: torch.Tensor,
    group_name: str,
    schedule: str,
) -> None:
    """Gather ``shard`` rows from every rank into ``gathered``, calling ``consume(chunk, rank)`` per chunk."""
    dtype = shard.dtype
    shard, gathered = _as_bytes(shard.contiguous()), _as_bytes(gathered)
    symm = workspace(group_name, shard.numel() * shard.element_size())

    def consume_bytes(chunk: torch.Tensor, rank: int) -> None:
        consume(chunk.view(dtype), rank)

    if schedule == "two_streams":
        _sm._pipelined_all_gather_and_consume(shard, consume_bytes, gathered, group_name)
        return
    ws, rank = symm.world_size, symm.rank
    chunks = gathered.chunk(ws)
    compute, copies = torch.cuda.current_stream(), _copy_stream()

    symm.get_buffer(rank, shard.shape, shard.dtype).copy_(shard)
    # Every rank's shard is now in its buffer.
    symm.barrier(channel=0)
    copies.wait_stream(compute)
    arrived = []
    with torch.cuda.stream(copies):
        for step in range(1, ws):
            peer = (rank + step) % ws
            chunks[peer].copy_(symm.get_buffer(peer, shard.shape, shard.dtype))
            event = torch.cuda.Event()
            event.record(copies)
            arrived.append((peer, event))
        chunks[rank].copy_(shard)
    consume_bytes(shard, rank)
    for peer, event in arrived:
        compute.wait_event(event)
        consume_bytes(chunks[peer], peer)
    compute.wait_stream(copies)
    # No rank refills its buffer (next call) before every peer has read it.
    symm.barrier(channel=0)


def pipelined_reduce_scatter_rows(
    produce: Callable[[int, torch.Tensor], None],
    stacked: torch.Tensor,
    world_size: int,
    group_name: str,
    schedule: str,
) -> None:
    """``produce(rank, out)`` writes the partial rows destined for ``rank``; afterwards chunk r of
    ``stacked`` (split along dim 0) holds rank r's partial of this rank's rows."""
    out_chunks = stacked.chunk(world_size)
    chunk_bytes = out_chunks[0].numel() * out_chunks[0].element_size()
    symm = workspace(group_name, 2 * chunk_bytes)
    if schedule == "two_streams":
        _sm._pipelined_produce_and_all2all(produce, stacked, group_name)
        return
    ws, rank = symm.world_size, symm.rank
    compute, copies = torch.cuda.current_stream(), _copy_stream()

    def buffer(owner: int, index: int) -> torch.Tensor:
        # Two buffers: the next partial is computed into one while peers still read the other.
        return symm.get_buffer(owner, out_chunks[0].shape, out_chunks[0].dtype, index * out_chunks[0].numel())

    released: dict[int, torch.cuda.Event] = {}
    for step in range(1, ws):
        index = step % 2
        if index in released:
            compute.wait_event(released.pop(index))
        produce((rank + step) % ws, buffer(rank, index))
        # Every rank has written the partial for its peer of this step.
        symm.barrier(channel=0)
        copies.wait_stream(compute)
        with torch.cuda.stream(copies):
            source = (rank - step) % ws
            out_chunks[source].copy_(buffer(source, index))
            # Every rank has read its buffer `index` of this step: it may be refilled.
            symm.barrier(channel=1)
            released[index] = torch.cuda.Event()
            released[index].record(copies)
    produce(rank, out_chunks[rank])
    compute.wait_stream(copies)
