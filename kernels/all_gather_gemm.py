"""``fusionpasses::all_gather_gemm``: all_gather along rows, pipelined with the GEMM that consumes it.

    gathered = all_gather(shard, dim=0)            # (ws * m, K), rank-major rows
    out      = gemm(gathered, B, scales)           # (ws * m, N)

On CUDA the gather runs over SymmetricMemory (peer copies over NVLink) while each rank chunk that has
arrived is multiplied, so the GEMM of chunk r overlaps the copy of chunk r+1. The GEMM is the model's
own kind (see gemm_kinds.py), called with an out-variant on each chunk's rows of ``out``.
On CPU it is the reference: a functional-collective all_gather, then the same GEMM as the unfused graph.

Both outputs are returned, so other users of the all_gather result in the graph read ``gathered``
from here instead of a second collective. With ``return_gathered=False`` (nothing else reads it) the
peers' chunks are multiplied where they land, in the SymmetricMemory slots, and ``gathered`` has 0
rows: no copies into ``gathered`` compete with the GEMM for memory bandwidth.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from . import gemm_kinds
from .library import FP8_DTYPES, OpSample, check, check_same_device, op_name, opcheck_samples

OP = "all_gather_gemm"


def _validate(shard, B, A_scale, B_scale, gemm, out_dtype, world_size, group_name) -> None:
    check(world_size >= 1, OP, f"world_size must be >= 1, got {world_size}")
    check(shard.dim() == 2, OP, f"shard must be 2-D (m, K), got shape {tuple(shard.shape)}")
    gemm_kinds.validate(OP, gemm, shard, B, A_scale, B_scale, out_dtype, rows=shard.shape[0] * world_size)
    check_same_device(OP, shard=shard, B=B, A_scale=A_scale, B_scale=B_scale)


def _all_gather_rows(shard: torch.Tensor, world_size: int, group_name: str) -> torch.Tensor:
    # gloo and some NCCL builds cannot gather fp8 dtypes; the bytes are the same through uint8.
    erased = shard.view(torch.uint8) if shard.dtype in FP8_DTYPES else shard
    gathered = torch.ops._c10d_functional.all_gather_into_tensor(erased.contiguous(), world_size, group_name)
    gathered = torch.ops._c10d_functional.wait_tensor(gathered)
    return gathered.view(shard.dtype)


def reference_all_gather_gemm(
    shard, B, A_scale, B_scale, gemm, out_dtype, world_size, group_name, use_fast_accum=False, return_gathered=True
) -> tuple[torch.Tensor, torch.Tensor]:
    gathered = _all_gather_rows(shard, world_size, group_name)
    out = gemm_kinds.compute(gemm, gathered, B, A_scale, B_scale, out_dtype, use_fast_accum)
    return (gathered if return_gathered else gathered[:0].clone()), out


@torch.library.custom_op(op_name(OP), mutates_args=(), device_types="cuda")
def all_gather_gemm(
    shard: torch.Tensor,
    B: torch.Tensor,
    A_scale: torch.Tensor | None,
    B_scale: torch.Tensor | None,
    gemm: str,
    out_dtype: torch.dtype | None,
    world_size: int,
    group_name: str,
    use_fast_accum: bool = False,
    return_gathered: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    _validate(shard, B, A_scale, B_scale, gemm, out_dtype, world_size, group_name)
    from ._symm_mem_pipeline import pipelined_all_gather, record_schedule, schedule_for

    m = shard.shape[0]
    gathered = shard.new_empty((m * world_size if return_gathered else 0, shard.shape[1]))
    out = torch.empty(
        (m * world_size, B.shape[1]), dtype=gemm_kinds.result_dtype(gemm, shard, out_dtype), device=shard.device
    )

    def consume(chunk: torch.Tensor, rank: int) -> None:
        rows = slice(rank * m, (rank + 1) * m)
        scale = gemm_kinds.rows_of_scale(A_scale, rows.start, rows.stop)
        gemm_kinds.compute_into(gemm, chunk, B, scale, B_scale, out[rows], use_fast_accum)

    schedule = schedule_for(gemm, "ag")
    record_schedule(gemm, "ag", schedule)
    pipelined_all_gather(shard, consume, gathered if return_gathered else None, world_size, group_name, schedule)
    return gathered, out


@all_gather_gemm.register_kernel("cpu")
def _all_gather_gemm_cpu(
    shard, B, A_scale, B_scale, gemm, out_dtype, world_size, group_name, use_fast_accum=False, return_gathered=True
):
    _validate(shard, B, A_scale, B_scale, gemm, out_dtype, world_size, group_name)
    return reference_all_gather_gemm(
        shard, B, A_scale, B_scale, gemm, out_dtype, world_size, group_name, use_fast_accum, return_gathered
    )


@all_gather_gemm.register_fake
def _all_gather_gemm_fake(
    shard, B, A_scale, B_scale, gemm, out_dtype, world_size, group_name, use_fast_accum=False, return_gathered=True
):
    rows = shard.shape[0] * world_size
    gathered = shard.new_empty((rows if return_gathered else 0, shard.shape[1]))
    out = shard.new_empty((rows, B.shape[1]), dtype=gemm_kinds.result_dtype(gemm, shard, out_dtype))
    return gathered, out


@opcheck_samples(all_gather_gemm)
def _samples() -> Iterator[OpSample]:
    # tests/test_opcheck.py runs every sample inside a 1-rank gloo process group.
    import torch.distributed as dist

    group = dist.group.WORLD.group_name
    ws = dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 32, generator=g, dtype=torch.bfloat16)
    b = torch.randn(32, 16, generator=g, dtype=torch.bfloat16)
    yield OpSample((a, b, None, None, "mm", None, ws, group), {}, name="mm")
    a8 = torch.randn(8, 32, generator=g).to(torch.float8_e4m3fn)
    w8 = torch.randn(16, 32, generator=g).to(torch.float8_e4m3fn).t()
    one = torch.tensor([0.5])
    yield OpSample((a8, w8, one, one, "scaled_mm", torch.bfloat16, ws, group), {}, name="scaled_mm")
    yield OpSample((a8, w8, one, one, "bmm_fp8", torch.bfloat16, ws, group), {}, name="bmm_fp8")
    yield OpSample((a, b, None, None, "mm", None, ws, group, False, False), {}, name="mm-without-gathered")
