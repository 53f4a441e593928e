"""The GEMMs the fused collective ops keep inside their pipelines, by kind.

A fused all_gather+GEMM or GEMM+reduce_scatter op runs the model's own GEMM once per rank chunk, so
it needs, for each kind, the same product as the unfused graph computed and an out-variant that writes
into a slice of the pipeline's buffer:

    kind        A          B                  A_scale                 B_scale          result
    mm          bf16/fp16  (K, N)             -                       -                A.dtype
    scaled_mm   fp8        (K, N) col-major   (1,) or (M, 1) rows     (1,) or (1, N)   out_dtype
    bmm_fp8     fp8 e4m3   (K, N) col-major   (1,)                    (1,)             out_dtype (FlashInfer)

``bmm_fp8`` may carry FlashInfer's backend after a colon: ``"bmm_fp8:cudnn"`` (default cublas).
"""

from __future__ import annotations

import torch

from .library import HALF_DTYPES, check, check_column_major, check_dtype, check_ndim

GEMM_KINDS = ("mm", "scaled_mm", "bmm_fp8")


def split_kind(gemm: str) -> tuple[str, str]:
    """("bmm_fp8", "cudnn") for "bmm_fp8:cudnn"; the backend is "" for kinds that have none."""
    kind, _, backend = gemm.partition(":")
    return kind, (backend or "cublas") if kind == "bmm_fp8" else backend


def is_rowwise(A_scale: torch.Tensor | None) -> bool:
    return A_scale is not None and A_scale.dim() == 2 and A_scale.numel() > 1


def result_dtype(kind: str, A: torch.Tensor, out_dtype: torch.dtype | None) -> torch.dtype:
    if split_kind(kind)[0] == "mm":
        return A.dtype
    return out_dtype if out_dtype is not None else torch.bfloat16


def validate(
    op: str,
    kind: str,
    A: torch.Tensor,
    B: torch.Tensor,
    A_scale: torch.Tensor | None,
    B_scale: torch.Tensor | None,
    out_dtype: torch.dtype | None,
    rows: int,
) -> None:
    """Checks shared by both fused ops; ``rows`` is the M the A scale must cover (the global M)."""
    kind, backend = split_kind(kind)
    check(kind in GEMM_KINDS, op, f"gemm must be one of {GEMM_KINDS}, got {kind!r}")
    check(kind != "bmm_fp8" or backend in ("cublas", "cudnn", "auto"), op, f"unknown bmm_fp8 backend {backend!r}")
    check(kind == "bmm_fp8" or not backend, op, f"gemm={kind!r} takes no backend")
    check_ndim(A, op, "A", 2)
    check_ndim(B, op, "B", 2)
    check(A.shape[1] == B.shape[0], op, f"K differs: A {tuple(A.shape)}, B {tuple(B.shape)}")
    if kind == "mm":
        check_dtype(A, op, "A", (torch.bfloat16, torch.float16, torch.float32))
        check(B.dtype == A.dtype, op, f"B dtype {B.dtype} differs from A dtype {A.dtype}")
        check(A_scale is None and B_scale is None, op, "gemm='mm' takes no scales")
        return
    check_dtype(A, op, "A", (torch.float8_e4m3fn, torch.float8_e5m2))
    check_dtype(B, op, "B", (torch.float8_e4m3fn, torch.float8_e5m2))
    check_column_major(B, op, "B")
    check(out_dtype is None or out_dtype in (*HALF_DTYPES, torch.float32), op, f"unsupported out_dtype {out_dtype}")
    check(A_scale is not None and B_scale is not None, op, f"gemm={kind!r} needs A_scale and B_scale")
    assert A_scale is not None and B_scale is not None
    check(A_scale.dtype == torch.float32 and B_scale.dtype == torch.float32, op, "scales must be float32")
    if kind == "bmm_fp8":
        check_dtype(A, op, "A", (torch.float8_e4m3fn,))
        check(
            A_scale.numel() == 1 and B_scale.numel() == 1,
            op,
            "gemm='bmm_fp8' (FlashInfer) takes tensor-wise scales only; row-wise scales need gemm='scaled_mm'",
        )
        check(out_dtype in HALF_DTYPES, op, f"gemm='bmm_fp8' needs a bf16/fp16 out_dtype, got {out_dtype}")
        return
    if A_scale.numel() != 1:
        check(
            tuple(A_scale.shape) == (rows, 1),
            op,
            f"row-wise A_scale must have shape ({rows}, 1) (one scale per row of the full M), got {tuple(A_scale.shape)}",
        )
        check(
            tuple(B_scale.shape) == (1, B.shape[1]),
            op,
            f"row-wise scaling needs B_scale of shape (1, {B.shape[1]}), got {tuple(B_scale.shape)}",
        )
    else:
        check(B_scale.numel() == 1, op, f"tensor-wise A_scale needs a tensor-wise B_scale, got {tuple(B_scale.shape)}")


