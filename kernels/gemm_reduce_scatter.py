"""``fusionpasses::gemm_reduce_scatter``: a GEMM whose rows are reduce-scattered, pipelined.

    partial = gemm(A, B, scales)                        # (M, N) partial sums on every rank
    out     = reduce_scatter(partial, reduce_op, dim=0) # (M / ws, N), rank r keeps rows r*M/ws ...

On CUDA each rank computes the partial product destined for one peer at a time into a SymmetricMemory
buffer that the peer pulls while the next chunk is computed; the ws partials of this rank's rows are
then reduced locally. With two ranks, a sum, and a GEMM that takes a C operand (bf16 ``mm``,
tensor-wise ``_scaled_mm``), this rank's own GEMM adds the pulled partial in its epilogue instead
(``_symm_mem_pipeline.two_rank_reduce_scatter_onto``). ``reduce_op`` is kept from the matched
reduce_scatter ("sum" stays a sum).
On CPU it is the reference: the same GEMM as the unfused graph, then a functional reduce_scatter.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from . import gemm_kinds
from .library import OpSample, check, check_divisible, check_same_device, op_name, opcheck_samples

OP = "gemm_reduce_scatter"
REDUCE_OPS = ("sum", "avg")


def _validate(A, B, A_scale, B_scale, gemm, out_dtype, reduce_op, world_size, group_name) -> None:
    check(world_size >= 1, OP, f"world_size must be >= 1, got {world_size}")
    check(reduce_op in REDUCE_OPS, OP, f"reduce_op must be one of {REDUCE_OPS}, got {reduce_op!r}")
    check(A.dim() == 2, OP, f"A must be 2-D (M, K), got shape {tuple(A.shape)}")
    check_divisible(A.shape[0], world_size, OP, "M (rows of A)")
    gemm_kinds.validate(OP, gemm, A, B, A_scale, B_scale, out_dtype, rows=A.shape[0])
    check_same_device(OP, A=A, B=B, A_scale=A_scale, B_scale=B_scale)


def reference_gemm_reduce_scatter(
    A, B, A_scale, B_scale, gemm, out_dtype, reduce_op, world_size, group_name, use_fast_accum=False
) -> torch.Tensor:
    partial = gemm_kinds.compute(gemm, A, B, A_scale, B_scale, out_dtype, use_fast_accum)
    out = torch.ops._c10d_functional.reduce_scatter_tensor(partial.contiguous(), reduce_op, world_size, group_name)
    return torch.ops._c10d_functional.wait_tensor(out)


def schedule_that_runs(gemm, A, B, A_scale, B_scale, out_dtype, reduce_op, world_size) -> str:
    """The schedule a CUDA call with these arguments runs: ``schedule_for(gemm, "rs")`` unless it is
    "sum_in_gemm" and the call cannot add in its GEMM (more ranks, short pieces, "avg", a GEMM without a C
    operand), which falls back to "one_compute_stream"."""
    from ._symm_mem_pipeline import schedule_for, sums_in_gemm

    schedule = schedule_for(gemm, "rs")
    if schedule != "sum_in_gemm":
        return schedule
    adds = (
        reduce_op == "sum"
        and sums_in_gemm(world_size, A.shape[0] // world_size)
        and gemm_kinds.adds_onto_output(gemm, A, B, A_scale, B_scale, gemm_kinds.result_dtype(gemm, A, out_dtype))
    )
    return schedule if adds else "one_compute_stream"


@torch.library.custom_op(op_name(OP), mutates_args=(), device_types="cuda")
def gemm_reduce_scatter(
    A: torch.Tensor,
    B: torch.Tensor,
    A_scale: torch.Tensor | None,
    B_scale: torch.Tensor | None,
    gemm: str,
    out_dtype: torch.dtype | None,
    reduce_op: str,
    world_size: int,
    group_name: str,
    use_fast_accum: bool = False,
) -> torch.Tensor:
    _validate(A, B, A_scale, B_scale, gemm, out_dtype, reduce_op, world_size, group_name)
    from ._symm_mem_pipeline import pipelined_reduce_scatter_rows, record_schedule, two_rank_reduce_scatter_onto

    m = A.shape[0] // world_size
    A = A.contiguous()
    dtype = gemm_kinds.result_dtype(gemm, A, out_dtype)
    schedule = schedule_that_runs(gemm, A, B, A_scale, B_scale, out_dtype, reduce_op, world_size)
    record_schedule(gemm, "rs", schedule)
    if schedule == "sum_in_gemm":
        out = torch.empty((m, B.shape[1]), dtype=dtype, device=A.device)

        def produce_piece(rank: int, rows: slice, dst: torch.Tensor, accumulate: bool = False) -> None:
            A_rows = A[rank * m + rows.start : rank * m + rows.stop]
            gemm_kinds.compute_into(gemm, A_rows, B, A_scale, B_scale, dst, use_fast_accum, accumulate)

        two_rank_reduce_scatter_onto(produce_piece, out, group_name)
        return out
    stacked = torch.empty((world_size * m, B.shape[1]), dtype=dtype, device=A.device)

    def produce(rank: int, out: torch.Tensor) -> None:
        rows = slice(rank * m, (rank + 1) * m)
        scale = gemm_kinds.rows_of_scale(A_scale, rows.start, rows.stop)
        gemm_kinds.compute_into(gemm, A[rows], B, scale, B_scale, out, use_fast_accum)

    pipelined_reduce_scatter_rows(produce, stacked, world_size, group_name, schedule)
    partials = stacked.view(world_size, m, B.shape[1])
    if reduce_op == "sum" and world_size == 2:
        # Same bits as sum(dim=0) (one fp32 add, one rounding) from an elementwise kernel: at 8192^3 on
        # H200 the outer-dim reduce kernel of sum(dim=0) took 134 us of the op's 910 (192 MiB moved).
        return torch.add(partials[0], partials[1])
    return partials.sum(dim=0) if reduce_op == "sum" else partials.mean(dim=0)


@gemm_reduce_scatter.register_kernel("cpu")
def _gemm_reduce_scatter_cpu(A, B, A_scale, B_scale, gemm, out_dtype, reduce_op, world_size, group_name, use_fast_accum=False):
    _validate(A, B, A_scale, B_scale, gemm, out_dtype, reduce_op, world_size, group_name)
    return reference_gemm_reduce_scatter(
        A, B, A_scale, B_scale, gemm, out_dtype, reduce_op, world_size, group_name, use_fast_accum
    )


@gemm_reduce_scatter.register_fake
def _gemm_reduce_scatter_fake(A, B, A_scale, B_scale, gemm, out_dtype, reduce_op, world_size, group_name, use_fast_accum=False):
    # No divisibility check here: under torch.cond a check in the fake impl would specialize the branch.
    return A.new_empty((A.shape[0] // world_size, B.shape[1]), dtype=gemm_kinds.result_dtype(gemm, A, out_dtype))


@opcheck_samples(gemm_reduce_scatter)
def _samples() -> Iterator[OpSample]:
    # tests/test_opcheck.py runs every sample inside a 1-rank gloo process group.
    import torch.distributed as dist

    group = dist.group.WORLD.group_name
    ws = dist.get_world_size()
    g = torch.Generator().manual_seed(1)
    a = torch.randn(8, 32, generator=g, dtype=torch.bfloat16)
    b = torch.randn(32, 16, generator=g, dtype=torch.bfloat16)
    yield OpSample((a, b, None, None, "mm", None, "sum", ws, group), {}, name="mm-sum")
    a8 = torch.randn(8, 32, generator=g).to(torch.float8_e4m3fn)
    w8 = torch.randn(16, 32, generator=g).to(torch.float8_e4m3fn).t()
    one = torch.tensor([0.5])
    rows = torch.rand(8, 1, generator=g) + 0.5
    cols = torch.rand(1, 16, generator=g) + 0.5
    yield OpSample((a8, w8, one, one, "scaled_mm", torch.bfloat16, "avg", ws, group), {}, name="scaled_mm-avg")
    yield OpSample((a8, w8, rows, cols, "scaled_mm", torch.bfloat16, "sum", ws, group), {}, name="scaled_mm-rowwise")
    yield OpSample((a8, w8, one, one, "bmm_fp8", torch.bfloat16, "sum", ws, group), {}, name="bmm_fp8")
