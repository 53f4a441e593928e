"""``C += A @ B * (A_scale * B_scale)`` for FP8 in one cuBLASLt call: ``scaled_mm_accumulate_``.

``torch._scaled_mm`` runs on cuBLASLt but exposes no C operand (its ``bias`` is a vector). cuBLASLt's
matmul computes ``D = alpha * scale_a * scale_b * (A @ B) + beta * C``, so with ``beta = 1`` and
``D = C`` the GEMM adds its product onto a matrix in its epilogue: the two-rank GEMM +
reduce_scatter pipeline uses that to add the peer's partial while it computes its own rows, instead
of summing the two afterwards (a pass over three matrices after the last GEMM; _symm_mem_pipeline.py).

    A        (M, K) float8_e4m3fn, row-major
    B        (K, N) float8_e4m3fn, column-major (``W.t()`` of a contiguous (N, K) weight)
    A_scale  float32, one element;  B_scale float32, one element (tensor-wise: cuBLASLt's scale
             pointers are per tensor on Hopper, so row-wise scaling stays on torch._scaled_mm)
    C        (M, N) bfloat16 or float16, rows dense (stride (N, 1)); updated in place by cuBLASLt's
             epilogue: C = round(round(product * A_scale * B_scale) + C), the product rounded to C's
             type before the add (measured, cuBLAS 13 on H200: every element matches a separate
             _scaled_mm + add, where one rounding would differ in 24% of them), so the fused
             reduce_scatter gives the unfused sum bit for bit (tests/gpu/test_scaled_mm_accumulate.py)

cuBLASLt is column-major. Row-major C is the column-major (N, M) matrix C^T, and C^T += W A^T with
W the (N, K) weight, whose row-major bytes are the column-major (K, N) matrix read transposed (op T),
and A^T the row-major A read as column-major (K, M) (op N): the "TN" form cuBLASLt requires for FP8.
The library is the one torch already loaded; plans (descriptors, layouts, the heuristic's algorithm)
are cached per shape and pointer alignment, the workspace per stream, made outside CUDA graph pools.
"""

from __future__ import annotations

import ctypes
import glob
import os
import site

import torch

from .library import HALF_DTYPES, cached_buffer, check, check_dtype

OP = "scaled_mm_accumulate_"
WORKSPACE_BYTES = 32 << 20

# cublasLt.h / library_types.h / cublas_api.h
_CUDA_R_32F, _CUDA_R_16F, _CUDA_R_16BF, _CUDA_R_8F_E4M3 = 0, 2, 14, 28
_CUBLAS_COMPUTE_32F = 68
_CUBLAS_OP_N, _CUBLAS_OP_T = 0, 1
_DESC_TRANSA, _DESC_TRANSB, _DESC_A_SCALE_POINTER, _DESC_B_SCALE_POINTER, _DESC_FAST_ACCUM = 3, 4, 17, 18, 25
_PREF_MAX_WORKSPACE_BYTES = 1
_PREF_MIN_ALIGNMENT_BYTES = (5, 6, 7, 8)  # A, B, C, D
_OUT_TYPES = {torch.bfloat16: _CUDA_R_16BF, torch.float16: _CUDA_R_16F}


class _HeuristicResult(ctypes.Structure):
    _fields_ = [
        ("algo", ctypes.c_uint64 * 8),
        ("workspaceSize", ctypes.c_size_t),
        ("state", ctypes.c_int),
        ("wavesCount", ctypes.c_float),
        ("reserved", ctypes.c_int * 4),
    ]


