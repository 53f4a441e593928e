"""FlashInfer's FP8 batched GEMM as real torch ops: ``bmm_fp8`` and its out-variant ``bmm_fp8_out``.

FlashInfer registers ``bmm_fp8`` as a plain Python function, so Inductor sees nothing it can match or
reorder. Wrapping it gives the graph a node (``fusionpasses.bmm_fp8``) that the AsyncTP pass can fuse
with collectives while keeping FlashInfer's cuBLASLt kernel inside the pipeline (through the
out-variant, which writes each rank chunk into the pipeline's buffer).

Layouts (FlashInfer does not check strides, so these ops do):
    A        (b, M, K) float8_e4m3fn, row-major
    B        (b, K, N) float8_e4m3fn, column-major per batch: ``W.t()`` of a contiguous (N, K) weight
    A_scale  float32, one element: the dequantization multiplier (real = fp8 * scale)
    B_scale  float32, one element
    out      (b, M, N) bf16 or fp16
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .library import (
    HALF_DTYPES,
    OpSample,
    cached_buffer,
    check,
    check_dtype,
    check_ndim,
    check_same_device,
    check_tensorwise_scale,
    op_name,
    opcheck_samples,
)

BACKENDS = ("cublas", "cudnn", "auto")


def _validate(A: torch.Tensor, B: torch.Tensor, A_scale: torch.Tensor, B_scale: torch.Tensor, out_dtype: torch.dtype, backend: str) -> None:
    op = "bmm_fp8"
    check_ndim(A, op, "A", 3)
    check_ndim(B, op, "B", 3)
    check_dtype(A, op, "A", (torch.float8_e4m3fn, torch.float8_e5m2))
    check_dtype(B, op, "B", (torch.float8_e4m3fn, torch.float8_e5m2))
    check(
        not (A.dtype == torch.float8_e5m2 and B.dtype == torch.float8_e5m2),
        op,
        "e5m2 x e5m2 is not supported by cuBLASLt; quantize one operand to e4m3",
    )
    check(A.shape[0] == B.shape[0], op, f"batch sizes differ: A {tuple(A.shape)}, B {tuple(B.shape)}")
    check(A.shape[2] == B.shape[1], op, f"K differs: A {tuple(A.shape)}, B {tuple(B.shape)}")
    check(A.stride(2) == 1 and A.stride(1) == A.shape[2], op, f"A must be row-major, got strides {A.stride()}")
    check(
        B.stride(1) == 1 and B.stride(2) == B.shape[1],
        op,
        f"B must be column-major per batch (W.t() of a contiguous (N, K) weight), got strides {B.stride()}",
    )
    check_tensorwise_scale(A_scale, op, "A_scale")
    check_tensorwise_scale(B_scale, op, "B_scale")
    check(out_dtype in HALF_DTYPES, op, f"out_dtype must be bfloat16 or float16, got {out_dtype}")
    check(backend in BACKENDS, op, f"backend must be one of {BACKENDS}, got {backend!r}")
    check_same_device(op, A=A, B=B, A_scale=A_scale, B_scale=B_scale)


def reference_bmm_fp8(
    A: torch.Tensor, B: torch.Tensor, A_scale: torch.Tensor, B_scale: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """Dequantize-free definition: fp32 product of the fp8 values, times both scales, cast once."""
    acc = torch.bmm(A.float(), B.float())
    return (acc * (A_scale.float() * B_scale.float())).to(out_dtype)


def _flashinfer():
    try:
        import flashinfer
    except ImportError as e:  # pragma: no cover - depends on the GPU machine
        raise RuntimeError(
            "fusionpasses.bmm_fp8 runs FlashInfer's bmm_fp8 on CUDA: `pip install flashinfer-python>=0.7.0` "
            "(0.6.x passes a cuBLAS handle as a cuBLASLt handle on CUDA 13)"
        ) from e
    return flashinfer


# FlashInfer's public bmm_fp8 spends ~86 us of host time per call on H200 (backend checks, API tracing,
# and a new autotuner runner per call) where the cuBLASLt kernel of a small GEMM takes ~10 us. A fused
# collective op calls the GEMM once per rank chunk, so that overhead decides whether fusion pays off.
# The fast path keeps one cuBLASLt runner (the object FlashInfer's own "cublas" backend builds) and calls
# it directly with FlashInfer's default heuristic tactic: the same kernel as the public API, untuned.
USE_FAST_PATH = True
_fast_runner: object | None = None
# One cuBLASLt workspace per stream: GEMMs running at once on two streams (the two-stream pipeline of
# the fused collective ops) would otherwise overwrite each other's split-K partials.
_workspaces: dict[tuple[torch.device, int], torch.Tensor] = {}
_WORKSPACE_BYTES = 40 * 1024 * 1024  # what FlashInfer 0.7 allocates for bmm_fp8


def _cublas_runner():
    global _fast_runner
    if _fast_runner is None:
        try:
            from flashinfer.gemm.gemm_base import get_gemm_module

            _fast_runner = get_gemm_module().cublas_fp8_gemm_runner()
        except (ImportError, AttributeError):  # another FlashInfer version: use the public API
            _fast_runner = False
    return _fast_runner or None


def safe_on_concurrent_streams(backend: str = "cublas") -> bool:
    """Whether GEMMs may run on two streams at once: only the fast path has a workspace per stream;
    FlashInfer's public API shares one workspace per device between all streams."""
    return USE_FAST_PATH and backend == "cublas" and _cublas_runner() is not None


