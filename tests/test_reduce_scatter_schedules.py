"""Which pipeline a GEMM + reduce_scatter runs on, and the FP8 GEMM that adds onto its output (CPU:
the decisions and the argument checks; the GPU side: tests/gpu/test_scaled_mm_accumulate.py and the
reduce_scatter tests of tests/gpu/test_async_tp_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from fusionpasses.kernels import gemm_kinds
from fusionpasses.kernels._symm_mem_pipeline import force_schedule, schedule_for, sums_in_gemm
from fusionpasses.kernels.gemm_reduce_scatter import schedule_that_runs
from fusionpasses.kernels.library import KernelInputError
from fusionpasses.kernels.scaled_mm_accumulate import scaled_mm_accumulate_

FP8, BF16 = torch.float8_e4m3fn, torch.bfloat16


def test_only_the_reduce_scatter_sums_in_the_gemm():
    assert schedule_for("scaled_mm", "rs") == schedule_for("mm", "rs") == "sum_in_gemm"
    assert schedule_for("scaled_mm", "ag") == "one_compute_stream"
    with force_schedule("sum_in_gemm"):
        assert schedule_for("mm", "ag") == "one_compute_stream"
        assert schedule_for("bmm_fp8", "rs") == "sum_in_gemm"  # the op falls back: bmm_fp8 takes no C
    with pytest.raises(ValueError, match="schedule must be one of"):
        with force_schedule("sum_after"):
            pass


@pytest.mark.parametrize(
    "world_size,rows,sums",
    [(2, 8192, True), (2, 4096, True), (2, 2048, False), (2, 4097, False), (4, 8192, False)],
)
def test_the_sum_moves_into_the_gemm_for_two_ranks_and_long_pieces(world_size, rows, sums):
    # Two pieces of at least MIN_ROWS_ADDED_IN_THE_GEMM rows each (2048: M >= 8192 at ws 2).
    assert sums_in_gemm(world_size, rows) is sums


def _meta(*shape, dtype=FP8):
    return torch.empty(*shape, dtype=dtype, device="meta")


@pytest.mark.parametrize(
    "gemm,M,A_scale,out_dtype,reduce_op,world_size,runs",
    [
        # bench_tp_block's down projection at 16384 tokens: (1,) scales, 4096 rows per piece.
        ("scaled_mm", 16384, (1,), BF16, "sum", 2, "sum_in_gemm"),
        ("scaled_mm", 8192, (1,), BF16, "sum", 2, "sum_in_gemm"),
        ("scaled_mm", 4096, (1,), BF16, "sum", 2, "one_compute_stream"),  # 1024 rows per piece
        ("scaled_mm", 16384, (16384, 1), BF16, "sum", 2, "one_compute_stream"),  # row-wise
        ("scaled_mm", 16384, (1,), BF16, "avg", 2, "one_compute_stream"),
        ("scaled_mm", 16384, (1,), BF16, "sum", 4, "one_compute_stream"),
        ("mm", 16384, None, None, "sum", 2, "sum_in_gemm"),
        ("bmm_fp8", 16384, (1,), BF16, "sum", 2, "one_compute_stream"),  # FlashInfer's call takes no C
    ],
    ids=["tp-block", "M8192", "M4096", "rowwise", "avg", "ws4", "mm", "bmm_fp8"],
)
def test_the_schedule_that_runs_after_fallbacks(gemm, M, A_scale, out_dtype, reduce_op, world_size, runs):
    K, N = 14336, 8192
    dtype = BF16 if gemm == "mm" else FP8
    A, B = _meta(M, K, dtype=dtype), _meta(N, K, dtype=dtype).t()
    scales = (None, None) if A_scale is None else (_meta(*A_scale, dtype=torch.float32), _meta(1, dtype=torch.float32))
    if gemm == "scaled_mm" and len(A_scale) == 2:
        scales = (scales[0], _meta(1, N, dtype=torch.float32))
    with force_schedule("sum_in_gemm"):  # the default for mm and scaled_mm, forced for bmm_fp8
        assert schedule_that_runs(gemm, A, B, *scales, out_dtype, reduce_op, world_size) == runs


def _fp8(*shape):
    return torch.randn(*shape).to(FP8)


ONE = torch.tensor([1.0])


@pytest.mark.parametrize(
    "kind,A,B,A_scale,B_scale,out_dtype,adds",
    [
        ("mm", torch.randn(4, 32, dtype=BF16), torch.randn(32, 16, dtype=BF16), None, None, BF16, True),
        ("scaled_mm", _fp8(4, 32), _fp8(16, 32).t(), ONE, ONE, BF16, True),
        ("scaled_mm", _fp8(4, 32), _fp8(16, 32).t(), ONE, ONE, torch.float16, True),
        # Row-wise scales stay on torch._scaled_mm; cuBLASLt's scale pointers are per tensor.
        ("scaled_mm", _fp8(4, 32), _fp8(16, 32).t(), torch.ones(4, 1), torch.ones(1, 16), BF16, False),
        ("scaled_mm", _fp8(4, 32), _fp8(16, 32).t(), ONE, ONE, torch.float32, False),
        ("scaled_mm", _fp8(4, 24), _fp8(16, 24).t(), ONE, ONE, BF16, False),  # K % 16
        ("scaled_mm", torch.randn(4, 32).to(torch.float8_e5m2), _fp8(16, 32).t(), ONE, ONE, BF16, False),
        # FlashInfer stays FlashInfer: its call has no C operand.
        ("bmm_fp8", _fp8(4, 32), _fp8(16, 32).t(), ONE, ONE, BF16, False),
    ],
    ids=["mm", "scaled_mm", "scaled_mm-fp16", "rowwise", "fp32-out", "K24", "e5m2", "bmm_fp8"],
)
def test_which_gemms_add_onto_their_output(kind, A, B, A_scale, B_scale, out_dtype, adds):
    assert gemm_kinds.adds_onto_output(kind, A, B, A_scale, B_scale, out_dtype) is adds


@pytest.mark.parametrize(
    "A,B,C,A_scale,match",
    [
        (_fp8(4, 32), _fp8(16, 32).t(), torch.zeros(4, 8, dtype=BF16), ONE, "shapes do not chain"),
        (torch.randn(4, 32, dtype=BF16), _fp8(16, 32).t(), torch.zeros(4, 16, dtype=BF16), ONE, "A must have dtype"),
        (_fp8(4, 32), _fp8(16, 32).t(), torch.zeros(4, 16), ONE, "C must have dtype"),
        (_fp8(4, 32), _fp8(32, 16), torch.zeros(4, 16, dtype=BF16), ONE, "column-major"),
        (_fp8(4, 32), _fp8(16, 32).t(), torch.zeros(16, 4, dtype=BF16).t(), ONE, "C rows must be dense"),
        (_fp8(4, 40), _fp8(16, 40).t(), torch.zeros(4, 16, dtype=BF16), ONE, "multiples of 16"),
        (_fp8(4, 32), _fp8(16, 32).t(), torch.zeros(4, 16, dtype=BF16), torch.ones(4, 1), "tensor-wise"),
    ],
    ids=["shape", "A-dtype", "C-dtype", "B-layout", "C-layout", "K40", "rowwise"],
)
def test_scaled_mm_accumulate_rejects_bad_arguments(A, B, C, A_scale, match):
    with pytest.raises(KernelInputError, match=match):
        scaled_mm_accumulate_(A, B, A_scale, ONE, C)


def test_scaled_mm_accumulate_needs_cuda():
    with pytest.raises(KernelInputError, match="CUDA"):
        scaled_mm_accumulate_(_fp8(4, 32), _fp8(16, 32).t(), ONE, ONE, torch.zeros(4, 16, dtype=BF16))
