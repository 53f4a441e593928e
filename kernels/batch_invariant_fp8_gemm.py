"""Batch-invariant FP8 GEMM: ``torch.ops.fusionpasses.batch_invariant_fp8_gemm``.

Row ``m`` of the result depends only on row ``m`` of ``A`` (and its scale), never on how many other
rows share the call. cuBLAS cannot promise that: it picks its tile shape, split-K factor and stream-K
schedule from M, and each choice sums the K products of a row in a different order. This kernel
fixes everything that decides the arithmetic of a row from (N, K) alone:

- one tile configuration per (N, K) (:func:`tile_config`), never a function of M: the M tile, and
  so the ``tl.dot`` instruction shape, is the same for every batch size of a given weight;
- one reduction order over K: a single program walks the K tiles in order, no split-K, no stream-K;
- M is not a specialization key of the compiled kernel (``do_not_specialize``), so every M runs the
  same binary; rows past M in the last M tile (TMA's zero fill, or the next batch's rows) are
  computed alongside and dropped at the store;
- no FMA contraction in the epilogue, so scaling and bias round the same way in every variant.

What :class:`TileConfig` may vary beyond the tile shape changes only which program computes a tile,
when, and how its result reaches memory: a persistent grid (one program per SM looping over tiles,
so the assignment of tiles to programs follows M), Triton's warp specialization (loads and wgmma in
different warps), and a TMA-store epilogue. Each tile is still the same wgmma sequence over the same
K order followed by the same epilogue operations, so a row's bits do not depend on M in any variant.

The tensor cores' reduced-precision FP8 accumulator is promoted into fp32 once per 128 K values,
the accuracy of cuBLAS without fast accumulation; ``use_fast_accum=True`` skips the promotion, as
``torch._scaled_mm``'s flag of the same name does (faster, less accurate over long K, equally
batch-invariant).

Layouts and scales (the ``torch._scaled_mm`` conventions, plus a batch dimension for ``bmm_fp8``)::

    A        (M, K) or (b, M, K)   float8_e4m3fn, row-major
    B        (K, N) or (b, K, N)   float8_e4m3fn, column-major: ``W.t()`` of a contiguous (N, K) weight
    A_scale  float32: one element (per tensor) or (M, 1) / (b, M, 1) (per token)
    B_scale  float32: one element (per tensor) or (1, N) / (b, 1, N) (per output channel)
    bias     optional (N,), bfloat16 / float16 / float32, added after scaling
    out      (M, N) or (b, M, N), bfloat16 or float16

    out = ((A.float() @ B.float()) * (A_scale * B_scale) + bias).to(out_dtype)

(the reference computes this in fp32, which fast accumulation approximates less closely).

K and N must be multiples of 16 (the TMA row pitch and ``torch._scaled_mm``'s own rule).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from ._triton import HAS_TRITON, jit, require_triton, tl, triton
from .library import (
    HALF_DTYPES,
    OpSample,
    check,
    check_divisible,
    check_dtype,
    check_same_device,
    op_name,
    opcheck_samples,
    sm_count,
)

OP = "batch_invariant_fp8_gemm"
BIAS_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# One Hopper wgmma is 64 rows tall: M tiles are 64 (one warpgroup) or 128 (two warpgroups stacked
# along M, each issuing the same 64-row instructions).
WGMMA_M = 64


@dataclass(frozen=True)
class TileConfig:
    """The compile-time shape of the kernel. Everything in it may depend on (N, K), nothing on M.

    The structural flags change how tiles are scheduled and stored, never the arithmetic of a tile:
    every output tile is still one program's walk over the same K tiles with the same ``tl.dot``
    shape, and the same epilogue operations, so a flag may be chosen for speed alone.
    """

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    # One program per SM looping over output tiles (in the grouped order) instead of one per tile:
    # the next tile's loads overlap this tile's epilogue, and no launch waves are left half empty.
    persistent: bool = False
    # Triton's automatic warp specialization (3.5+): producer warps issue the TMA loads, consumer
    # warpgroups the wgmma. On the tile loop of a persistent kernel, else on the K loop.
    warp_specialize: bool = False
    # The output tile goes out through a TMA store (staged in shared memory) instead of a masked
    # ``tl.store`` from registers; TMA clips the rows past M and columns past N.
    tma_store: bool = False
    # TMA-stored output in this many column slices, each staged and stored in turn: less shared
    # memory for the epilogue (left to the pipeline), and the first store starts earlier.
    epilogue_subtiles: int = 1

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (tl.dot and tl.arange), got {value}")
        if self.block_m not in (WGMMA_M, 2 * WGMMA_M):
            raise ValueError(f"block_m must be {WGMMA_M} or {2 * WGMMA_M} (whole warpgroups), got {self.block_m}")
        if self.num_warps not in (4, 8) or self.num_warps < 4 * self.block_m // WGMMA_M:
            raise ValueError(f"num_warps must be 4 or 8, with a warpgroup (4 warps) per 64 rows: {self}")
        if self.group_m < 1 or self.num_stages < 1:
            raise ValueError(f"group_m and num_stages must be positive: {self}")
        if self.epilogue_subtiles not in (1, 2) or self.block_n // self.epilogue_subtiles < 16:
            raise ValueError(f"epilogue_subtiles must be 1 or 2, leaving slices >= 16 columns wide: {self}")
        if self.epilogue_subtiles > 1 and not self.tma_store:
            raise ValueError(f"epilogue_subtiles > 1 slices the TMA store: it needs tma_store=True: {self}")

    def accumulator_regs_per_thread(self) -> int:
        """fp32 accumulator registers per thread (warpgroups stack along M first, then along N)."""
        return self.block_m * self.block_n // (32 * self.num_warps)

    def smem_bytes(self, out_bytes: int = 2) -> int:
        """Pipeline buffers (an A and a B tile of fp8 per stage), plus the TMA store's staging slice."""
        staging = self.block_m * self.block_n // self.epilogue_subtiles * out_bytes if self.tma_store else 0
        return (self.block_m + self.block_n) * self.block_k * self.num_stages + staging