def bmm_fp8_into(
    A: torch.Tensor, B: torch.Tensor, A_scale: torch.Tensor, B_scale: torch.Tensor, out: torch.Tensor, backend: str = "cublas"
) -> None:
    """Unchecked launch of FlashInfer's FP8 GEMM into ``out`` (callers validate first)."""
    runner = _cublas_runner() if (USE_FAST_PATH and backend == "cublas") else None
    if runner is not None:
        key = (A.device, torch.cuda.current_stream(A.device).cuda_stream)
        workspace = cached_buffer(
            _workspaces, key, lambda: torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=A.device), A.device
        )
        runner.forward([A, B, A_scale, B_scale, out, workspace], tactic=-1)
    else:
        _flashinfer().bmm_fp8(A, B, A_scale, B_scale, out.dtype, out, backend=backend)


@torch.library.custom_op(op_name("bmm_fp8"), mutates_args=(), device_types="cuda")
def bmm_fp8(
    A: torch.Tensor,
    B: torch.Tensor,
    A_scale: torch.Tensor,
    B_scale: torch.Tensor,
    out_dtype: torch.dtype,
    backend: str = "cublas",
) -> torch.Tensor:
    _validate(A, B, A_scale, B_scale, out_dtype, backend)
    out = torch.empty((A.shape[0], A.shape[1], B.shape[2]), dtype=out_dtype, device=A.device)
    bmm_fp8_into(A, B, A_scale, B_scale, out, backend)
    return out


@bmm_fp8.register_kernel("cpu")
def _bmm_fp8_cpu(A, B, A_scale, B_scale, out_dtype, backend="cublas"):
    _validate(A, B, A_scale, B_scale, out_dtype, backend)
    return reference_bmm_fp8(A, B, A_scale, B_scale, out_dtype)


@bmm_fp8.register_fake
def _bmm_fp8_fake(A, B, A_scale, B_scale, out_dtype, backend="cublas"):
    return A.new_empty((A.shape[0], A.shape[1], B.shape[2]), dtype=out_dtype)


@torch.library.custom_op(op_name("bmm_fp8_out"), mutates_args=("result",), device_types="cuda")
def bmm_fp8_out(
    A: torch.Tensor,
    B: torch.Tensor,
    A_scale: torch.Tensor,
    B_scale: torch.Tensor,
    result: torch.Tensor,
    backend: str = "cublas",
) -> None:
    """Out-variant: writes A @ B into ``result`` (b, M, N), which may be a view of a larger buffer."""
    _validate(A, B, A_scale, B_scale, result.dtype, backend)
    _check_result(A, B, result)
    bmm_fp8_into(A, B, A_scale, B_scale, result, backend)


@bmm_fp8_out.register_kernel("cpu")
def _bmm_fp8_out_cpu(A, B, A_scale, B_scale, result, backend="cublas"):
    _validate(A, B, A_scale, B_scale, result.dtype, backend)
    _check_result(A, B, result)
    result.copy_(reference_bmm_fp8(A, B, A_scale, B_scale, result.dtype))


@bmm_fp8_out.register_fake
def _bmm_fp8_out_fake(A, B, A_scale, B_scale, result, backend="cublas"):
    return None


def _check_result(A: torch.Tensor, B: torch.Tensor, result: torch.Tensor) -> None:
    op = "bmm_fp8_out"
    expected = (A.shape[0], A.shape[1], B.shape[2])
    check(tuple(result.shape) == expected, op, f"result must have shape {expected}, got {tuple(result.shape)}")
    # cuBLASLt writes M rows of N contiguous values per batch: the result rows must be dense.
    check(
        result.stride(2) == 1 and result.stride(1) == result.shape[2],
        op,
        f"result must be row-major with dense rows, got strides {result.stride()}",
    )


def _samples() -> Iterator[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(0)
    for b, m, k, n in ((1, 1, 16, 16), (1, 33, 32, 48), (2, 8, 64, 16)):
        A = (torch.randn(b, m, k, generator=g) * 2).to(torch.float8_e4m3fn)
        W = (torch.randn(b, n, k, generator=g) * 2).to(torch.float8_e4m3fn)
        yield A, W.transpose(1, 2), torch.tensor([0.5]), torch.tensor([0.25])


@opcheck_samples(bmm_fp8)
def _bmm_fp8_samples() -> Iterator[OpSample]:
    for A, B, sa, sb in _samples():
        for dt in HALF_DTYPES:
            yield OpSample((A, B, sa, sb, dt), {}, name=f"{tuple(A.shape)}x{tuple(B.shape)}->{dt}")


@opcheck_samples(bmm_fp8_out)
def _bmm_fp8_out_samples() -> Iterator[OpSample]:
    for A, B, sa, sb in _samples():
        out = torch.empty(A.shape[0], A.shape[1], B.shape[2], dtype=torch.bfloat16)
        yield OpSample((A, B, sa, sb, out), {}, name=f"{tuple(A.shape)}x{tuple(B.shape)}")
