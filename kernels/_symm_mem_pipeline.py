"""The SymmetricMemory pipelines the fused collective ops run on CUDA (torch's private helpers).

torch 2.11 and 2.13 ship the two pipelines we need as private functions with identical signatures:
an all_gather that hands each arriving rank chunk to a consumer, and a produce-then-exchange loop
that lets each rank compute the chunk destined for a peer while the previous one is copied. They need
SymmetricMemory enabled for the group (fusionpasses.symm_mem.setup_symm_mem). This file is the only
place the kernel backend touches torch private distributed APIs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.distributed import _symmetric_memory as _sm

from .library import FP8_DTYPES


def pipelined_all_gather(
    shard: torch.Tensor,
    consume: Callable[[torch.Tensor, int], None],
    gathered: torch.Tensor,
    group_name: str,
) -> None:
    """Gather ``shard`` rows from every rank into ``gathered``, calling ``consume(chunk, rank)`` per chunk."""
    if shard.dtype in FP8_DTYPES:
        # Peer copies move bytes; uint8 views keep the pipeline independent of fp8 dtype support.
        dtype = shard.dtype
        _sm._pipelined_all_gather_and_consume(
            shard.contiguous().view(torch.uint8),
            lambda chunk, rank: consume(chunk.view(dtype), rank),
            gathered.view(torch.uint8),
            group_name,
        )
    else:
        _sm._pipelined_all_gather_and_consume(shard.contiguous(), consume, gathered, group_name)


def pipelined_reduce_scatter_rows(
    produce: Callable[[int, torch.Tensor], None], stacked: torch.Tensor, group_name: str
) -> None:
    """``produce(rank, out)`` writes the partial rows destined for ``rank``; afterwards chunk r of
    ``stacked`` (split along dim 0) holds rank r's partial of this rank's rows."""
    _sm._pipelined_produce_and_all2all(produce, stacked, group_name)
