"""The SymmetricMemory pipelines the fused collective ops run on CUDA.

Two schedules, one interface:

``"one_compute_stream"``: every GEMM chunk runs on the caller's stream, one after the other; only the
peer copies (device-to-device memcpys over NVLink, run by copy engines) run on a side stream::

    all_gather:      compute  [ gemm(own shard) ][ gemm(peer 1) ][ gemm(peer 2) ]..
                     copies   [ push 1 ]s[w][cp 1]s [ push 2 ]s[w][cp 2]s..
    reduce_scatter:  compute  [ gemm(for peer 1) ][b][ gemm(for peer 2) ][b].. [ gemm(own rows) ]
                     copies                           [ cp ][b']              [ cp ][b']

The all_gather's first GEMM starts at once, on the shard itself: each rank pushes its shard into
its peers' SymmetricMemory slots, and copies what peers pushed into its slots out to ``gathered``
(``cp``; when nothing else reads the gathered rows, the GEMM reads them in the slot instead). The
two sides hand over with flags in the signal pads (``s`` sets one, ``w`` waits for one;
:func:`_handshake_words`): CUDA stream memory operations, which the stream front end runs without
an SM, so they proceed while the GEMM fills the GPU. Each flag goes back to 0 within the handshake,
so a CUDA graph that replays the same writes stays in step. The previous schedule staged the shard
in the local buffer and crossed two barrier kernels before the first GEMM, 24 us at 8192^3.

``"sum_in_gemm"`` (reduce_scatter, two ranks; :func:`two_rank_reduce_scatter_onto`): one compute
stream, and this rank's GEMM adds the peer's partial in its epilogue, so no sum runs after the last
GEMM. Where the GEMM cannot (FlashInfer's ``bmm_fp8``, row-wise ``_scaled_mm``; ``gemm_kinds.
adds_onto_output``), with more ranks, below ``MIN_ROWS_ADDED_IN_THE_GEMM`` rows per piece, or for
"avg", the op runs ``"one_compute_stream"``.

``"two_streams"``: torch's private pipelines (``torch.distributed._symmetric_memory``), which run GEMM
chunks on two streams at once to fill the GPU's last wave.

Which one wins depends on the GEMM and the side (2x H200, scripts/bench_async_tp.py,
docs/benchmarks.md). The all_gather on one stream is ahead for every kind, FlashInfer's ``bmm_fp8``
included (1.16x vs 1.12x over unfused at 8192^3, 1.17x vs 1.08x at 16384x8192x8192), because its
first GEMM starts at once. On the reduce_scatter side ``torch._scaled_mm`` and bf16 ``mm`` chunks
already fill the GPU, and two of them side by side can run slower than one after the other (0.63x
vs 1.11x at 2048x8192x8192 in an earlier run; within a few percent in the latest), while
``bmm_fp8`` gains 0-5% from two streams. ``SCHEDULE_BY_GEMM`` records these choices; two streams need
a GEMM that is safe on concurrent streams (its own workspace per stream,
gemm_kinds.safe_on_concurrent_streams).

``b`` is a SymmetricMemory barrier across the ranks of the group. The reduce_scatter's barriers that
wait for peers run on the compute stream right after the GEMM whose output the peers read: a barrier
kernel queued on the copies stream behind a running GEMM could not start until that GEMM frees an
SM, and the copy would then wait for the next GEMM as well. Both pipelines need SymmetricMemory
enabled for the group (``fusionpasses.symm_mem.setup_symm_mem``). This file is the only place the
kernel backend touches torch's private distributed APIs (the workspace buffer and the two-stream
pipelines) and the CUDA driver (the stream memory operations).

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

import collections
import contextlib
import ctypes
import functools
from collections.abc import Callable, Iterator

import torch
from torch.distributed import _symmetric_memory as _sm

from . import gemm_kinds
from .library import FP8_DTYPES, outside_graph_pools

SCHEDULES = ("one_compute_stream", "two_streams", "sum_in_gemm")
SCHEDULE_BY_GEMM = {
    ("bmm_fp8", "ag"): "one_compute_stream", ("bmm_fp8", "rs"): "two_streams",
    ("scaled_mm", "ag"): "one_compute_stream", ("scaled_mm", "rs"): "sum_in_gemm",
    ("mm", "ag"): "one_compute_stream", ("mm", "rs"): "sum_in_gemm",
}
"""Schedule by (GEMM kind, "ag" | "rs"), from scripts/bench_async_tp.py on 2x H200."""
_forced_schedule: str | None = None
schedules_run: collections.Counter[tuple[str, str, str]] = collections.Counter()
"""CUDA calls of the fused ops by (GEMM kind, "ag" | "rs", the schedule that ran, after fallbacks).
Counted in Python: under CUDA graphs a replay does not count, its capture and warm-up do."""
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


def schedule_for(gemm: str, side: str) -> str:
    """The schedule for a GEMM kind of gemm_kinds.py on one side ("ag" or "rs"); two streams only
    where that GEMM is safe on them."""
    name = _forced_schedule or SCHEDULE_BY_GEMM[gemm_kinds.split_kind(gemm)[0], side]
    if name == "two_streams" and not gemm_kinds.safe_on_concurrent_streams(gemm):
        return "one_compute_stream"
    if name == "sum_in_gemm" and side != "rs":
        return "one_compute_stream"
    return name


def record_schedule(gemm: str, side: str, schedule: str) -> None:
    schedules_run[gemm_kinds.split_kind(gemm)[0], side, schedule] += 1


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


def _handshake_words(symm, world_size: int) -> tuple[Callable[[int], int], Callable[[int], int]]:
    """Words of each rank's signal pad for the all_gather handshake: the last 2 * world_size uint32s,
    away from the first words torch's barriers use (channel * world_size + rank).

    ready(sender), in the receiver's pad: 1 once ``sender``'s shard is in the receiver's slot for it.
    in_use(receiver), in the sender's pad: 1 from its push into ``receiver`` until the receiver is done
    with the slot (copied out, or multiplied in place).
    """
    base = symm.signal_pad_size // 4 - 2 * world_size
    return (lambda sender: base + sender), (lambda receiver: base + world_size + receiver)


@functools.cache
def _stream_memop(name: str):
    # CUDA driver stream memory operations: a copy engine's stream front end waits on and writes these
    # words itself, so the handshake needs no SM (a barrier kernel queued behind a running GEMM cannot
    # start until the GEMM frees an SM). torch exposes the write but not the wait.
    driver = ctypes.CDLL("libcuda.so.1")
    function = getattr(driver, f"{name}_v2", None) or getattr(driver, name)
    function.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _check_driver(result: int, what: str) -> None:
    if result != 0:
        raise RuntimeError(f"fusionpasses: {what} failed with CUDA driver error {result}")


def _wait_flag(stream: torch.cuda.Stream, pad: int, word: int, value: int) -> None:
    """Hold ``stream`` until the word equals ``value`` (CU_STREAM_WAIT_VALUE_EQ)."""
    result = _stream_memop("cuStreamWaitValue32")(stream.cuda_stream, pad + 4 * word, value, 0x1)
    _check_driver(result, "cuStreamWaitValue32")


def _write_flag(stream: torch.cuda.Stream, pad: int, word: int, value: int) -> None:
    """Write the word once the work queued before it on ``stream`` is done and visible (default fence).
    Flags that need no fence would skip it with CU_STREAM_WRITE_VALUE_NO_MEMORY_BARRIER, but the
    driver rejects that flag on H200 with CUDA 13 (CUDA_ERROR_INVALID_VALUE)."""
    result = _stream_memop("cuStreamWriteValue32")(stream.cuda_stream, pad + 4 * word, value, 0x0)
    _check_driver(result, "cuStreamWriteValue32")


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    # Peer copies move bytes; uint8 views keep the pipelines independent of fp8 dtype support.
    return t.view(torch.uint8) if t.dtype in FP8_DTYPES else t


def slot_stride_elements(buffer_bytes: int, world_size: int, element_size: int) -> int:
    """Elements from one sender's all_gather slot to the next in a receiver's workspace: fixed for the
    workspace, whatever the shard size. Placed by the shard size of the call, a slot could overlap, from
    the third rank on, the slot another sender filled in the previous call, which the receiver may not
    have read yet: ``in_use`` guards a (sender, receiver) pair, not bytes. (With two ranks each receiver
    has one sender.)"""
    return buffer_bytes // world_size // 16 * 16 // element_size


def pipelined_all_gather(
    shard: torch.Tensor,
    consume: Callable[[torch.Tensor, int], None],
    gathered: torch.Tensor | None,
    world_size: int,
    group_name: str,
    schedule: str,
) -> None:
    """Gather ``shard`` rows from every rank, calling ``consume(chunk, rank)`` per chunk, into
    ``gathered`` (None: the chunks are consumed where they arrive and not kept)."""
    dtype = shard.dtype
    shard = _as_bytes(shard.contiguous())
    nbytes = shard.numel() * shard.element_size()
    slot_bytes = -(-nbytes // 16) * 16
    # torch's two-stream pipeline stages the shard in one buffer; ours receives a slot per sender.
    symm = workspace(group_name, nbytes if schedule == "two_streams" else world_size * slot_bytes)

    def consume_bytes(chunk: torch.Tensor, rank: int) -> None:
        consume(chunk.view(dtype), rank)

    if schedule == "two_streams":
        rows = shard.new_empty((world_size * shard.shape[0], *shard.shape[1:])) if gathered is None else gathered
        _sm._pipelined_all_gather_and_consume(shard, consume_bytes, _as_bytes(rows), group_name)
        return
    ws, rank = symm.world_size, symm.rank
    compute, copies = torch.cuda.current_stream(), _copy_stream()
    pads = symm.signal_pad_ptrs
    ready, in_use = _handshake_words(symm, ws)

    slot_stride = slot_stride_elements(symm.buffer_size, ws, shard.element_size())

    def slot(owner: int, sender: int) -> torch.Tensor:
        return symm.get_buffer(owner, shard.shape, shard.dtype, sender * slot_stride)

    def take(stream: torch.cuda.Stream, sender: int) -> torch.Tensor:
        _wait_flag(stream, pads[rank], ready(sender), 1)
        _write_flag(stream, pads[rank], ready(sender), 0)
        return slot(rank, sender)

    def release(stream: torch.cuda.Stream, sender: int) -> None:
        _write_flag(stream, pads[sender], in_use(rank), 0)

    chunks = _as_bytes(gathered).chunk(ws) if gathered is not None else None
    arrived = []
    copies.wait_stream(compute)
    with torch.cuda.stream(copies):
        for step in range(1, ws):
            # Push to the peer that multiplies this rank's chunk first.
            receiver = (rank - step) % ws
            _wait_flag(copies, pads[rank], in_use(receiver), 0)
            _write_flag(copies, pads[rank], in_use(receiver), 1)
            slot(receiver, rank).copy_(shard)
            _write_flag(copies, pads[receiver], ready(rank), 1)
            if chunks is not None:
                # Copied out right away: the slot is free for the next call before the GEMM reads it.
                sender = (rank + step) % ws
                chunks[sender].copy_(take(copies, sender))
                release(copies, sender)
                event = torch.cuda.Event()
                event.record(copies)
                arrived.append(event)
        if chunks is not None:
            chunks[rank].copy_(shard)
    consume_bytes(shard, rank)
    for step in range(1, ws):
        sender = (rank + step) % ws
        if chunks is not None:
            compute.wait_event(arrived[step - 1])
            consume_bytes(chunks[sender], sender)
        else:
            consume_bytes(take(compute, sender), sender)
            release(compute, sender)
    # The pushes read `shard`: the caller may reuse it once this op is done.
    compute.wait_stream(copies)


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


PIECES_ADDED_IN_THE_GEMM = 2
"""Row pieces of the two-rank reduce_scatter below: a piece's transfer hides under the next piece's GEMM."""
MIN_ROWS_ADDED_IN_THE_GEMM = 2048
"""Fewest rows per piece for "sum_in_gemm": below (M < 8192 at ws 2) the four shorter GEMMs and the second
barrier cost more than the sum they save (2x H200: 0.94x vs 1.20x over unfused at 1024 x 4096 x 4096,
about tied at M = 4096, ahead on 11 of 12 shapes from M = 8192: 1.28x vs 1.19x at 16384 x 8192 x 8192)."""


def sums_in_gemm(world_size: int, rows: int) -> bool:
    """Whether a reduce_scatter of ``rows`` rows per rank runs "sum_in_gemm" (given a GEMM that can)."""
    return (
        world_size == 2
        and rows % PIECES_ADDED_IN_THE_GEMM == 0
        and rows // PIECES_ADDED_IN_THE_GEMM >= MIN_ROWS_ADDED_IN_THE_GEMM
    )


def two_rank_reduce_scatter_onto(
    produce: Callable[..., None],
    out: torch.Tensor,
    group_name: str,
) -> None:
    """World size 2, one compute stream: ``out`` (this rank's rows) = the peer's partial + this rank's,
    with the addition done by this rank's GEMM (``produce(rank, rows, out_rows, accumulate=True)``:
    out_rows += its product) instead of a pass over both partials after the last GEMM::

        compute  [ gemm(peer piece 0) ][b][ gemm(peer piece 1) ][b][ gemm(own 0) += ][ gemm(own 1) += ]
        copies                             [ pull peer's piece 0 ]  [ pull piece 1 ][b']

    ``produce(rank, rows, dst)`` writes rows ``rows`` (of this rank's share of the peer's output, in
    pieces) of the partial destined for ``rank``. The peer's partial of this rank's piece p is pulled
    straight into ``out``'s piece p, which this rank's GEMM of piece p then adds onto: its pull runs
    under the GEMM of the next piece, so only the last piece's pull, under the first own GEMM, must
    keep up. cuBLAS's epilogues (FP8 cuBLASLt and bf16 ``addmm_``) round the product to the output
    type before adding, so the result is the unfused sum of two rounded partials bit for bit (measured
    on H200, cuBLAS 13; the GPU tests hold the FP8 GEMM to it and everything to FP8/bf16 tolerance).
    """
    symm = workspace(group_name, out.numel() * out.element_size())
    rank = symm.rank
    peer = 1 - rank
    compute, copies = torch.cuda.current_stream(), _copy_stream()
    rows = out.shape[0] // PIECES_ADDED_IN_THE_GEMM
    pieces = [slice(p * rows, (p + 1) * rows) for p in range(PIECES_ADDED_IN_THE_GEMM)]
    pulled = []
    for index, piece in enumerate(pieces):
        slot = symm.get_buffer(rank, (rows, out.shape[1]), out.dtype, index * rows * out.shape[1])
        produce(peer, piece, slot)
        # Both ranks have written their piece `index` for each other.
        symm.barrier(channel=0)
        copies.wait_stream(compute)
        with torch.cuda.stream(copies):
            out[piece].copy_(symm.get_buffer(peer, (rows, out.shape[1]), out.dtype, index * rows * out.shape[1]))
            pulled.append(torch.cuda.Event())
            pulled[-1].record(copies)
    with torch.cuda.stream(copies):
        # Both ranks have pulled every piece: the slots may be refilled by the next call.
        symm.barrier(channel=1)
    for piece, event in zip(pieces, pulled, strict=True):
        compute.wait_event(event)
        produce(rank, piece, out[piece], accumulate=True)
    compute.wait_stream(copies)