def _load_library() -> ctypes.CDLL:
    # By soname first: the dynamic loader returns the copy torch already loaded.
    for name in ("libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            pass
    roots = [os.path.join(p, "nvidia") for p in site.getsitepackages()]
    for path in sorted(p for root in roots for p in glob.glob(os.path.join(root, "*", "lib", "libcublasLt.so*"))):
        return ctypes.CDLL(path)
    raise RuntimeError(f"fusionpasses.{OP}: libcublasLt not found")


_lib: ctypes.CDLL | None = None
_handles: dict[int, ctypes.c_void_p] = {}
_plans: dict[tuple, tuple] = {}
_workspaces: dict[tuple[int, int], torch.Tensor] = {}


def _cublaslt() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        lib = _load_library()
        lib.cublasLtGetStatusString.restype = ctypes.c_char_p
        _lib = lib
    return _lib


def _ok(status: int, what: str) -> None:
    if status != 0:
        message = _cublaslt().cublasLtGetStatusString(status).decode()
        raise RuntimeError(f"fusionpasses.{OP}: {what} failed: {message} ({status})")


def _handle(device: int) -> ctypes.c_void_p:
    if device not in _handles:
        handle = ctypes.c_void_p()
        _ok(_cublaslt().cublasLtCreate(ctypes.byref(handle)), "cublasLtCreate")
        _handles[device] = handle
    return _handles[device]


def _alignment(t: torch.Tensor) -> int:
    """Largest power of two up to 256 that divides the address (cuBLASLt's heuristic assumes 256)."""
    address = t.data_ptr()
    return 256 if address % 256 == 0 else address & -address


def _plan(device: int, M: int, N: int, K: int, out_type: int, fast_accum: bool, alignments: tuple[int, ...]):
    key = (device, M, N, K, out_type, fast_accum, alignments)
    plan = _plans.get(key)
    if plan is not None:
        return plan
    lib = _cublaslt()
    desc = ctypes.c_void_p()
    _ok(lib.cublasLtMatmulDescCreate(ctypes.byref(desc), _CUBLAS_COMPUTE_32F, _CUDA_R_32F), "cublasLtMatmulDescCreate")

    def set_desc(attribute: int, value: ctypes._SimpleCData) -> None:
        _ok(lib.cublasLtMatmulDescSetAttribute(desc, attribute, ctypes.byref(value), ctypes.sizeof(value)),
            "cublasLtMatmulDescSetAttribute")

    set_desc(_DESC_TRANSA, ctypes.c_int32(_CUBLAS_OP_T))
    set_desc(_DESC_TRANSB, ctypes.c_int32(_CUBLAS_OP_N))
    set_desc(_DESC_FAST_ACCUM, ctypes.c_int8(int(fast_accum)))

    def layout(dtype: int, rows: int, cols: int, ld: int) -> ctypes.c_void_p:
        handle = ctypes.c_void_p()
        _ok(lib.cublasLtMatrixLayoutCreate(ctypes.byref(handle), dtype, ctypes.c_uint64(rows), ctypes.c_uint64(cols),
                                           ctypes.c_int64(ld)), "cublasLtMatrixLayoutCreate")
        return handle

    weight_layout = layout(_CUDA_R_8F_E4M3, K, N, K)  # the weight's bytes, column-major (K, N), op T
    act_layout = layout(_CUDA_R_8F_E4M3, K, M, K)  # A's bytes, column-major (K, M) = A^T
    out_layout = layout(out_type, N, M, N)  # C^T, column-major (N, M)
    preference = ctypes.c_void_p()
    _ok(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(preference)), "cublasLtMatmulPreferenceCreate")
    workspace = ctypes.c_uint64(WORKSPACE_BYTES)
    _ok(lib.cublasLtMatmulPreferenceSetAttribute(preference, _PREF_MAX_WORKSPACE_BYTES, ctypes.byref(workspace),
                                                  ctypes.sizeof(workspace)), "cublasLtMatmulPreferenceSetAttribute")
    for attribute, value in zip(_PREF_MIN_ALIGNMENT_BYTES, alignments, strict=True):
        aligned = ctypes.c_uint32(value)
        _ok(lib.cublasLtMatmulPreferenceSetAttribute(preference, attribute, ctypes.byref(aligned),
                                                      ctypes.sizeof(aligned)), "cublasLtMatmulPreferenceSetAttribute")
    result = _HeuristicResult()
    found = ctypes.c_int(0)
    _ok(lib.cublasLtMatmulAlgoGetHeuristic(_handle(device), desc, weight_layout, act_layout, out_layout, out_layout,
                                           preference, 1, ctypes.byref(result), ctypes.byref(found)),
        "cublasLtMatmulAlgoGetHeuristic")
    lib.cublasLtMatmulPreferenceDestroy(preference)
    if found.value < 1:
        raise RuntimeError(f"fusionpasses.{OP}: cuBLASLt has no FP8 algorithm for M={M}, N={N}, K={K}")
    plan = _plans[key] = (desc, weight_layout, act_layout, out_layout, result)
    return plan


