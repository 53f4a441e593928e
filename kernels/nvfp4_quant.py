"""NVFP4 quantization that writes the K padding of block-scaled FP4 GEMMs itself: ``nvfp4_quant``.

Block-scaled FP4 GEMMs (CUTLASS, cuBLASLt) read K padded to an aligned size. Quantizing and then
``F.pad``-ing the packed values and the block scales reads and writes everything a second time;
this op writes straight into the padded buffers (zeros included), so the pad costs nothing.

    packed, scales = torch.ops.fusionpasses.nvfp4_quant(x, global_scale, padded_n=None, scale_layout="linear")

Format (NVFP4, blocks of 16 along N; all arithmetic in float32, IEEE round-to-nearest-even)
    x             (M, N) bf16 or fp16, N a multiple of 16, unit stride along N (rows may be strided)
    global_scale  float32, one element; conventionally ``448 * 6 / amax(|x|)``. Must be finite and > 0.
    width         ``padded_n`` when given (>= N, a multiple of 16), else N. Columns N..width-1 are
                  quantized as zeros: their codes and their block scales are exactly 0.
    per block b of 16 values of a row:
        amax_b    max |x| over the block's values that are not NaN (exact in float32; NaN if all are)
        scale_b   e4m3(min(amax_b * float32(1/6) * global_scale, 448)) (products left to right): FP8
                  E4M3 (float8_e4m3fn), rounded to nearest even, subnormals kept, saturated at 448. The
                  multiply by float32(1/6) = 0x3E2AAAAB (not a division) is what TensorRT-LLM and vLLM do.
        factor_b  global_scale / float(scale_b), or 0 when scale_b == 0 (an all-zero block)
        code_i    e2m1(x_i * factor_b): the nearest of +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}, a value exactly
                  halfway between two going to the one with the even code, |values| > 6 saturating to 6;
                  the sign bit (bit 3) is the sign of the product, so small negatives give -0 (code 8)
    decoding:   x_i ~ e2m1_value(code_i) * float(scale_b) / global_scale

Outputs
    packed  uint8 (M, width / 2), row-major: byte j of row m holds element 2j in its low nibble and
            element 2j + 1 in its high nibble.
    scales  float8_e4m3fn, in one of two layouts:
        "linear"    (M, width / 16), row-major: scales[m, b] is block b of row m.
        "swizzled"  (round_up(M, 128), round_up(width / 16, 4)): the 128x4-tile layout that cuBLASLt and
                    CUTLASS block-scaled GEMMs read. The tensor is a byte container; its memory order is
                    not its 2-D index order. The scale of (row m, block b) is at byte
                        (m // 128 * (Cp / 4) + b // 4) * 512 + (m % 32) * 16 + (m // 32 % 4) * 4 + b % 4
                    of the contiguous buffer, Cp = round_up(width / 16, 4): 128-row x 4-block tiles of 512
                    bytes, row tile by row tile, the 4 block-column tiles of a row tile in order. Bytes of
                    rows M..round_up(M, 128)-1 and of blocks width/16..Cp-1 are 0. Rows 128t..128t+127 of
                    the 2-D tensor hold exactly row tile t, so splitting or gathering it along dim 0 in
                    multiples of 128 rows splits or gathers whole row tiles.
    TensorRT-LLM's 8x4 small-M layout is not supported.

Consumers: CUTLASS and cuBLASLt NVFP4 GEMMs need K (the packed row length in elements) to be a multiple of
32 (16-byte rows of the FP4 operand), so callers pass ``padded_n = round_up(N, 32)``; the op itself
only needs whole blocks (multiples of 16). With the swizzled layout, padding K from N to round_up(N, 32)
never changes the scale tensor's shape (its columns are already padded to 4 blocks = 64 elements).

GPU kernel: Triton, bit-identical to :func:`reference_nvfp4_quant`. A program quantizes a (row tile,
K tile) of x: by default one warp, 2 rows x 512 columns (``TileShape``, ``default_tile``, tuned by
``scripts/bench_nvfp4_quant.py --sweep``; tiles can also walk the rows, loading the next ones ahead).
Each thread owns whole scale blocks: it loads a block's 16 values as eight 32-bit words (two elements
each, decoded with bit operations), reduces the amax, and stores the block's 8 packed bytes, so no
value crosses threads.
Rows that are not 4-byte aligned (odd row stride, or a base 2 bytes past a word) take the same kernel
with 2-byte loads instead (correct, slower; ``word_loads_possible``).
E2M1 rounding is done in software on every GPU, Hopper and Blackwell alike, as float and integer
multiply-adds in inline PTX (``_PAIR_BYTE_PTX``, which explains why; Triton's CPU interpreter runs the
same steps in Triton). Blackwell's hardware ``cvt.rn.satfinite.e2m1x2.f32`` is not used: no Blackwell
machine is available to check that path bit for bit. With the default tile the kernel moves 71-100% of
a device copy's bytes per second at M >= 1024 on H100 (docs/benchmarks.md): 98-100% at M = 8192,
71-75% at 1024 x 7152 and 7168 over two sessions' runs (a kernel with its loads and stores alone: 80-83%).
The block scales are the GPU's own E4M3 conversion (``cvt.rn.satfinite``, nearest even), an integer
encoding under Triton's CPU interpreter (``_e4m3.py``); both are checked against the reference (CPU suite
and GPU tests). Divisions are IEEE (``tl.math.div_rn``): Triton's ``/`` is approximate on NVIDIA GPUs.
NaN inputs: a NaN is left out of its block's amax and quantizes to +-6 (code 7 with its own sign bit);
a block of NaNs only gets the scale 448 (the min at 448 takes its non-NaN operand, as GPU min/max do).
The reference does the same, so the kernel is bit-identical to it on any input.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._e4m3 import e4m3_bits
from ._triton import HAS_TRITON, interpreting, jit, require_triton, tl, triton
from .library import (
    HALF_DTYPES,
    OpSample,
    check,
    check_dtype,
    check_ndim,
    check_same_device,
    check_tensorwise_scale,
    op_name,
    opcheck_samples,
    sm_count,
)

OP = "nvfp4_quant"
BLOCK_SIZE = 16
"""Values per block scale along N."""
E2M1_MAX = 6.0
E4M3_MAX = 448.0
SCALE_LAYOUTS = ("linear", "swizzled")
SWIZZLE_TILE_ROWS = 128
MAX_GRID_Y = 65535
"""CUDA's limit on a grid's y and z extents."""
SWIZZLE_TILE_COLS = 4

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
"""Magnitude of each E2M1 code 0..7; code | 8 is the negative."""
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
# A value exactly on the midpoint between codes j and j + 1 goes to the even one: up for odd j.
_E2M1_TIES_UP = (0.75, 1.75, 3.5)

SCHEMA = '(Tensor x, Tensor global_scale, SymInt? padded_n=None, str scale_layout="linear") -> (Tensor packed, Tensor scales)'


def round_up(value, multiple: int):
    """``value`` rounded up to a multiple of ``multiple`` (works on ints and SymInts)."""
    return (value + multiple - 1) // multiple * multiple


def scale_shape(m, width, scale_layout: str) -> tuple:
    """Shape of the scale tensor for ``m`` rows quantized to ``width`` columns."""
    blocks = width // BLOCK_SIZE
    if scale_layout == "swizzled":
        return (round_up(m, SWIZZLE_TILE_ROWS), round_up(blocks, SWIZZLE_TILE_COLS))
    return (m, blocks)


def _validate(x: torch.Tensor, global_scale: torch.Tensor, padded_n: int | None, scale_layout: str) -> None:
    check_ndim(x, OP, "x", 2)
    check_dtype(x, OP, "x", HALF_DTYPES)
    check_tensorwise_scale(global_scale, OP, "global_scale")
    check_same_device(OP, x=x, global_scale=global_scale)
    check(
        scale_layout in SCALE_LAYOUTS,
        OP,
        f"scale_layout must be one of {SCALE_LAYOUTS}, got {scale_layout!r}"
        + ("; TensorRT-LLM's 8x4 layout is not supported" if "8" in str(scale_layout) else ""),
    )
    n = x.shape[1]
    if isinstance(n, int):
        check(n > 0 and n % BLOCK_SIZE == 0, OP, f"N = x.shape[1] ({n}) must be a positive multiple of {BLOCK_SIZE}")
        check(x.stride(1) == 1, OP, f"x must have unit stride along N (rows may be strided), got strides {x.stride()}")
    if padded_n is not None and isinstance(padded_n, int) and isinstance(n, int):
        check(padded_n >= n, OP, f"padded_n ({padded_n}) must be >= N ({n})")
        check(
            padded_n % BLOCK_SIZE == 0,
            OP,
            f"padded_n ({padded_n}) must be a multiple of {BLOCK_SIZE} (whole scale blocks); "
            "FP4 GEMMs need a multiple of 32",
        )


# ---------------------------------------------------------------------------------------------
# Reference (plain PyTorch, from the format definition)
# ---------------------------------------------------------------------------------------------


def e2m1_codes(q: torch.Tensor) -> torch.Tensor:
    """E2M1 code (int32, 0..15) of each float32 value: nearest magnitude, ties to the even code, saturating."""
    magnitude = q.abs()
    midpoints = torch.tensor(_E2M1_MIDPOINTS, dtype=q.dtype, device=q.device)
    # bucketize counts the midpoints strictly below the value, so a tie lands on the lower code ...
    code = torch.bucketize(magnitude, midpoints, out_int32=True)
    # ... which is right for ties below an even code and one short for ties below an odd code.
    for tie in _E2M1_TIES_UP:
        code += (magnitude == tie).to(torch.int32)
    return code | (torch.signbit(q).to(torch.int32) << 3)


def swizzle_scales(linear: torch.Tensor) -> torch.Tensor:
    """(M, B) row-major block scales -> the swizzled (round_up(M, 128), round_up(B, 4)) 128x4-tile layout."""
    m, blocks = linear.shape
    rows, cols = round_up(m, SWIZZLE_TILE_ROWS), round_up(blocks, SWIZZLE_TILE_COLS)
    padded = F.pad(linear.view(torch.uint8), (0, cols - blocks, 0, rows - m))
    # row m = 128 * tile + 32 * group + lane; within a tile the byte order is (lane, group, column).
    tiles = padded.reshape(rows // 128, 4, 32, cols // 4, 4).permute(0, 3, 2, 1, 4)
    return tiles.reshape(rows, cols).view(linear.dtype)


def unswizzle_scales(swizzled: torch.Tensor, m: int, blocks: int) -> torch.Tensor:
    """Inverse of :func:`swizzle_scales`: the (m, blocks) row-major scales."""
    rows, cols = swizzled.shape
    tiles = swizzled.contiguous().view(torch.uint8).reshape(rows // 128, cols // 4, 32, 4, 4)
    linear = tiles.permute(0, 3, 2, 1, 4).reshape(rows, cols)
    return linear[:m, :blocks].view(swizzled.dtype)


def _sixth(like: torch.Tensor) -> torch.Tensor:
    # float32(1/6), the multiplier that block-scaled FP4 quantizers use for amax / 6.
    return torch.full_like(like, 1.0 / E2M1_MAX)


def reference_nvfp4_quant(
    x: torch.Tensor, global_scale: torch.Tensor, padded_n: int | None = None, scale_layout: str = "linear"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition of ``nvfp4_quant`` (see the module docstring), in plain PyTorch."""
    m, n = x.shape
    width = n if padded_n is None else padded_n
    blocks = F.pad(x.float(), (0, width - n)).reshape(m, width // BLOCK_SIZE, BLOCK_SIZE)
    gs = global_scale.float().reshape(1, 1).expand(m, width // BLOCK_SIZE)
    # NaNs are left out of the amax (a block of NaNs only keeps NaN), and fmin(NaN, 448) is 448: what the
    # GPU's max and min, which return their non-NaN operand, give the kernel.
    magnitudes = blocks.abs()
    amax = torch.where(magnitudes.isnan(), -1.0, magnitudes).amax(dim=-1)
    amax = torch.where(amax < 0, torch.nan, amax)
    scales = torch.fmin(amax * _sixth(amax) * gs, torch.full_like(amax, E4M3_MAX)).to(torch.float8_e4m3fn)
    decoded = scales.float()
    # Tensor / tensor: CUDA turns a division by a scalar into a multiply by its reciprocal.
    factor = torch.where(decoded > 0, gs / decoded, torch.zeros_like(decoded))
    codes = e2m1_codes(blocks * factor.unsqueeze(-1)).reshape(m, width)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
    if scale_layout == "swizzled":
        scales = swizzle_scales(scales)
    return packed, scales.contiguous()


def dequantize_nvfp4(
    packed: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor, scale_layout: str = "linear"
) -> torch.Tensor:
    """float32 (M, width) values that ``packed`` and ``scales`` encode (padding included)."""
    m, half_width = packed.shape
    width = 2 * half_width
    if scale_layout == "swizzled":
        scales = unswizzle_scales(scales, m, width // BLOCK_SIZE)
    table = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), device=packed.device)
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(m, width).long()
    block_scale = scales.float().repeat_interleave(BLOCK_SIZE, dim=1)
    return table[codes] * block_scale / global_scale.float().reshape(())


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------


# Packing one pair of values into its byte: the E2M1 rounding, written to keep this kernel off its limit.
# On sm90, integer, logic and min/max instructions issue at half the rate of float multiply-adds and
# integer multiply-adds, and an E2M1 rounding written with compares and selects made them this kernel's
# bound (Nsight Compute: SM 78% busy, DRAM 44%, at 8192 x 7168 on H200). This form needs 3 of those per
# value and one per pair; the rest are multiply-adds:
#   magnitude  t = min(|x * factor|, 6)  (the |.| folds into the min as an operand modifier)
#   binade     e = biased exponent of max(t, 1), so magic = 2^(e - 127) is 1, 2 or 4: the float32 whose ulp
#              is 2^-23 times E2M1's step at t (0.5 below 2, subnormals included; 1 below 4; 2 up to 6)
#   rounding   fma(t, 2^-22, magic): t * 2^-22 is exact, so the single rounding of the sum lands on
#              E2M1's grid, ties to even, and its bits exceed magic's by the number of steps k
#   code       k + 2 * (e - 127) = stepped_bits + e * (2 - 2^23) - 254: one integer multiply-add,
#              leaving out the -254
#   byte       the low 8 bits of low code + 16 * high code + the two sign bits (the fields never
#              overlap, so adds combine them). The signs come from the input's bits since factor >= 0
#              (-0 and negatives that round to 0 keep their sign, as in the reference): bits 31 and 15
#              of the word land on 7 and 3 in the high half of its product with 2^20 + 2^8, whose add
#              takes the codes. Bits 17 and 13, set in the same logic op, add 32 + 2, which is
#              -17 * 254 modulo 256: the codes' left-out constant.
# Checked exhaustively against `e2m1_codes` for every float32 up to 24 in magnitude, both signs. min() and
# max() return their non-NaN operand, so a NaN quantizes like 6 and stays in its own nibble.
# ptxas keeps the PTX's instruction choice where LLVM would turn the multiply-adds back into shifts and
# masks, so GPUs run the PTX; Triton's CPU interpreter, which cannot, runs the same steps in Triton.
_PAIR_BYTE_PTX_SOURCE = """
{
.reg .f32 t<2>, m<2>, st<2>;
.reg .b32 e<2>, mb<2>, c<2>, s;
abs.f32 t0, $1;
abs.f32 t1, $2;
min.f32 t0, t0, 0f40C00000;
min.f32 t1, t1, 0f40C00000;
max.f32 m0, t0, 0f3F800000;
max.f32 m1, t1, 0f3F800000;
mov.b32 e0, m0;
mov.b32 e1, m1;
shr.u32 e0, e0, 23;
shr.u32 e1, e1, 23;
mul.lo.u32 mb0, e0, 8388608;
mul.lo.u32 mb1, e1, 8388608;
mov.b32 m0, mb0;
mov.b32 m1, mb1;
fma.rn.f32 st0, t0, 0f34800000, m0;
fma.rn.f32 st1, t1, 0f34800000, m1;
mov.b32 c0, st0;
mov.b32 c1, st1;
mad.lo.s32 c0, e0, -8388606, c0;
mad.lo.s32 c1, e1, -8388606, c1;
mad.lo.s32 c0, c1, 16, c0;
lop3.b32 s, $3, 0x80008000, 0x22000, 0xEA;
mad.hi.u32 $0, s, 0x100100, c0;
}
"""
_PAIR_BYTE_PTX = tl.constexpr(_PAIR_BYTE_PTX_SOURCE) if HAS_TRITON else None


@jit
def _biased_magnitude_code(t):
    """The interpreter's copy of the PTX's steps for one value: E2M1 magnitude code of t in [0, 6], plus 254."""
    e = tl.maximum(t, 1.0).to(tl.int32, bitcast=True) >> 23
    stepped = tl.fma(t, 2.384185791015625e-07, (e << 23).to(tl.float32, bitcast=True))
    return stepped.to(tl.int32, bitcast=True) + e * (2 - (1 << 23))


@jit
def _pair_byte(low_product, high_product, words, INTERPRETED: tl.constexpr):
    """Packed byte (low 8 bits) of a pair: products x * factor and the 32-bit word holding the two inputs."""
    if INTERPRETED:
        low_code = _biased_magnitude_code(tl.minimum(tl.abs(low_product), 6.0))
        high_code = _biased_magnitude_code(tl.minimum(tl.abs(high_product), 6.0))
        # As in the PTX: the high 32 bits of ((words & 0x80008000) | 0x22000) * (2^8 + 2^20) hold bit 31 at
        # 7 (and 19), bit 15 at 3, and 34, which cancels the codes' 17 * 254 in the low 8 bits.
        marked = (words & -2147450880) | 0x22000
        signs = tl.umulhi(marked.to(tl.uint32, bitcast=True), 0x100100).to(tl.int32, bitcast=True)
        return low_code + high_code * 16 + signs
    else:
        return tl.inline_asm_elementwise(
            _PAIR_BYTE_PTX, "=r,f,f,r", [low_product, high_product, words], dtype=tl.int32, is_pure=True, pack=1
        )


@jit
def _nvfp4_quant_kernel(
    x_ptr,
    global_scale_ptr,
    packed_ptr,
    scales_ptr,
    M,
    N,
    stride_xm,
    packed_row_words,
    scale_rows,
    scale_cols,
    IS_BF16: tl.constexpr,
    WORD_LOADS: tl.constexpr,
    SWIZZLED: tl.constexpr,
    INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WALK: tl.constexpr,
    STAGES: tl.constexpr,
):
    # Every tensor is laid out (row, block, pair): pair p of block b holds elements 16b + 2p (low) and
    # 16b + 2p + 1 (high), which become byte 8b + p of the packed row. Loads, the per-block amax, the
    # codes and the packed store all share that one shape, so no value ever moves between threads
    # (a reshape to (.., 16) and a split of (.., 2) would each be a layout conversion through shared memory).
    BLOCKS: tl.constexpr = BLOCK_K // 16
    # The grid is (K tiles, row tiles): a 2-D grid spares every program an integer division by the K tile
    # count, some 30 instructions, and K tiles on axis 0 give programs launched one after another
    # neighbouring columns of the same rows (3-7% faster on H200 than the other order). Axes 1 and 2
    # hold at most 65535 programs each, so row programs are numbered program_id(1) + 65535 *
    # program_id(2); programs past the last tile store nothing. With WALK there are fewer row programs
    # than row tiles: each walks the row tiles as many apart as there are row programs, and with
    # STAGES > 1 Triton copies the next tiles' inputs into shared memory (cp.async) while this one is
    # quantized.
    block = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    row_program = tl.program_id(1) + tl.program_id(2) * tl.num_programs(1)
    global_scale = tl.load(global_scale_ptr)
    if WALK:
        row_programs = tl.num_programs(1) * tl.num_programs(2)
        for row_tile in tl.range(row_program, tl.cdiv(scale_rows, BLOCK_M), row_programs, num_stages=STAGES):
            row = (row_tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            _quantize_tile(x_ptr, global_scale, packed_ptr, scales_ptr, M, N, stride_xm, packed_row_words,
                           scale_rows, scale_cols, row, block, IS_BF16, WORD_LOADS, SWIZZLED, INTERPRETED,
                           BLOCK_M, BLOCKS)
    else:
        # One tile per program; a loop that runs once would still cost registers (fewer programs per SM).
        row = (row_program * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        _quantize_tile(x_ptr, global_scale, packed_ptr, scales_ptr, M, N, stride_xm, packed_row_words,
                       scale_rows, scale_cols, row, block, IS_BF16, WORD_LOADS, SWIZZLED, INTERPRETED,
                       BLOCK_M, BLOCKS)


@jit
def _quantize_tile(
    x_ptr,
    global_scale,
    packed_ptr,
    scales_ptr,
    M,
    N,
    stride_xm,
    packed_row_words,
    scale_rows,
    scale_cols,
    row,
    block,
    IS_BF16: tl.constexpr,
    WORD_LOADS: tl.constexpr,
    SWIZZLED: tl.constexpr,
    INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCKS: tl.constexpr,
):
    """Quantize rows ``row`` x scale blocks ``block`` of x into both outputs (see the kernel for the layout)."""
    rows = row[:, None, None]
    byte_col = block[None, :, None] * 8 + tl.arange(0, 8)[None, None, :]
    # Columns N..width and rows M..scale_rows load as zeros: they quantize to zero codes and scales,
    # which is exactly the padding the outputs need.
    in_x = (rows < M) & (block[None, :, None] * 16 < N)
    if WORD_LOADS:
        # One 32-bit word per pair (little-endian: the low half is the even element), so a thread's
        # block is 32 contiguous bytes: two 16-byte loads.
        words = tl.load(
            x_ptr.to(tl.pointer_type(tl.int32)) + rows * (stride_xm // 2) + byte_col, mask=in_x, other=0
        )
        if IS_BF16:
            low = (words << 16).to(tl.float32, bitcast=True)
            high = (words & -65536).to(tl.float32, bitcast=True)
        else:
            low = words.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            high = (words >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        # Odd row stride or a base not 4-byte aligned: the same layout from two 2-byte loads per pair.
        pair_ptr = x_ptr + rows * stride_xm + byte_col * 2
        low_half = tl.load(pair_ptr, mask=in_x, other=0.0)
        high_half = tl.load(pair_ptr + 1, mask=in_x, other=0.0)
        low = low_half.to(tl.float32)
        high = high_half.to(tl.float32)
        # The pair's word, as the word loads would read it; only its sign bits (15 and 31) are used.
        low_bits = low_half.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        words = low_bits | (high_half.to(tl.int16, bitcast=True).to(tl.int32) << 16)

    amax = tl.max(tl.maximum(tl.abs(low), tl.abs(high)), axis=2)
    scale = tl.minimum(amax * 0.16666666666666666 * global_scale, 448.0)
    scale_code = e4m3_bits(scale, INTERPRETED)
    scale_value = scale_code.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    nonzero = scale_value > 0.0
    # div_rn is IEEE division (plain `/` is approximate on NVIDIA); it takes operands of one shape.
    numerator = tl.full((BLOCK_M, BLOCKS), 1.0, tl.float32) * global_scale
    factor = tl.where(nonzero, tl.math.div_rn(numerator, tl.where(nonzero, scale_value, 1.0)), 0.0)[:, :, None]

    packed = _pair_byte(low * factor, high * factor, words, INTERPRETED).to(tl.uint8)
    # Packed rows are whole 8-byte words; passing their count (not the byte count, which Triton only knows
    # to be a multiple of 16 when it is) lets each block's 8 bytes go out as one 64-bit store for any width.
    packed_cols = packed_row_words * 8
    tl.store(
        packed_ptr + rows * packed_cols + byte_col,
        packed,
        mask=(rows < M) & (byte_col < packed_cols),
    )

    scale_row = row[:, None]
    scale_col = block[None, :]
    if SWIZZLED:
        tile = (scale_row // 128) * (scale_cols // 4) + scale_col // 4
        offsets = tile * 512 + (scale_row % 32) * 16 + ((scale_row // 32) % 4) * 4 + scale_col % 4
    else:
        offsets = scale_row * scale_cols + scale_col
    tl.store(
        scales_ptr + offsets,
        scale_code,
        mask=(scale_row < scale_rows) & (scale_col < scale_cols),
    )


@dataclass(frozen=True)
class TileShape:
    """Elements of x one program quantizes at a time (BLOCK_M rows x BLOCK_K columns), its warp count, and
    how the programs walk the row tiles: one program per tile (``programs_per_sm = 0``), or at most
    ``programs_per_sm`` per SM, each quantizing every so many row tiles with ``stages`` tiles' inputs
    loading ahead."""

    block_m: int
    block_k: int
    num_warps: int
    programs_per_sm: int = 0
    stages: int = 1

    def __post_init__(self) -> None:
        for name in ("block_m", "block_k", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"TileShape.{name} must be a power of 2, got {value}")
        if self.block_k < BLOCK_SIZE:
            raise ValueError(f"TileShape.block_k must be >= {BLOCK_SIZE}, got {self.block_k}")
        if self.programs_per_sm < 0 or self.stages < 1:
            raise ValueError(f"TileShape needs programs_per_sm >= 0 and stages >= 1, got {self}")

    def row_programs(self, row_tiles: int, k_tiles: int, sm_count: int) -> int:
        """Programs along the rows: one per row tile, or at most as many as ``programs_per_sm`` allows, and
        no more than it takes to give each the same number of tiles: a program with one tile more than
        the rest would set the kernel's time."""
        if self.programs_per_sm == 0:
            return row_tiles
        most = max(1, min(row_tiles, self.programs_per_sm * sm_count // k_tiles))
        tiles_each = -(-row_tiles // most)
        return -(-row_tiles // tiles_each)


# The default tile: one warp quantizing 2 rows x 512 columns (two scale blocks a thread), one tile per
# program. `scripts/bench_nvfp4_quant.py --sweep`-style probes on H100 (Triton 3.6, 2026-12-08, % of a
# device copy's bandwidth, padded quant, swizzled scales):
#                                                  1024x7152 1024x7168 1024x14336 8192x7152 8192x14336
#   one 2x512 tile of 1 warp per program (default)   71.2%     73.7%     91.2%      98.0%     100.0%
#   walking 2x512, 1 warp, 16 per SM, 3 stages        59.3%     68.2%     85.4%      86.9%      96.2%
#   one 4x1024 tile of 4 warps per program            61.5%     66.4%     84.6%      93.1%      95.9%
# A likely reason (not profiled): the 4-warp tile needs 72 registers a thread (Triton 3.9's sm90 build), so
# at most 7 programs fit an SM, and 1024 x 7168 ran 1792 programs on 924 slots, two rounds of loads then
# arithmetic; one-warp programs come in much finer steps. Programs walking the rows with loads in flight
# (cp.async, or TMA with up to 8 stages, a throwaway probe) lost on every shape. Not yet measured on H200,
# where the walking tile had been the default for large inputs (docs/benchmarks.md).
DEFAULT_BLOCK_K = 512
"""Columns per program (at most): 32 blocks, so each row of a tile is 1 KiB of contiguous bf16."""
DEFAULT_TILE_ELEMENTS = 1024
"""Elements per program: 2 KiB of bf16, one warp with two scale blocks a thread. Halving the rows of
small-M tiles to put more programs on the GPU left one block a thread: 52% against 57% at 16 x 7168."""
CANDIDATE_TILES = (
    # (rows, columns, warps[, programs per SM, stages]) that `bench_nvfp4_quant.py --sweep` ranks and the
    # GPU tests check bit for bit: 32 elements (2 scale blocks) per thread but for two, 2 to 16 KiB of
    # bf16 per program. Tiles of 16 warps, and of 8 warps and 32 rows, lost on every shape of the first
    # sweeps and were dropped.
    # The default tile (2 x 512, 1 warp) is swept and tested as the default; other one-warp tiles:
    TileShape(4, 256, 1),
    TileShape(8, 128, 1),
    TileShape(1, 1024, 1),
    TileShape(8, 512, 4),
    TileShape(8, 512, 8),
    TileShape(16, 512, 4),
    TileShape(4, 1024, 4),
    TileShape(8, 1024, 8),
    TileShape(16, 256, 4),
    # Programs that walk the row tiles (at most programs_per_sm per SM), loading `stages` tiles ahead.
    TileShape(2, 1024, 2, programs_per_sm=8, stages=3),
    TileShape(2, 1024, 2, programs_per_sm=12, stages=3),
    TileShape(4, 512, 2, programs_per_sm=8, stages=3),
    TileShape(4, 512, 2, programs_per_sm=12, stages=3),
    TileShape(1, 1024, 1, programs_per_sm=16, stages=3),
    TileShape(1, 1024, 1, programs_per_sm=24, stages=3),
    TileShape(2, 512, 1, programs_per_sm=16, stages=3),
    TileShape(2, 512, 1, programs_per_sm=24, stages=2),
)


def default_tile(cols: int) -> TileShape:
    """One warp per program, one tile each: ``DEFAULT_BLOCK_K`` columns (fewer for narrow inputs) by
    ``DEFAULT_TILE_ELEMENTS / block_k`` rows."""
    block_k = min(DEFAULT_BLOCK_K, max(BLOCK_SIZE, triton.next_power_of_2(cols)))
    return TileShape(max(1, DEFAULT_TILE_ELEMENTS // block_k), block_k, 1)


def word_loads_possible(x: torch.Tensor) -> bool:
    """Whether the kernel can read x as 32-bit words (two elements each): 4-byte aligned rows."""
    return x.data_ptr() % 4 == 0 and (x.stride(0) % 2 == 0 or x.shape[0] <= 1)


def launch_nvfp4_quant(
    x: torch.Tensor,
    global_scale: torch.Tensor,
    padded_n: int | None = None,
    scale_layout: str = "linear",
    tile: TileShape | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the Triton kernel (on CUDA, or on the CPU under TRITON_INTERPRET=1). Inputs are validated."""
    _validate(x, global_scale, padded_n, scale_layout)
    require_triton(OP)
    m, n = x.shape
    width = n if padded_n is None else padded_n
    packed = torch.empty((m, width // 2), dtype=torch.uint8, device=x.device)
    scales = torch.empty(scale_shape(m, width, scale_layout), dtype=torch.float8_e4m3fn, device=x.device)
    scale_rows, scale_cols = scales.shape
    if scale_rows == 0:
        return packed, scales
    # Programs cover every row and column either output has, so they also write all of the zeros.
    cols = scale_cols * BLOCK_SIZE
    sms = sm_count(x.device, interpreted=132)
    if tile is None:
        tile = default_tile(cols)
    k_tiles = triton.cdiv(cols, tile.block_k)
    row_programs = tile.row_programs(triton.cdiv(scale_rows, tile.block_m), k_tiles, sms)
    grid = (k_tiles, min(row_programs, MAX_GRID_Y), triton.cdiv(row_programs, MAX_GRID_Y))
    _nvfp4_quant_kernel[grid](
        x,
        global_scale,
        packed,
        scales.view(torch.uint8),
        m,
        n,
        x.stride(0),
        width // 16,
        scale_rows,
        scale_cols,
        IS_BF16=x.dtype == torch.bfloat16,
        WORD_LOADS=word_loads_possible(x),
        SWIZZLED=scale_layout == "swizzled",
        INTERPRETED=interpreting(),
        BLOCK_M=tile.block_m,
        BLOCK_K=tile.block_k,
        WALK=tile.programs_per_sm > 0,
        STAGES=tile.stages,
        num_warps=tile.num_warps,
        # Bit-identity with the reference: no multiply-add contraction into FMAs.
        enable_fp_fusion=False,
    )
    return packed, scales


# ---------------------------------------------------------------------------------------------
# The op
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op(op_name(OP), mutates_args=(), device_types="cuda", schema=SCHEMA)
def nvfp4_quant(
    x: torch.Tensor, global_scale: torch.Tensor, padded_n: int | None = None, scale_layout: str = "linear"
) -> tuple[torch.Tensor, torch.Tensor]:
    return launch_nvfp4_quant(x, global_scale, padded_n, scale_layout)


@nvfp4_quant.register_kernel("cpu")
def _nvfp4_quant_cpu(x, global_scale, padded_n=None, scale_layout="linear"):
    _validate(x, global_scale, padded_n, scale_layout)
    return reference_nvfp4_quant(x, global_scale, padded_n, scale_layout)


@nvfp4_quant.register_fake
def _nvfp4_quant_fake(x, global_scale, padded_n=None, scale_layout="linear"):
    _validate(x, global_scale, padded_n, scale_layout)
    m, n = x.shape
    width = n if padded_n is None else padded_n
    packed = x.new_empty((m, width // 2), dtype=torch.uint8)
    scales = x.new_empty(scale_shape(m, width, scale_layout), dtype=torch.float8_e4m3fn)
    return packed, scales


@opcheck_samples(nvfp4_quant)
def _nvfp4_quant_samples() -> Iterator[OpSample]:
    g = torch.Generator().manual_seed(0)
    for (m, n, padded_n), layout, dtype in (
        ((1, 16, None), "linear", torch.bfloat16),
        ((5, 48, 64), "swizzled", torch.float16),
        ((33, 80, 96), "linear", torch.bfloat16),
        ((130, 32, None), "swizzled", torch.bfloat16),
    ):
        x = (torch.randn(m, n, generator=g) * 3).to(dtype)
        global_scale = (E4M3_MAX * E2M1_MAX / x.float().abs().amax()).reshape(1)
        yield OpSample((x, global_scale, padded_n, layout), {}, name=f"{m}x{n}->{padded_n}-{layout}-{dtype}")