@dataclass(frozen=True)
class TileRule:
    """``config`` serves every weight with N >= min_n and K >= min_k (the first matching rule wins);
    its ``num_stages`` is an upper bound, cut to the number of K tiles (at least 2)."""

    min_n: int
    min_k: int
    config: TileConfig


# Set from ``scripts/bench_batch_invariant.py --sweep`` (one H200): edit the rows, most specific first.
# From ``scripts/bench_batch_invariant.py --sweep`` on H200 (Triton 3.6, 2026-11-22); ratios to cuBLAS
# ``_scaled_mm`` at M = 1 ... 16384 in docs/benchmarks.md.
TILE_RULES: tuple[TileRule, ...] = (
    # Wide layers have N tiles to spare: 128x128 tiles (two warpgroups along M) halve the loads per
    # FLOP of 64x128. Persistent with a warp-specialized loader and a TMA-store epilogue measured
    # best at (4096, 14336): it overlaps each tile's epilogue with the next tile's loads.
    TileRule(8192, 0, TileConfig(128, 128, 128, group_m=8, num_warps=8, num_stages=4,
                                 persistent=True, warp_specialize=True, tma_store=True)),
    # Everything narrower: 64x128 (96 KiB of pipeline buffers, two programs per SM, one computing
    # while the other promotes). For N = 2048 it beats 64x64 from 1024 rows (0.66-0.77x vs
    # 0.49-0.55x of cuBLAS) and stays >= 0.97x below 256 rows.
    TileRule(0, 0, TileConfig(64, 128, 128, group_m=8, num_warps=4, num_stages=4)),
)