def compute(
    kind: str,
    A: torch.Tensor,
    B: torch.Tensor,
    A_scale: torch.Tensor | None,
    B_scale: torch.Tensor | None,
    out_dtype: torch.dtype | None,
    use_fast_accum: bool,
) -> torch.Tensor:
    """The GEMM exactly as the unfused graph computes it (same op, same arguments)."""
    kind, backend = split_kind(kind)
    if kind == "mm":
        return torch.mm(A, B)
    if kind == "scaled_mm":
        return torch._scaled_mm(
            A, B, A_scale, B_scale, out_dtype=result_dtype(kind, A, out_dtype), use_fast_accum=use_fast_accum
        )
    return torch.ops.fusionpasses.bmm_fp8(A.unsqueeze(0), B.unsqueeze(0), A_scale, B_scale, out_dtype, backend).squeeze(0)


def compute_into(
    kind: str,
    A: torch.Tensor,
    B: torch.Tensor,
    A_scale: torch.Tensor | None,
    B_scale: torch.Tensor | None,
    out: torch.Tensor,
    use_fast_accum: bool,
    accumulate: bool = False,
) -> None:
    """Out-variant used per chunk inside the CUDA pipelines; ``out`` is a row slice of a buffer.
    ``accumulate``: ``out += gemm(A, B)`` in the GEMM's epilogue (only where :func:`adds_onto_output`)."""
    kind, backend = split_kind(kind)
    if kind == "mm":
        if accumulate:
            out.addmm_(A, B)
        else:
            torch.mm(A, B, out=out)
    elif kind == "scaled_mm":
        if accumulate:
            from .scaled_mm_accumulate import scaled_mm_accumulate_

            scaled_mm_accumulate_(A, B, A_scale, B_scale, out, use_fast_accum)
        else:
            torch._scaled_mm(A, B, A_scale, B_scale, out_dtype=out.dtype, use_fast_accum=use_fast_accum, out=out)
    else:
        assert not accumulate, "bmm_fp8 takes no C operand"
        from .bmm_fp8 import bmm_fp8_into

        bmm_fp8_into(A.unsqueeze(0), B.unsqueeze(0), A_scale, B_scale, out.unsqueeze(0), backend)


def adds_onto_output(kind: str, A: torch.Tensor, B: torch.Tensor, A_scale, B_scale, out_dtype: torch.dtype) -> bool:
    """Whether :func:`compute_into` can add this GEMM's product onto ``out`` in the GEMM itself
    (``accumulate=True``): ``mm`` (cuBLAS with beta = 1) and tensor-wise e4m3 ``scaled_mm`` (cuBLASLt
    with beta = 1, the library torch._scaled_mm runs on). ``bmm_fp8`` stays on FlashInfer's own call,
    row-wise scaling on torch._scaled_mm: neither takes a C operand."""
    kind = split_kind(kind)[0]
    if kind == "mm":
        return A.dtype in (*HALF_DTYPES, torch.float32)
    if kind == "scaled_mm":
        from .scaled_mm_accumulate import can_accumulate

        return can_accumulate(A, B, A_scale, B_scale, out_dtype)
    return False


def safe_on_concurrent_streams(kind: str) -> bool:
    """Whether two GEMMs of this kind may run at once on two streams of one device (torch gives each
    stream its own cuBLAS workspace; FlashInfer's bmm_fp8 does only on our fast path)."""
    kind, backend = split_kind(kind)
    if kind != "bmm_fp8":
        return True
    from .bmm_fp8 import safe_on_concurrent_streams as bmm_fp8_safe

    return bmm_fp8_safe(backend)


def rows_of_scale(A_scale: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    """The A scale that applies to rows [start, stop) of A (tensor-wise scales apply to all rows)."""
    if A_scale is None or not is_rowwise(A_scale):
        return A_scale
    chunk = A_scale[start:stop]
    # cuBLASLt reads row-wise scales with 16-byte vector loads: an unaligned slice must be copied.
    return chunk if chunk.data_ptr() % 16 == 0 else chunk.clone()
