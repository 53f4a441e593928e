"""This rank's block of rows of a tensor every rank holds: ``rank_rows``.

    shard = torch.ops.fusionpasses.rank_rows(x, world_size, group_name)
          = x[rank * M / ws : (rank + 1) * M / ws]      (a copy), rank = this process's rank in the group

The sequence-parallel pass uses it when a replicated (M, ...) tensor, such as a residual coming into
the compiled graph, meets tensors that were reduce-scattered over tokens: each rank keeps the rows
its reduce_scatter produced.

The rank is read when the op runs, from the process group named ``group_name``, not baked into the
graph: the pass runs after Inductor computed its FX-graph-cache key, and that key is the same on
every rank, so a graph holding ``rank`` as a constant could be loaded by another rank.

    x           (M, ...) any dtype and strides, M a multiple of world_size
    world_size  the group's size (checked against the group when the op runs)
    group_name  a c10d process group name, as the functional collectives in the graph carry it
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

from .library import OpSample, check, op_name, opcheck_samples

OP = "rank_rows"


def _group_rank(world_size: int, group_name: str) -> int:
    group = dist.distributed_c10d._resolve_process_group(group_name)
    check(
        group.size() == world_size,
        OP,
        f"world_size ({world_size}) differs from the size of group {group_name!r} ({group.size()})",
    )
    return group.rank()


def reference_rank_rows(x: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:
    """Rows ``rank * M / ws`` up to ``(rank + 1) * M / ws`` of ``x``, as a dense copy."""
    rows = x.shape[0] // world_size
    return x.narrow(0, rank * rows, rows).clone(memory_format=torch.contiguous_format)


@torch.library.custom_op(op_name(OP), mutates_args=())
def rank_rows(x: torch.Tensor, world_size: int, group_name: str) -> torch.Tensor:
    check(x.dim() >= 1, OP, f"x must have a leading (row) dim, got shape {tuple(x.shape)}")
    check(world_size >= 1, OP, f"world_size must be >= 1, got {world_size}")
    check(
        x.shape[0] % world_size == 0,
        OP,
        f"x.shape[0] ({x.shape[0]}) must be divisible by world_size ({world_size})",
    )
    return reference_rank_rows(x, world_size, _group_rank(world_size, group_name))


@rank_rows.register_fake
def _rank_rows_fake(x, world_size, group_name):
    return x.new_empty((x.shape[0] // world_size, *x.shape[1:]))


@opcheck_samples(rank_rows)
def _rank_rows_samples() -> Iterator[OpSample]:
    # test_opcheck runs samples in a 1-rank gloo group; multi-rank values are checked under gloo
    # in tests/test_sequence_parallel_gloo.py.
    group_name = dist.group.WORLD.group_name
    g = torch.Generator().manual_seed(0)
    yield OpSample((torch.randn(6, 5, generator=g), 1, group_name), {}, name="fp32")
    yield OpSample((torch.randn(4, 3, 8, generator=g).to(torch.bfloat16), 1, group_name), {}, name="3d-bf16")
    yield OpSample((torch.randn(8, 4, generator=g).t(), 1, group_name), {}, name="transposed")