def tile_config(N: int, K: int) -> TileConfig:
    """The one configuration for an (N, K) weight, from :data:`TILE_RULES`. Deliberately not a
    function of M.

    Without split-K, a fixed tile must serve every batch size: wide tiles reuse each loaded tile
    more (large M is L2-bandwidth bound with 64x128 tiles), narrow ones give more programs to stream
    the weight at small M and to fill 132 SMs at a few hundred tokens. The K tile is 128: the FP8
    accumulator is promoted to fp32 once per K tile, as cuBLAS does without fast accumulation, and
    each warpgroup holds at most 64x128 fp32 values twice (accumulator and promotion buffer).
    ``scripts/bench_batch_invariant.py --sweep`` measures the alternatives per (N, K).
    """
    rule = next(r for r in TILE_RULES if N >= r.min_n and K >= r.min_k)
    k_tiles = -(-K // rule.config.block_k)
    return replace(rule.config, num_stages=min(rule.config.num_stages, max(2, k_tiles)))


# ---------------------------------------------------------------------------------------------
# validation and reference
# ---------------------------------------------------------------------------------------------


def _scale_kind(scale: torch.Tensor, per_slice_shape: tuple[int, ...], arg: str, what: str) -> bool:
    """True for a per-row/per-column scale, False for a tensor-wise one; raises on any other shape."""
    check(scale.dtype == torch.float32, OP, f"{arg} must be float32, got {scale.dtype}")
    if tuple(scale.shape) == per_slice_shape:
        return True
    check(
        scale.numel() == 1,
        OP,
        f"{arg} must have one element (per tensor) or shape {per_slice_shape} ({what}), got {tuple(scale.shape)}",
    )
    return False


def _validate(
    A: torch.Tensor,
    B: torch.Tensor,
    A_scale: torch.Tensor,
    B_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> tuple[bool, bool]:
    """Checks every argument; returns (A_scale is per token, B_scale is per output channel)."""
    check(A.dim() in (2, 3), OP, f"A must be 2-D (M, K) or 3-D (b, M, K), got shape {tuple(A.shape)}")
    check(B.dim() == A.dim(), OP, f"B must have A's rank ({A.dim()}), got shape {tuple(B.shape)}")
    check_dtype(A, OP, "A", (torch.float8_e4m3fn,))
    check_dtype(B, OP, "B", (torch.float8_e4m3fn,))
    batch = tuple(A.shape[:-2])
    check(tuple(B.shape[:-2]) == batch, OP, f"batch sizes differ: A {tuple(A.shape)}, B {tuple(B.shape)}")
    M, K = A.shape[-2], A.shape[-1]
    N = B.shape[-1]
    check(B.shape[-2] == K, OP, f"K differs: A {tuple(A.shape)}, B {tuple(B.shape)}")
    check(K > 0 and N > 0, OP, f"K and N must be positive, got K={K}, N={N}")
    check_divisible(K, 16, OP, "K")
    check_divisible(N, 16, OP, "N")
    check(
        A.stride(-1) == 1 and (M <= 1 or A.stride(-2) == K),
        OP,
        f"A must be row-major with dense rows, got shape {tuple(A.shape)} and strides {A.stride()}",
    )
    check(
        B.stride(-2) == 1 and B.stride(-1) == K,
        OP,
        f"B must be column-major (the .t() of a contiguous (N, K) weight), got shape {tuple(B.shape)} "
        f"and strides {B.stride()}",
    )
    a_per_row = _scale_kind(A_scale, (*batch, M, 1), "A_scale", "per token")
    b_per_col = _scale_kind(B_scale, (*batch, 1, N), "B_scale", "per output channel")
    if bias is not None:
        check(tuple(bias.shape) == (N,), OP, f"bias must have shape ({N},), got {tuple(bias.shape)}")
        check_dtype(bias, OP, "bias", BIAS_DTYPES)
    check(out_dtype in HALF_DTYPES, OP, f"out_dtype must be bfloat16 or float16, got {out_dtype}")
    check_same_device(OP, A=A, B=B, A_scale=A_scale, B_scale=B_scale, bias=bias)
    return a_per_row, b_per_col


def reference_batch_invariant_fp8_gemm(
    A: torch.Tensor,
    B: torch.Tensor,
    A_scale: torch.Tensor,
    B_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The definition: fp32 product of the fp8 values, times both scales, plus bias, cast once.

    The scale product is formed first and applied with one multiply, in the kernel's order, so that
    wherever the fp32 sums agree (small integer-valued inputs) the two agree bit for bit.
    """
    acc = torch.matmul(A.float(), B.float())
    # A one-element scale may come as (), (1,) or (1, 1): as a scalar it broadcasts to any rank.
    a_scale = A_scale.reshape(()) if A_scale.numel() == 1 else A_scale
    b_scale = B_scale.reshape(()) if B_scale.numel() == 1 else B_scale
    out = acc * (a_scale.float() * b_scale.float())
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernels and launcher
# ---------------------------------------------------------------------------------------------


@jit
def _tile_position(tile, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """(row tile, column tile) of output tile number ``tile`` of one batch, in grouped order:
    GROUP_M row tiles share each weight tile while it is in L2."""
    tiles_per_group = GROUP_M * tiles_n
    first_m = (tile // tiles_per_group) * GROUP_M
    rows_in_group = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (tile % tiles_per_group) % rows_in_group
    pid_n = (tile % tiles_per_group) // rows_in_group
    return pid_m, pid_n


@jit
def _accumulate(a_desc, b_desc, row0, col0, K, FAST_ACCUM: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
    """The one K order every row goes through: the fp32 tile of rows row0.. times weight rows col0..

    a_desc views A as (b*M, K), b_desc views the weight as (b*N, K): a tile that runs past row M or
    column N of its batch reads the next batch (or TMA's zero fill); those rows and columns are
    computed and dropped at the store, and never enter the sums of the rows that are kept.
    """
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in tl.range(0, tl.cdiv(K, BLOCK_K), warp_specialize=WARP_SPECIALIZE):
        a = a_desc.load([row0, k * BLOCK_K])
        b = b_desc.load([col0, k * BLOCK_K])
        if FAST_ACCUM:
            # Triton's sm90 default: the tensor cores accumulate all of K in reduced precision.
            acc = tl.dot(a, b.T, acc)
        else:
            # Start each K tile from a zero partial and add it to acc in fp32.
            acc = tl.dot(a, b.T, acc, max_num_imprecise_acc=BLOCK_K)
    return acc


@jit
def _epilogue(acc, out_ptr, out_desc, a_scale_ptr, b_scale_ptr, bias_ptr, batch, pid_m, pid_n, M, N,
              A_PER_ROW: tl.constexpr, B_PER_COL: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_DTYPE: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA_STORE: tl.constexpr, SUBTILES: tl.constexpr):
    """Scale, add bias, round once to OUT_DTYPE, store the rows < M and columns < N of the tile."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = batch.to(tl.int64) * M + offs_m
    if A_PER_ROW:
        a_scale = tl.load(a_scale_ptr + rows, mask=mask_m, other=1.0)[:, None]
    else:
        a_scale = tl.load(a_scale_ptr)
    if B_PER_COL:
        b_scale = tl.load(b_scale_ptr + batch.to(tl.int64) * N + offs_n, mask=mask_n, other=1.0)[None, :]
    else:
        b_scale = tl.load(b_scale_ptr)
    out = acc * (a_scale * b_scale)
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = out.to(OUT_DTYPE)
    if TMA_STORE:
        # out_desc is (b, M, N): TMA clips at this batch's row M, where a 2-D view would spill into
        # the next batch's rows.
        row = pid_m * BLOCK_M
        col = pid_n * BLOCK_N
        if SUBTILES == 1:
            out_desc.store([batch, row, col], out.reshape(1, BLOCK_M, BLOCK_N))
        else:
            left, right = out.reshape(BLOCK_M, 2, BLOCK_N // 2).permute(0, 2, 1).split()
            out_desc.store([batch, row, col], left.reshape(1, BLOCK_M, BLOCK_N // 2))
            out_desc.store([batch, row, col + BLOCK_N // 2], right.reshape(1, BLOCK_M, BLOCK_N // 2))
    else:
        out_ptrs = out_ptr + rows[:, None] * N + offs_n[None, :]
        tl.store(out_ptrs, out, mask=mask_m[:, None] & mask_n[None, :])


def _kernel_body(
    a_desc,
    b_desc,
    out_ptr,
    out_desc,
    a_scale_ptr,
    b_scale_ptr,
    bias_ptr,
    M,
    N,
    K,
    A_PER_ROW: tl.constexpr,
    B_PER_COL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FAST_ACCUM: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
    TMA_STORE: tl.constexpr,
    SUBTILES: tl.constexpr,
):
    """One program per output tile: grid (tiles of one batch, batches)."""
    batch = tl.program_id(1)
    pid_m, pid_n = _tile_position(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    acc = _accumulate(a_desc, b_desc, batch * M + pid_m * BLOCK_M, batch * N + pid_n * BLOCK_N, K,
                      FAST_ACCUM, BLOCK_M, BLOCK_N, BLOCK_K, WARP_SPECIALIZE)
    _epilogue(acc, out_ptr, out_desc, a_scale_ptr, b_scale_ptr, bias_ptr, batch, pid_m, pid_n, M, N,
              A_PER_ROW, B_PER_COL, HAS_BIAS, OUT_DTYPE, BLOCK_M, BLOCK_N, TMA_STORE, SUBTILES)


def _persistent_kernel_body(
    a_desc,
    b_desc,
    out_ptr,
    out_desc,
    a_scale_ptr,
    b_scale_ptr,
    bias_ptr,
    M,
    N,
    K,
    BATCH,
    A_PER_ROW: tl.constexpr,
    B_PER_COL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FAST_ACCUM: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
    TMA_STORE: tl.constexpr,
    SUBTILES: tl.constexpr,
    NUM_SMS: tl.constexpr,
):
    """min(NUM_SMS, tiles) programs, each looping over every NUM_SMS-th tile of all batches: the
    schedule depends on M, the work done for each tile (and so each row's arithmetic) does not."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_per_batch = tiles_m * tiles_n
    # Flattening the K loop into the tile loop lets the pipeline prefetch the next tile's first K
    # tiles during this tile's epilogue; Triton's warp specialization takes the nested form instead.
    for tile in tl.range(tl.program_id(0), tiles_per_batch * BATCH, NUM_SMS, flatten=not WARP_SPECIALIZE,
                         warp_specialize=WARP_SPECIALIZE):
        batch = tile // tiles_per_batch
        pid_m, pid_n = _tile_position(tile % tiles_per_batch, tiles_m, tiles_n, GROUP_M)
        acc = _accumulate(a_desc, b_desc, batch * M + pid_m * BLOCK_M, batch * N + pid_n * BLOCK_N, K,
                          FAST_ACCUM, BLOCK_M, BLOCK_N, BLOCK_K, False)
        _epilogue(acc, out_ptr, out_desc, a_scale_ptr, b_scale_ptr, bias_ptr, batch, pid_m, pid_n, M, N,
                  A_PER_ROW, B_PER_COL, HAS_BIAS, OUT_DTYPE, BLOCK_M, BLOCK_N, TMA_STORE, SUBTILES)


# M (and the batch count) are runtime values: Triton would otherwise compile a separate binary for
# M == 1 and for M % 16 == 0, and every M must run the same one.
_kernel = triton.jit(do_not_specialize=["M"])(_kernel_body) if HAS_TRITON else _kernel_body
_persistent_kernel = (
    triton.jit(do_not_specialize=["M", "BATCH"])(_persistent_kernel_body) if HAS_TRITON else _persistent_kernel_body
)

_TL_OUT_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def launch_options(cfg: TileConfig) -> dict[str, object]:
    """Triton compile options of a launch with ``cfg``."""
    # No FMA contraction: two roundings (scale, then bias) like the reference, in every variant.
    return {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "enable_fp_fusion": False}


# The interpreter has no SMs: a few programs make each one loop over several tiles, as on a GPU.
INTERPRETER_PROGRAMS = 3


def _tma_operand(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when TMA can read it (dense, 16-byte aligned base), else a dense copy."""
    if t.is_contiguous() and t.data_ptr() % 16 == 0:
        return t
    return torch.empty_like(t, memory_format=torch.contiguous_format).copy_(t)


def batch_invariant_fp8_gemm_triton(
    A: torch.Tensor,
    B: torch.Tensor,
    A_scale: torch.Tensor,
    B_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    use_fast_accum: bool = False,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """Validate and launch the Triton kernel (on CUDA, or on CPU under TRITON_INTERPRET=1).

    ``config`` overrides :func:`tile_config` for tuning sweeps; results are batch-invariant for any
    fixed config, but the op always uses :func:`tile_config`.
    """
    a_per_row, b_per_col = _validate(A, B, A_scale, B_scale, bias, out_dtype)
    require_triton(OP)
    from triton.tools.tensor_descriptor import TensorDescriptor

    batch = tuple(A.shape[:-2])
    M, K = A.shape[-2], A.shape[-1]
    N = B.shape[-1]
    out = torch.empty((*batch, M, N), dtype=out_dtype, device=A.device)
    if M == 0 or out.numel() == 0:
        return out
    b = out.numel() // (M * N)
    cfg = config or tile_config(N, K)
    # Only the batch stride can differ from the dense layout here (validated above): copying fixes
    # it without changing a value.
    a2d = _tma_operand(A).reshape(b * M, K)
    w2d = _tma_operand(B.transpose(-1, -2)).reshape(b * N, K)
    a_desc = TensorDescriptor.from_tensor(a2d, [cfg.block_m, cfg.block_k])
    b_desc = TensorDescriptor.from_tensor(w2d, [cfg.block_n, cfg.block_k])
    out_desc = (
        TensorDescriptor.from_tensor(out.view(b, M, N), [1, cfg.block_m, cfg.block_n // cfg.epilogue_subtiles])
        if cfg.tma_store
        else out
    )
    a_scale = A_scale.contiguous() if a_per_row else A_scale.reshape(1)
    b_scale = B_scale.contiguous() if b_per_col else B_scale.reshape(1)
    args = (a_desc, b_desc, out, out_desc, a_scale, b_scale, bias if bias is not None else out, M, N, K)
    meta = {
        "A_PER_ROW": a_per_row,
        "B_PER_COL": b_per_col,
        "HAS_BIAS": bias is not None,
        "FAST_ACCUM": use_fast_accum,
        "OUT_DTYPE": getattr(tl, _TL_OUT_DTYPES[out_dtype]),
        "BLOCK_M": cfg.block_m,
        "BLOCK_N": cfg.block_n,
        "BLOCK_K": cfg.block_k,
        "GROUP_M": cfg.group_m,
        "WARP_SPECIALIZE": cfg.warp_specialize,
        "TMA_STORE": cfg.tma_store,
        "SUBTILES": cfg.epilogue_subtiles,
        **launch_options(cfg),
    }
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    if cfg.persistent:
        num_sms = sm_count(A.device, interpreted=INTERPRETER_PROGRAMS)  # one persistent program per SM
        _persistent_kernel[(min(num_sms, tiles * b),)](*args, b, NUM_SMS=num_sms, **meta)
    else:
        _kernel[(tiles, b)](*args, **meta)
    return out


# ---------------------------------------------------------------------------------------------
# the op
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op(
    op_name(OP),
    mutates_args=(),
    device_types="cuda",
    # The kernel reads A and the weight through TMA in the layouts validated above, so Inductor must
    # keep the traced stride order (row-major A, column-major B) for nodes a pass inserted too.
    tags=(torch.Tag.needs_fixed_stride_order,),
)
def batch_invariant_fp8_gemm(
    A: torch.Tensor,
    B: torch.Tensor,
    A_scale: torch.Tensor,
    B_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    use_fast_accum: bool = False,
) -> torch.Tensor:
    return batch_invariant_fp8_gemm_triton(A, B, A_scale, B_scale, bias, out_dtype, use_fast_accum)


@batch_invariant_fp8_gemm.register_kernel("cpu")
def _batch_invariant_fp8_gemm_cpu(A, B, A_scale, B_scale, bias, out_dtype, use_fast_accum=False):
    _validate(A, B, A_scale, B_scale, bias, out_dtype)
    return reference_batch_invariant_fp8_gemm(A, B, A_scale, B_scale, bias, out_dtype)


@batch_invariant_fp8_gemm.register_fake
def _batch_invariant_fp8_gemm_fake(A, B, A_scale, B_scale, bias, out_dtype, use_fast_accum=False):
    return A.new_empty((*A.shape[:-1], B.shape[-1]), dtype=out_dtype)


@opcheck_samples(batch_invariant_fp8_gemm)
def _samples() -> Iterator[OpSample]:
    g = torch.Generator().manual_seed(0)

    def fp8(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 2).to(torch.float8_e4m3fn)

    for batch, m, k, n in (((), 1, 16, 16), ((), 33, 48, 32), ((2,), 5, 32, 16)):
        A = fp8(*batch, m, k)
        B = fp8(*batch, n, k).transpose(-1, -2)
        per_token = torch.rand(*batch, m, 1, generator=g) + 0.5
        per_channel = torch.rand(*batch, 1, n, generator=g) + 0.5
        bias = torch.randn(n, generator=g).to(torch.bfloat16)
        yield OpSample((A, B, torch.tensor([0.5]), torch.tensor(0.25), None, torch.bfloat16), {},
                       name=f"{tuple(A.shape)}x{tuple(B.shape)}-tensorwise")
        yield OpSample((A, B, per_token, per_channel, bias, torch.float16), {"use_fast_accum": True},
                       name=f"{tuple(A.shape)}x{tuple(B.shape)}-rowwise-bias-fast-accum")