def can_accumulate(A: torch.Tensor, B: torch.Tensor, A_scale, B_scale, out_dtype: torch.dtype) -> bool:
    """Whether :func:`scaled_mm_accumulate_` takes these operands (else add a separate product)."""
    return (
        A.dtype == B.dtype == torch.float8_e4m3fn
        and out_dtype in _OUT_TYPES
        and A_scale is not None and B_scale is not None
        and A_scale.numel() == 1 and B_scale.numel() == 1
        and A.shape[1] % 16 == 0 and B.shape[1] % 16 == 0
    )


def scaled_mm_accumulate_(
    A: torch.Tensor, B: torch.Tensor, A_scale: torch.Tensor, B_scale: torch.Tensor, C: torch.Tensor,
    use_fast_accum: bool = False,
) -> torch.Tensor:
    """C += (A @ B) * (A_scale * B_scale), in place, on the current stream; returns C."""
    check(A.dim() == 2 and B.dim() == 2 and C.dim() == 2, OP, "A, B and C must be 2-D")
    M, K = A.shape
    N = B.shape[1]
    check(B.shape[0] == K and tuple(C.shape) == (M, N), OP,
          f"shapes do not chain: A {tuple(A.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)}")
    check_dtype(A, OP, "A", (torch.float8_e4m3fn,))
    check_dtype(B, OP, "B", (torch.float8_e4m3fn,))
    check_dtype(C, OP, "C", tuple(HALF_DTYPES))
    check(A.stride(1) == 1 and (M == 1 or A.stride(0) == K), OP, f"A must be row-major and dense, strides {A.stride()}")
    check(B.stride(0) == 1 and B.stride(1) == K, OP, f"B must be column-major (a weight's .t()), strides {B.stride()}")
    check(C.stride(1) == 1 and (M == 1 or C.stride(0) == N), OP, f"C rows must be dense, strides {C.stride()}")
    check(K % 16 == 0 and N % 16 == 0, OP, f"K and N must be multiples of 16 for cuBLASLt FP8, got K={K}, N={N}")
    check(A_scale.numel() == 1 and B_scale.numel() == 1 and A_scale.dtype == B_scale.dtype == torch.float32, OP,
          "scales must be one-element float32 tensors (tensor-wise)")
    check(A.is_cuda and all(t.device == A.device for t in (B, C, A_scale, B_scale)), OP,
          "operands must share a CUDA device")
    if M == 0:
        return C
    device = A.device.index if A.device.index is not None else torch.cuda.current_device()
    alignments = tuple(_alignment(t) for t in (B, A, C, C))
    desc, weight_layout, act_layout, out_layout, heuristic = _plan(
        device, M, N, K, _OUT_TYPES[C.dtype], use_fast_accum, alignments
    )
    lib = _cublaslt()
    # The scales are device pointers, set per call on the cached descriptor: cuBLASLt's "A" is the weight.
    for attribute, scale in ((_DESC_A_SCALE_POINTER, B_scale), (_DESC_B_SCALE_POINTER, A_scale)):
        pointer = ctypes.c_void_p(scale.data_ptr())
        _ok(lib.cublasLtMatmulDescSetAttribute(desc, attribute, ctypes.byref(pointer), ctypes.sizeof(pointer)),
            "cublasLtMatmulDescSetAttribute")
    stream = torch.cuda.current_stream(A.device)
    workspace = cached_buffer(
        _workspaces, (device, stream.cuda_stream),
        lambda: torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=A.device), A.device,
    )
    one = ctypes.c_float(1.0)
    _ok(lib.cublasLtMatmul(
        _handle(device), desc, ctypes.byref(one),
        ctypes.c_void_p(B.data_ptr()), weight_layout, ctypes.c_void_p(A.data_ptr()), act_layout,
        ctypes.byref(one), ctypes.c_void_p(C.data_ptr()), out_layout, ctypes.c_void_p(C.data_ptr()), out_layout,
        ctypes.byref(heuristic.algo), ctypes.c_void_p(workspace.data_ptr()),
        ctypes.c_size_t(WORKSPACE_BYTES), ctypes.c_void_p(stream.cuda_stream),
    ), "cublasLtMatmul")
    return C
