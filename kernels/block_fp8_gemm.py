"""Block-scaled FP8 GEMM (DeepSeek-V3 style) for Hopper, and the padding around its M alignment.

    out[m, n] = sum over K groups g of  (A[m, g] . B[n, g]) * A_scale_t[g, m] * B_scale[n // 128, g]

where a K group is 128 consecutive K values. Layouts:
    A          (M, K) float8_e4m3fn, row-major: activations, one scale per 1x128 group
    B          (N, K) float8_e4m3fn, row-major: the weight as nn.Linear stores it
    A_scale_t  (K/128, M) float32, M-major: ``A_scale_t[g, m]`` dequantizes ``A[m, 128g:128g+128]``
    B_scale    (ceil(N/128), K/128) float32, row-major: one scale per 128x128 weight block
    out        (M, N) bfloat16 (or float16)

Why the fast path requires M % 4 == 0: its contract is the scale layout of SM90 block-scaled GEMMs
(CUTLASS, DeepGEMM), which read a tile's BLOCK_M activation scales of one K group as one TMA box of
the M-major scale tensor. TMA requires every global stride except the innermost to be a multiple of
16 bytes; the row stride of ``A_scale_t`` is M float32 values, so M must be a multiple of 4
(``ALIGN_M``). Our kernel has that TMA-box variant (``SCALE_TMA``), but on H200 with Triton 3.6 the
variant that reads the scales with plain loads one K group ahead (``SCALE_PTR``, the default) is
1.5x faster, because Triton does not software-pipeline a TMA load that feeds no dot; that variant
would itself accept unaligned scale rows. The op keeps the contract, so that scale tensors are
interchangeable with those kernels and any variant can run. A scale buffer whose rows are padded
(row stride a multiple of 4, e.g. ``buf[:, :M]`` of a (K/128, 4k) buffer) satisfies it for any M.

Three entry points:
- ``fusionpasses.block_fp8_mm``: the fast path; rejects unaligned scale rows.
- ``fusionpasses.block_fp8_mm_padded``: pads M up to ``ALIGN_M`` (always, copying A and its scales),
  runs the fast path and drops the padded rows. What callers used to do for every M.
- :func:`block_fp8_mm_any_m`: pads only when M is unaligned. In eager mode that is an ``if``; under
  torch.compile it is ``torch.cond(M % 4 != 0, padded, direct)``, so with a dynamic M one graph
  serves every M. It is a function rather than a custom op on purpose: a custom op is opaque to
  Dynamo, so a ``torch.cond`` inside one would never be traced.

The kernel: one K group (128) per step, its fp8 wgmma product scaled and added to an fp32
accumulator (the promotion DeepSeek-V3 describes); TMA loads for A and B and a TMA store of the
output; K split across CTAs (fp32 partials summed in split order) when the tile
grid would leave most SMs idle, as it does at decode-sized M. Compile-time variants (how the
activation scales are loaded, 256-wide tiles, warp specialization) are picked per M by
``LAUNCH_RULES``, which ``scripts/bench_block_fp8.py --sweep`` measures.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON, jit, require_triton, tl, triton
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
    sm_count,
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


# How the activation scales of a K group reach the accumulator's rows (the SCALE_LOAD constexpr).
# Measured in the sm90 TTGIR (Triton 3.9): a TMA load outside the dot's operands is not software-
# pipelined, so each one issues, waits on its barrier and only then lets the MMA start.
# (One [8, BLOCK_M] box per 8 groups, with each group selecting its row in registers, measured 0.18x
# of cuBLAS: the selection costs more than the wait it saves.)
SCALE_TMA = 0
"""One [1, BLOCK_M] TMA box per K group: a full global round trip before every MMA."""
SCALE_PTR = 1
"""Plain loads straight into the accumulator's row layout, issued one group ahead so their latency
hides behind the MMA. Reads no TMA box, so by itself it would not need M % 4 (see ALIGN_M)."""
SCALE_LOADS = {"tma": SCALE_TMA, "ptr": SCALE_PTR}
# The same value as a Triton constexpr: a jitted function may only read globals that are constexprs.
_SCALE_PTR = tl.constexpr(SCALE_PTR) if HAS_TRITON else SCALE_PTR


@jit
def _weight_scale(b_scale_ptr, g, valid, off_n, offs_n, N, k_groups, BLOCK_N: tl.constexpr):
    """Weight scale(s) of K group g for this tile: a scalar when the tile lies in one 128-row weight
    block, else one per column (a 256-wide tile spans two blocks). 0 where ``valid`` is false."""
    if BLOCK_N <= 128:
        return tl.load(b_scale_ptr + (off_n // 128) * k_groups + g, mask=valid, other=0.0)
    else:
        cols = tl.load(b_scale_ptr + (offs_n // 128) * k_groups + g, mask=offs_n < tl.where(valid, N, 0), other=0.0)
        return cols[None, :]


def _block_fp8_mm_kernel_body(
    a_desc,  # (M, K) e4m3, block [BLOCK_M, 128]
    b_desc,  # (N, K) e4m3, block [BLOCK_N, 128]
    a_scale_desc,  # (K/128, M) fp32, block [1, BLOCK_M]: needs 16-byte aligned rows
    a_scale_ptr,  # the same scales as a pointer, row stride ``a_scale_row_stride`` (SCALE_PTR)
    a_scale_row_stride,
    b_scale_ptr,  # (ceil(N/128), K/128) fp32
    c_desc,  # SPLIT_K == 1: (M, N) bf16/fp16, block [BLOCK_M, BLOCK_N]; else (SPLIT_K, M, N) fp32, block [1, ...]
    M,
    N,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
    SCALE_LOAD: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):
    # BLOCK_K is the scale group, so each K step multiplies one partial product by one scale pair.
    BLOCK_K: tl.constexpr = 128
    tl.static_assert(BLOCK_N <= BLOCK_K or BLOCK_N % BLOCK_K == 0, "a tile must not straddle a weight block edge")
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
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_n = off_n + tl.arange(0, BLOCK_N)

    k_groups = K // BLOCK_K
    groups_per_split = tl.cdiv(k_groups, SPLIT_K)
    first_group = pid_k * groups_per_split
    last_group = tl.minimum(first_group + groups_per_split, k_groups)
    # Scales are loaded one group ahead (carried in registers) so no load latency sits before an MMA.
    b_scale = _weight_scale(b_scale_ptr, first_group, first_group < last_group, off_n, offs_n, N, k_groups, BLOCK_N)
    if SCALE_LOAD == _SCALE_PTR:
        next_a_scale = tl.load(a_scale_ptr + first_group * a_scale_row_stride + offs_m,
                               mask=offs_m < tl.where(first_group < last_group, M, 0), other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in tl.range(first_group, last_group, warp_specialize=WARP_SPECIALIZE):
        a = a_desc.load([off_m, g * BLOCK_K])
        b = b_desc.load([off_n, g * BLOCK_K])
        if SCALE_LOAD == _SCALE_PTR:
            a_scale = next_a_scale[:, None]
            next_a_scale = tl.load(a_scale_ptr + (g + 1) * a_scale_row_stride + offs_m,
                                   mask=offs_m < tl.where(g + 1 < last_group, M, 0), other=0.0)
        else:
            a_scale = tl.reshape(a_scale_desc.load([g, off_m]), (BLOCK_M, 1))
        group_b_scale = b_scale
        b_scale = _weight_scale(b_scale_ptr, g + 1, g + 1 < last_group, off_n, offs_n, N, k_groups, BLOCK_N)
        # A fresh product per group: the fp8 MMA accumulates 128 products at most before it is
        # promoted to the fp32 accumulator with its scales.
        partial = tl.dot(a, tl.trans(b))
        acc += partial * (a_scale * group_b_scale)
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


# M (and the scale row stride, usually M) changes with every batch; specializing on it
# (M == 1, M % 16) would only multiply compiles.
_block_fp8_mm_kernel = (
    triton.jit(do_not_specialize=["M", "a_scale_row_stride"])(_block_fp8_mm_kernel_body) if HAS_TRITON else _block_fp8_mm_kernel_body
)
_sum_splits_kernel = triton.jit(do_not_specialize=["numel"])(_sum_splits_kernel_body) if HAS_TRITON else _sum_splits_kernel_body


# What the interpreter pretends to run on (H100 SXM), so CPU tests exercise the GPU's tile choices.
_INTERPRETER_SMS = 132


@functools.cache
def _tensor_descriptor_cls():
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor


@dataclass(frozen=True)
class TileRule:
    """The launch parameters for every M up to ``max_m`` (the first matching rule wins)."""

    max_m: int
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int
    GROUP_M: int = 8
    SCALE_LOAD: int = SCALE_PTR
    WARP_SPECIALIZE: bool = False


# From ``scripts/bench_block_fp8.py --sweep`` on H200 (Triton 3.6, 2026-11-22): the scales read with
# plain loads one group ahead beat both TMA variants at every M of the grid (geometric mean 0.65x of
# tensor-wise cuBLAS vs 0.43x per-group TMA and 0.18x chunked TMA), and Triton's warp specialization
# helps from about 1024 rows. BLOCK_M 64 for decode-sized M (the smallest wgmma M); 8 warps keep a
# 128x128 fp32 accumulator plus its per-group partial in registers.
LAUNCH_RULES: tuple[TileRule, ...] = (
    TileRule(max_m=64, BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=4),
    TileRule(max_m=512, BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=4),
    TileRule(max_m=2**62, BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=4, WARP_SPECIALIZE=True),
)

SPLIT_K_MIN_GROUPS = 4
"""Fewest K groups of 128 a split may get: fewer and the partial sums cost more than they save."""

SPLIT_K_MAX = 8


WAVE_EFFICIENCY_MARGIN = 1.05
"""BLOCK_N drops to 64 when that raises the wave efficiency by more than this factor (2x the tiles
cost some A re-reads and smaller MMAs). At M = 128, K x N = 7168 x 18432 on H200: 144 tiles of 128 x 128
fill 55% of two waves on 132 SMs, 288 of 128 x 64 fill 73% of three: 72.9 -> 65.3 us."""


def _wave_efficiency(tiles: int, num_sms: int) -> float:
    """Busy fraction of the SMs over the waves of equal tiles (one tile per SM at a time)."""
    return tiles / (-(-tiles // num_sms) * num_sms)


def _split_k(M: int, N: int, K: int, num_sms: int, block_m: int, block_n: int) -> int:
    """Splits K (powers of two) while fewer than half the SMs would get a tile, none left empty."""
    tiles = -(-M // block_m) * -(-N // block_n)
    k_groups = K // QUANT_BLOCK
    split_k = 1
    if 2 * tiles <= num_sms:
        limit = min(SPLIT_K_MAX, num_sms // tiles, k_groups // SPLIT_K_MIN_GROUPS)
        while split_k * 2 <= limit:
            split_k *= 2
    return split_k


def launch_config(M: int, N: int, K: int, num_sms: int, **overrides: int) -> dict[str, int]:
    """Tile sizes, split-K, warps, stages and scale loading for one problem (no autotuning:
    deterministic, compile-once).

    The first rule of ``LAUNCH_RULES`` with ``M <= max_m`` gives the tiles; BLOCK_N then drops to 64
    when that keeps the SMs busier over the waves of tiles (``_wave_efficiency``); if even then fewer
    than half the SMs get a tile, K is split
    and the fp32 partials are summed in a second, small kernel. ``overrides`` replace any key; tile
    overrides apply before split-K is chosen (the sweep uses this), SPLIT_K overrides it.
    """
    rule = next(r for r in LAUNCH_RULES if M <= r.max_m)
    config = {k: v for k, v in asdict(rule).items() if k != "max_m"}
    tile_overridden = "BLOCK_N" in overrides
    config.update({k: v for k, v in overrides.items() if k != "SPLIT_K"})
    if not tile_overridden:
        tiles = {bn: -(-M // config["BLOCK_M"]) * -(-N // bn) for bn in (config["BLOCK_N"], 64)}
        if _wave_efficiency(tiles[64], num_sms) > WAVE_EFFICIENCY_MARGIN * _wave_efficiency(tiles[config["BLOCK_N"]], num_sms):
            config["BLOCK_N"] = 64
    config["SPLIT_K"] = overrides.get("SPLIT_K", _split_k(M, N, K, num_sms, config["BLOCK_M"], config["BLOCK_N"]))
    return config


def _check_config(config: dict[str, int], K: int) -> None:
    block_n, split_k = config["BLOCK_N"], config["SPLIT_K"]
    k_groups = K // QUANT_BLOCK
    if block_n not in (16, 32, 64, 128, 256) or config["BLOCK_M"] not in (64, 128):
        raise ValueError(f"block_fp8_mm: unsupported tile {config['BLOCK_M']}x{block_n}")
    if config["SCALE_LOAD"] not in SCALE_LOADS.values():
        raise ValueError(f"block_fp8_mm: unknown SCALE_LOAD {config['SCALE_LOAD']}")
    # An empty split would still store its (zero) partial, but it means the split count is wasted.
    if split_k < 1 or (split_k - 1) * -(-k_groups // split_k) >= k_groups:
        raise ValueError(f"block_fp8_mm: SPLIT_K={split_k} leaves a split without K groups (K/128 = {k_groups})")


def launch_block_fp8_mm(
    A: torch.Tensor,
    B: torch.Tensor,
    A_scale_t: torch.Tensor,
    B_scale: torch.Tensor,
    out: torch.Tensor,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """Run the Triton kernel into ``out`` (M, N); inputs already validated. ``config`` overrides the tiles
    (a full dict as ``launch_config`` returns)."""
    require_triton("block_fp8_mm")
    M, K = A.shape
    N = B.shape[0]
    if M == 0:
        return out
    if config is None:
        sms = sm_count(A.device, interpreted=_INTERPRETER_SMS)
        config = launch_config(M, N, K, sms)
    _check_config(config, K)
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
        A_scale_t,
        A_scale_t.stride(0),
        B_scale,
        c_desc,
        M,
        N,
        K,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        GROUP_M=config["GROUP_M"],
        SPLIT_K=split_k,
        SCALE_LOAD=config["SCALE_LOAD"],
        WARP_SPECIALIZE=bool(config["WARP_SPECIALIZE"]),
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
