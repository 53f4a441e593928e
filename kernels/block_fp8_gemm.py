"""Block-scaled FP8 GEMM (DeepSeek-V3 style) for Hopper, and the padding around its M alignment.

    out[m, n] = sum over K groups g of  (A[m, g] . B[n, g]) * A_scale_t[g, m] * B_scale[n // 128, g]

where a K group is 128 consecutive K values. Layouts:
    A          (M, K) float8_e4m3fn, row-major: activations, one scale per 1x128 group
    B          (N, K) float8_e4m3fn, row-major: the weight as nn.Linear stores it
    A_scale_t  (K/128, M) float32, M-major: ``A_scale_t[g, m]`` dequantizes ``A[m, 128g:128g+128]``
    B_scale    (ceil(N/128), K/128) float32, row-major: one scale per 128x128 weight block
    out        (M, N) bfloat16 (or float16)

Why the fast path needs M % 4 == 0: the kernel reads a tile's BLOCK_M activation scales of one K
group as a single TMA box of the M-major scale tensor. TMA requires every global stride except the
innermost to be a multiple of 16 bytes; the row stride of ``A_scale_t`` is M float32 values, so M
must be a multiple of 4 (``ALIGN_M``). CUTLASS's and DeepGEMM's SM90 block-scaled GEMMs carry the
same requirement for the same reason. A scale buffer whose rows are padded (row stride a multiple
of 4, e.g. ``buf[:, :M]`` of a (K/128, 4k) buffer) also satisfies it, for any M.

Three entry points:
- ``fusionpasses.block_fp8_mm``: the fast path; rejects unaligned scale rows.
- ``fusionpasses.block_fp8_mm_padded``: pads M up to ``ALIGN_M`` (always, copying A and its scales),
  runs the fast path and drops the padded rows. What callers used to do for every M.
- :func:`block_fp8_mm_any_m`: pads only when M is unaligned. In eager mode that is an ``if``; under
  torch.compile it is ``torch.cond(M % 4 != 0, padded, direct)``, so with a dynamic M one graph
  serves every M. It is a function rather than a custom op on purpose: a custom op is opaque to
  Dynamo, so a ``torch.cond`` inside one would never be traced.

The kernel: one K group (128) per step, its fp8 wgmma product scaled and added to an fp32
accumulator (the promotion DeepSeek-V3 describes); TMA loads for A, B and the activation scales and
a TMA store of the output; K split across CTAs (fp32 partials summed in split order) when the tile
grid would leave most SMs idle, as it does at decode-sized M.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON, interpreting, require_triton, tl, triton
from .library import (
    HALF_DTYPES,
    OpSample,
    check,
    check_contiguous,
    check_dtype,
    check_ndim,
    check_same_device,
    op_name,
    opcheck_samples,
)

QUANT_BLOCK = 128
"""Scale granularity: activations per 1x128 group of K, weights per 128x128 block."""

ALIGN_M = 4
"""M alignment of the fast path: 4 float32 scales = the 16 bytes TMA needs per scale row."""

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------


def _check_operands(
    op: str, A: torch.Tensor, B: torch.Tensor, A_scale_t: torch.Tensor, B_scale: torch.Tensor, out_dtype: torch.dtype
) -> None:
    check_ndim(A, op, "A", 2)
    check_ndim(B, op, "B", 2)
    check_ndim(A_scale_t, op, "A_scale_t", 2)
    check_ndim(B_scale, op, "B_scale", 2)
    check_dtype(A, op, "A", (torch.float8_e4m3fn,))
    check_dtype(B, op, "B", (torch.float8_e4m3fn,))
    check_dtype(A_scale_t, op, "A_scale_t", (torch.float32,))
    check_dtype(B_scale, op, "B_scale", (torch.float32,))
    check(out_dtype in HALF_DTYPES, op, f"out_dtype must be bfloat16 or float16, got {out_dtype}")
    M, K = A.shape
    N = B.shape[0]
    check(B.shape[1] == K, op, f"K differs: A {tuple(A.shape)}, B {tuple(B.shape)} (B is the (N, K) weight)")
    check(K > 0 and K % QUANT_BLOCK == 0, op, f"K ({K}) must be a positive multiple of {QUANT_BLOCK}")
    # The output is written by TMA: its rows (N bf16 values) must start on 16-byte boundaries.
    check(N > 0 and N % 8 == 0, op, f"N ({N}) must be a positive multiple of 8")
    check_contiguous(A, op, "A")
    check_contiguous(B, op, "B")
    check_contiguous(B_scale, op, "B_scale")
    k_groups = K // QUANT_BLOCK
    n_blocks = -(-N // QUANT_BLOCK)
    check(
        tuple(A_scale_t.shape) == (k_groups, M),
        op,
        f"A_scale_t must have shape (K/{QUANT_BLOCK}, M) = {(k_groups, M)}, got {tuple(A_scale_t.shape)}",
    )
    check(
        M == 0 or (A_scale_t.stride(1) == 1 and (k_groups == 1 or A_scale_t.stride(0) >= M)),
        op,
        f"A_scale_t must be M-major (M contiguous within each K group), got strides {A_scale_t.stride()}",
    )
    check(
        tuple(B_scale.shape) == (n_blocks, k_groups),
        op,
        f"B_scale must have shape (ceil(N/{QUANT_BLOCK}), K/{QUANT_BLOCK}) = {(n_blocks, k_groups)}, "
        f"got {tuple(B_scale.shape)}",
    )
    check_same_device(op, A=A, B=B, A_scale_t=A_scale_t, B_scale=B_scale)


def _check_aligned_scale_rows(op: str, A_scale_t: torch.Tensor) -> None:
    M = A_scale_t.shape[1]
    check(
        M == 0 or A_scale_t.stride(0) % ALIGN_M == 0,
        op,
        f"the rows of A_scale_t must be 16-byte aligned for TMA: M ({M}) or the row stride of A_scale_t "
        f"({A_scale_t.stride(0)}) must be a multiple of {ALIGN_M}; use block_fp8_mm_any_m (pads only when "
        f"needed) or block_fp8_mm_padded",
    )


def _check_fake_shapes(A: torch.Tensor, A_scale_t: torch.Tensor) -> None:
    # Tells the compiler that A and its scales share M: with unbacked or separately marked dynamic
    # sizes they would otherwise be unrelated symbols (and padding one could not be proven to pad both).
    torch._check(A_scale_t.shape[1] == A.shape[0], lambda: "A_scale_t must be (K/128, M) for A (M, K)")


# ---------------------------------------------------------------------------------------------
# reference (the definition of the result) and quantization helpers
# ---------------------------------------------------------------------------------------------


def reference_block_fp8_mm(
    A: torch.Tensor, B: torch.Tensor, A_scale_t: torch.Tensor, B_scale: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """One fp32 product per K group, scaled and accumulated in K order, cast once (as the kernel does)."""
    M, K = A.shape
    N = B.shape[0]
    a = A.float()
    b = B.float()
    # Column n of the weight uses the scale of its 128-row block.
    b_scale_per_column = B_scale.float().repeat_interleave(QUANT_BLOCK, dim=0)[:N]
    acc = torch.zeros(M, N, dtype=torch.float32, device=A.device)
    for g in range(K // QUANT_BLOCK):
        k = slice(g * QUANT_BLOCK, (g + 1) * QUANT_BLOCK)
        partial = a[:, k] @ b[:, k].t()
        acc = acc + partial * (A_scale_t[g].float()[:, None] * b_scale_per_column[:, g][None, :])
    return acc.to(out_dtype)


def quantize_activation_blockwise(x: torch.Tensor, scale_row_stride: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float -> A (M, K) e4m3 and its M-major scales ``A_scale_t`` (K/128, M), per 1x128 group.

    ``scale_row_stride`` (>= M) allocates the scales with padded rows, e.g. ``(M + 3) // 4 * 4`` for
    a layout the fast path accepts at any M; None gives contiguous scales.
    """
    M, K = x.shape
    groups = x.float().reshape(M, K // QUANT_BLOCK, QUANT_BLOCK)
    scale = groups.abs().amax(dim=-1).clamp(min=1e-12) / FP8_MAX  # (M, K/128)
    A = (groups / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).reshape(M, K).to(torch.float8_e4m3fn)
    stride = M if scale_row_stride is None else scale_row_stride
    storage = torch.zeros(K // QUANT_BLOCK, stride, dtype=torch.float32, device=x.device)
    A_scale_t = storage[:, :M]
    A_scale_t.copy_(scale.t())
    return A, A_scale_t


def quantize_weight_blockwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> B (N, K) e4m3 and ``B_scale`` (ceil(N/128), K/128), one scale per 128x128 block."""
    N, K = w.shape
    n_blocks = -(-N // QUANT_BLOCK)
    padded = torch.zeros(n_blocks * QUANT_BLOCK, K, dtype=torch.float32, device=w.device)
    padded[:N] = w.float()
    blocks = padded.reshape(n_blocks, QUANT_BLOCK, K // QUANT_BLOCK, QUANT_BLOCK)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX  # (N/128, K/128)
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).reshape(n_blocks * QUANT_BLOCK, K)
    return q[:N].to(torch.float8_e4m3fn).contiguous(), scale.contiguous()


# ---------------------------------------------------------------------------------------------
# Triton kernel (sm90: TMA loads and stores, wgmma)
# ---------------------------------------------------------------------------------------------


def _block_fp8_mm_kernel_body(
    a_desc,  # (M, K) e4m3, block [BLOCK_M, 128]
    b_desc,  # (N, K) e4m3, block [BLOCK_N, 128]
    a_scale_desc,  # (K/128, M) fp32, block [1, BLOCK_M]: needs 16-byte aligned rows
    b_scale_ptr,  # (ceil(N/128), K/128) fp32
    c_desc,  # SPLIT_K == 1: (M, N) bf16/fp16, block [BLOCK_M, BLOCK_N]; else (SPLIT_K, M, N) fp32, block [1, ...]
    M,
    N,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    # BLOCK_K is the scale group, so each K step multiplies one partial product by one scale pair.
    BLOCK_K: tl.constexpr = 128
    tl.static_assert(BLOCK_K % BLOCK_N == 0, "a BLOCK_N tile must lie inside one 128-wide weight block")
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped tile order: GROUP_M row tiles sweep the N tiles together, so the B tiles stay in L2.
    tiles_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // tiles_per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % tiles_per_group) % group_rows
    pid_n = (pid % tiles_per_group) // group_rows
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N

    k_groups = K // BLOCK_K
    groups_per_split = tl.cdiv(k_groups, SPLIT_K)
    first_group = pid_k * groups_per_split
    last_group = tl.minimum(first_group + groups_per_split, k_groups)
    b_scale_row = b_scale_ptr + (off_n // BLOCK_K) * k_groups
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(first_group, last_group):
        a = a_desc.load([off_m, g * BLOCK_K])
        b = b_desc.load([off_n, g * BLOCK_K])
        a_scale = tl.reshape(a_scale_desc.load([g, off_m]), (BLOCK_M, 1))
        b_scale = tl.load(b_scale_row + g)
        # A fresh product per group: the fp8 MMA accumulates 128 products at most before it is
        # promoted to the fp32 accumulator with its scales.
        partial = tl.dot(a, tl.trans(b))
        acc += partial * (a_scale * b_scale)
    if SPLIT_K == 1:
        c_desc.store([off_m, off_n], acc.to(c_desc.dtype))
    else:
        c_desc.store([pid_k, off_m, off_n], tl.reshape(acc, (1, BLOCK_M, BLOCK_N)))


def _sum_splits_kernel_body(partials_ptr, out_ptr, numel, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """out = sum of the SPLIT_K fp32 partial results, in split order (deterministic), cast once."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in tl.static_range(SPLIT_K):
        acc += tl.load(partials_ptr + split * numel + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# M changes with every batch; specializing on it (M == 1, M % 16) would only multiply compiles.
_block_fp8_mm_kernel = (
    triton.jit(do_not_specialize=["M"])(_block_fp8_mm_kernel_body) if HAS_TRITON else _block_fp8_mm_kernel_body
)
_sum_splits_kernel = triton.jit(do_not_specialize=["numel"])(_sum_splits_kernel_body) if HAS_TRITON else _sum_splits_kernel_body


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# What the interpreter pretends to run on (H100 SXM), so CPU tests exercise the GPU's tile choices.
_INTERPRETER_SMS = 132


@functools.cache
def _tensor_descriptor_cls():
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor


def launch_config(M: int, N: int, K: int, num_sms: int) -> dict[str, int]:
    """Tile sizes, split-K, warps and stages for one problem (no autotuning: deterministic, compile-once).

    BLOCK_M 64 for decode-sized M (the smallest wgmma M); BLOCK_N drops to 64 when 128-wide tiles
    would leave SMs idle; if even then fewer than half the SMs get a tile, K is split (into at least
    4 groups of 128 per split) and the fp32 partials are summed in a second, small kernel. 8 warps
    keep a 128x128 fp32 accumulator plus its per-group partial in registers.
    """
    block_m = 64 if M <= 64 else 128
    block_n = 128
    if -(-M // block_m) * -(-N // block_n) < num_sms:
        block_n = 64
    tiles = -(-M // block_m) * -(-N // block_n)
    split_k = 1
    if 2 * tiles <= num_sms:
        limit = min(8, num_sms // tiles, K // QUANT_BLOCK // 4)
        while split_k * 2 <= limit:
            split_k *= 2
    num_warps = 8 if block_m * block_n >= 128 * 128 else 4
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "GROUP_M": 8, "SPLIT_K": split_k, "num_warps": num_warps,
            "num_stages": 4}


def launch_block_fp8_mm(
    A: torch.Tensor,
    B: torch.Tensor,
    A_scale_t: torch.Tensor,
    B_scale: torch.Tensor,
    out: torch.Tensor,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """Run the Triton kernel into ``out`` (M, N); inputs already validated. ``config`` overrides the tiles."""
    require_triton("block_fp8_mm")
    M, K = A.shape
    N = B.shape[0]
    if M == 0:
        return out
    if config is None:
        sms = _INTERPRETER_SMS if interpreting() and A.device.type == "cpu" else _num_sms(A.device.index or 0)
        config = launch_config(M, N, K, sms)
    block_m, block_n, split_k = config["BLOCK_M"], config["BLOCK_N"], config["SPLIT_K"]
    TensorDescriptor = _tensor_descriptor_cls()
    a_desc = TensorDescriptor(A, [M, K], [K, 1], [block_m, QUANT_BLOCK])
    b_desc = TensorDescriptor(B, [N, K], [K, 1], [block_n, QUANT_BLOCK])
    # Shape (K/128, M) with the caller's row stride: TMA zero-fills beyond M and needs that stride aligned.
    a_scale_desc = TensorDescriptor(A_scale_t, [K // QUANT_BLOCK, M], [A_scale_t.stride(0), 1], [1, block_m])
    if split_k == 1:
        c_desc = TensorDescriptor(out, [M, N], [N, 1], [block_m, block_n])
    else:
        partials = torch.empty((split_k, M, N), dtype=torch.float32, device=A.device)
        c_desc = TensorDescriptor(partials, [split_k, M, N], [M * N, N, 1], [1, block_m, block_n])
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n), split_k)
    _block_fp8_mm_kernel[grid](
        a_desc,
        b_desc,
        a_scale_desc,
        B_scale,
        c_desc,
        M,
        N,
        K,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        GROUP_M=config["GROUP_M"],
        SPLIT_K=split_k,
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    if split_k > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(M * N, block),)](partials, out, M * N, SPLIT_K=split_k, BLOCK=block)
    return out


# ---------------------------------------------------------------------------------------------
# ops
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op(op_name("block_fp8_mm"), mutates_args=(), device_types="cuda")
def block_fp8_mm(
    A: torch.Tensor, B: torch.Tensor, A_scale_t: torch.Tensor, B_scale: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """Fast path: A (M, K) @ B (N, K).T with block scales; the rows of ``A_scale_t`` must be 16-byte aligned."""
    _check_operands("block_fp8_mm", A, B, A_scale_t, B_scale, out_dtype)
    _check_aligned_scale_rows("block_fp8_mm", A_scale_t)
    out = torch.empty((A.shape[0], B.shape[0]), dtype=out_dtype, device=A.device)
    return launch_block_fp8_mm(A, B, A_scale_t, B_scale, out)


@block_fp8_mm.register_kernel("cpu")
def _block_fp8_mm_cpu(A, B, A_scale_t, B_scale, out_dtype):
    _check_operands("block_fp8_mm", A, B, A_scale_t, B_scale, out_dtype)
    _check_aligned_scale_rows("block_fp8_mm", A_scale_t)
    return reference_block_fp8_mm(A, B, A_scale_t, B_scale, out_dtype)


@block_fp8_mm.register_fake
def _block_fp8_mm_fake(A, B, A_scale_t, B_scale, out_dtype):
    _check_fake_shapes(A, A_scale_t)
    return A.new_empty((A.shape[0], B.shape[0]), dtype=out_dtype)


def _pad_m(A: torch.Tensor, A_scale_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero rows appended to A and zero columns to its scales, up to the next multiple of ALIGN_M."""
    pad = (-A.shape[0]) % ALIGN_M
    return F.pad(A, (0, 0, 0, pad)), F.pad(A_scale_t, (0, pad))


def _block_fp8_mm_padded_impl(A, B, A_scale_t, B_scale, out_dtype):
    _check_operands("block_fp8_mm_padded", A, B, A_scale_t, B_scale, out_dtype)
    A_padded, A_scale_t_padded = _pad_m(A, A_scale_t)
    # A prefix of rows of a contiguous tensor is itself contiguous: the slice costs nothing.
    return torch.ops.fusionpasses.block_fp8_mm(A_padded, B, A_scale_t_padded, B_scale, out_dtype)[: A.shape[0]]


@torch.library.custom_op(op_name("block_fp8_mm_padded"), mutates_args=(), device_types="cuda")
def block_fp8_mm_padded(
    A: torch.Tensor, B: torch.Tensor, A_scale_t: torch.Tensor, B_scale: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """Any M: copies A and its scales padded to a multiple of ALIGN_M rows, runs the fast path, drops the pad."""
    return _block_fp8_mm_padded_impl(A, B, A_scale_t, B_scale, out_dtype)


block_fp8_mm_padded.register_kernel("cpu")(_block_fp8_mm_padded_impl)


@block_fp8_mm_padded.register_fake
def _block_fp8_mm_padded_fake(A, B, A_scale_t, B_scale, out_dtype):
    _check_fake_shapes(A, A_scale_t)
    return A.new_empty((A.shape[0], B.shape[0]), dtype=out_dtype)


def block_fp8_mm_any_m(
    A: torch.Tensor,
    B: torch.Tensor,
    A_scale_t: torch.Tensor,
    B_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Block-scaled FP8 GEMM for any M that pads only when M is unaligned.

    Eager: a Python ``if``. Under torch.compile::

        torch.cond(M % ALIGN_M != 0, block_fp8_mm_padded, block_fp8_mm, (A, B, A_scale_t, B_scale))

    so one compiled graph serves every M when M is dynamic (``dynamic=True`` or ``mark_dynamic``;
    ``mark_unbacked`` also covers M in {0, 1}, which Dynamo otherwise specializes). With a static M
    the predicate is a constant and Dynamo keeps one branch (and warns that it did). The padded
    branch is one opaque op, so the cond_padding pass finds nothing to rewrite inside it.
    """

    def padded(A: torch.Tensor, B: torch.Tensor, A_scale_t: torch.Tensor, B_scale: torch.Tensor) -> torch.Tensor:
        return torch.ops.fusionpasses.block_fp8_mm_padded(A, B, A_scale_t, B_scale, out_dtype)

    def direct(A: torch.Tensor, B: torch.Tensor, A_scale_t: torch.Tensor, B_scale: torch.Tensor) -> torch.Tensor:
        return torch.ops.fusionpasses.block_fp8_mm(A, B, A_scale_t, B_scale, out_dtype)

    unaligned = A.shape[0] % ALIGN_M != 0
    if torch.compiler.is_compiling():
        return torch.cond(unaligned, padded, direct, (A, B, A_scale_t, B_scale))
    return padded(A, B, A_scale_t, B_scale) if unaligned else direct(A, B, A_scale_t, B_scale)


# ---------------------------------------------------------------------------------------------
# opcheck samples
# ---------------------------------------------------------------------------------------------


def _sample_operands(M: int, N: int, K: int, scale_row_stride: int | None = None) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g)
    A, A_scale_t = quantize_activation_blockwise(x, scale_row_stride)
    B, B_scale = quantize_weight_blockwise(w)
    return A, B, A_scale_t, B_scale


@opcheck_samples(block_fp8_mm)
def _block_fp8_mm_samples() -> Iterator[OpSample]:
    for M, N, K, stride in ((4, 16, 128, None), (8, 136, 256, None), (3, 32, 128, 4)):
        A, B, A_scale_t, B_scale = _sample_operands(M, N, K, stride)
        for dt in HALF_DTYPES:
            yield OpSample((A, B, A_scale_t, B_scale, dt), {}, name=f"M{M}N{N}K{K}-stride{stride}->{dt}")


@opcheck_samples(block_fp8_mm_padded)
def _block_fp8_mm_padded_samples() -> Iterator[OpSample]:
    for M, N, K in ((1, 16, 128), (5, 24, 256), (8, 16, 128)):
        A, B, A_scale_t, B_scale = _sample_operands(M, N, K)
        yield OpSample((A, B, A_scale_t, B_scale, torch.bfloat16), {}, name=f"M{M}N{N}K{K}")
