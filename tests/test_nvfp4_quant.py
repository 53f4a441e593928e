"""nvfp4_quant: the reference against the format definition, and the Triton kernel (CPU interpreter) bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

from fusionpasses.kernels._triton import interpreting, tl, triton
from fusionpasses.kernels.library import KernelInputError
from fusionpasses.kernels.nvfp4_quant import (
    E2M1_VALUES,
    _pair_byte,
    TileShape,
    default_tile,
    dequantize_nvfp4,
    e2m1_codes,
    launch_nvfp4_quant,
    reference_nvfp4_quant,
    swizzle_scales,
    unswizzle_scales,
    word_loads_possible,
)

quant = torch.ops.fusionpasses.nvfp4_quant

SEED_SHAPES = [(128, 48), (128, 80), (150, 48), (150, 80), (64, 7152)]
LAYOUTS = ["linear", "swizzled"]


def round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def global_scale_of(x: torch.Tensor) -> torch.Tensor:
    return (448.0 * 6.0 / x.float().abs().amax()).reshape(1)


def random_input(m: int, n: int, dtype=torch.bfloat16, seed: int = 0, stride: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Per-row magnitudes over 8 decades, so block scales span E4M3's range, subnormals included.
    rows = torch.randn(m, stride or n, generator=g) * torch.logspace(-6, 2, m).unsqueeze(1)
    return rows.to(dtype)[:, :n]


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


# ---------------------------------------------------------------------------------------------
# the format
# ---------------------------------------------------------------------------------------------


def _nearest_e2m1_code(v: float) -> int:
    """Brute force from the definition: nearest magnitude, ties to the even code, saturating, sign kept."""
    magnitude = min(abs(v), 6.0)
    distances = [abs(magnitude - e) for e in E2M1_VALUES]
    best = min(distances)
    candidates = [code for code, d in enumerate(distances) if d == best]
    code = next((c for c in candidates if c % 2 == 0), candidates[0])
    return code | (8 if math.copysign(1.0, v) < 0 else 0)


def test_e2m1_codes_match_brute_force_at_every_midpoint_and_its_neighbours():
    specials = [0.0, -0.0, 1e-30, -1e-30, 5.99, 6.0, 6.01, 7.0, 1e30, float("inf"), -float("inf")]
    points = torch.tensor([*E2M1_VALUES, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, *specials], dtype=torch.float32)
    up = torch.nextafter(points, torch.full_like(points, math.inf))
    down = torch.nextafter(points, torch.full_like(points, -math.inf))
    values = torch.cat([points, up, down, -points, -up, -down, torch.linspace(-8, 8, 1001)])
    expected = torch.tensor([_nearest_e2m1_code(v) for v in values.tolist()], dtype=torch.int32)
    assert torch.equal(e2m1_codes(values), expected)


@triton.jit
def _encode_pairs_kernel(low_ptr, high_ptr, out_ptr, n, INTERPRETED: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = offsets < n
    low = tl.load(low_ptr + offsets, mask=in_range, other=0.0)
    high = tl.load(high_ptr + offsets, mask=in_range, other=0.0)
    # The word the kernel would have loaded: only its sign bits (15 and 31) are read.
    signs = (low.to(tl.int32, bitcast=True) >> 16) & 0x8000 | (high.to(tl.int32, bitcast=True) & -2147483648)
    byte = _pair_byte(low, high, signs, INTERPRETED)
    tl.store(out_ptr + offsets, byte.to(tl.uint8), mask=in_range)


def encode_pairs(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """The quant kernel's pair encoder (PTX on GPUs, its Triton copy in the interpreter) on float32 products."""
    out = torch.empty(low.shape, dtype=torch.uint8, device=low.device)
    block = 1024
    _encode_pairs_kernel[(triton.cdiv(low.numel(), block),)](
        low, high, out, low.numel(), INTERPRETED=interpreting(), BLOCK=block
    )
    return out


def expected_pair_bytes(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    return (e2m1_codes(low) | (e2m1_codes(high) << 4)).to(torch.uint8)


def midpoint_neighbourhood(ulps: int = 3) -> torch.Tensor:
    """Every E2M1 value and midpoint, 6 and beyond, and the float32 values up to ``ulps`` steps either side."""
    points = torch.tensor([*E2M1_VALUES, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 8.0, 24.0])
    bits = points.view(torch.int32)
    steps = torch.arange(-ulps, ulps + 1, dtype=torch.int32)
    near = (bits[:, None] + steps[None, :]).clamp(min=0).view(torch.float32).flatten()
    specials = torch.tensor([1e-45, 1e-30, 2.0**-104, 3.4e38, math.inf])
    return torch.cat([near, specials])


def test_pair_encoder_matches_e2m1_codes_at_midpoints_and_signs():
    g = torch.Generator().manual_seed(0)
    magnitudes = torch.cat([midpoint_neighbourhood(), torch.rand(4000, generator=g) * 8])
    low = magnitudes * torch.where(torch.rand(magnitudes.shape, generator=g) < 0.5, -1.0, 1.0)
    high = low[torch.randperm(low.numel(), generator=g)]
    low[:2], high[:2] = torch.tensor([-0.0, 0.0]), torch.tensor([0.0, -0.0])  # -0 keeps its sign bit
    assert torch.equal(encode_pairs(low, high), expected_pair_bytes(low, high))


def test_torch_e4m3_cast_rounds_to_nearest_even_with_subnormals():
    # The reference relies on torch's float32 -> float8_e4m3fn cast for the block scales.
    finite = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    midpoints = (finite[1:] + finite[:-1]) / 2
    cast = midpoints.to(torch.float8_e4m3fn).view(torch.uint8).int()
    lower = torch.arange(0, 126, dtype=torch.int32)
    # A tie goes to the code with an even mantissa (even code), above it rounds up, below it down.
    assert torch.equal(cast, torch.where(lower % 2 == 0, lower, lower + 1))
    above = torch.nextafter(midpoints, torch.full_like(midpoints, math.inf)).to(torch.float8_e4m3fn)
    below = torch.nextafter(midpoints, torch.zeros_like(midpoints)).to(torch.float8_e4m3fn)
    assert torch.equal(above.view(torch.uint8).int(), lower + 1)
    assert torch.equal(below.view(torch.uint8).int(), lower)


def test_reference_hand_computed_block():
    # amax 6 and global scale 1: scale = e4m3(6 * float32(1/6)) = 1.0, so the codes are e2m1 of x itself.
    x = torch.tensor([[0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -6]], dtype=torch.bfloat16)
    packed, scales = reference_nvfp4_quant(x, torch.tensor([1.0]))
    codes = [0, 1, 2, 3, 4, 5, 6, 7, 8, 2, 2, 4, 4, 6, 6, 15]
    assert packed.tolist() == [[codes[i] | codes[i + 1] << 4 for i in range(0, 16, 2)]]
    assert scales.float().tolist() == [[1.0]]


def test_reference_zero_block_and_saturating_scale():
    x = torch.zeros(2, 32, dtype=torch.float16)
    x[1, 16:] = 1000.0
    packed, scales = reference_nvfp4_quant(x, torch.tensor([1000.0]))
    assert scales.float().tolist() == [[0.0, 0.0], [0.0, 448.0]]
    assert packed[0].tolist() == [0] * 16 and packed[1, :8].tolist() == [0] * 8
    # 1000 * 1000 / 448 saturates to 6: code 7 in both nibbles.
    assert packed[1, 8:].tolist() == [0x77] * 8


def test_swizzle_matches_the_documented_byte_offsets():
    m, blocks = 130, 6
    linear = torch.randint(1, 127, (m, blocks), dtype=torch.uint8).view(torch.float8_e4m3fn)
    swizzled = swizzle_scales(linear)
    assert swizzled.shape == (256, 8)
    flat = swizzled.view(torch.uint8).flatten()
    cols = 8
    for row in range(m):
        for b in range(blocks):
            offset = (row // 128 * (cols // 4) + b // 4) * 512 + (row % 32) * 16 + (row // 32 % 4) * 4 + b % 4
            assert flat[offset] == linear.view(torch.uint8)[row, b]
    assert int(flat.count_nonzero()) == m * blocks  # everything else is zero padding
    assert torch.equal(as_bytes(unswizzle_scales(swizzled, m, blocks)), as_bytes(linear))


# ---------------------------------------------------------------------------------------------
# padding semantics of the reference (the seed's cases)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("m,n", SEED_SHAPES)
def test_padded_output_is_zero_padding_around_the_unpadded_result(m, n, layout):
    x = torch.randn(m, n, generator=torch.Generator().manual_seed(m + n), dtype=torch.float32).to(torch.float16)
    gs = global_scale_of(x)
    padded_n = round_up(n, 32)
    assert padded_n > n
    packed, scales = quant(x, gs, padded_n, layout)
    ref_packed, ref_scales = quant(x, gs, None, layout)

    assert packed.shape == (m, padded_n // 2)
    assert torch.count_nonzero(packed[:, n // 2:]) == 0
    assert torch.equal(packed[:, : n // 2], ref_packed)
    if layout == "swizzled":
        assert scales.shape == (round_up(m, 128), round_up(padded_n // 16, 4))
        linear = unswizzle_scales(scales, scales.shape[0], scales.shape[1])
        assert torch.count_nonzero(as_bytes(linear)[m:]) == 0
        linear = linear[:m, : padded_n // 16]
        ref_linear = unswizzle_scales(ref_scales, m, n // 16)
    else:
        assert scales.shape == (m, padded_n // 16)
        linear, ref_linear = scales, ref_scales
    assert torch.count_nonzero(as_bytes(linear)[:, n // 16:]) == 0
    assert torch.equal(as_bytes(linear[:, : n // 16]), as_bytes(ref_linear))

    values = dequantize_nvfp4(packed, scales, gs, layout)
    assert torch.count_nonzero(values[:, n:]) == 0
    # Rounding to E2M1 moves a value by at most one E2M1 unit of its block (half of the widest step, 2,
    # or the saturation from 6.4 to 6), so every element is within one block scale / gs of x.
    bound = linear.float().repeat_interleave(16, dim=1)[:, :n] / gs
    assert bool(((values[:, :n] - x.float()).abs() <= bound).all())


def test_dequantized_error_is_small_relative_to_the_block_amax():
    # Activations of one magnitude: every block scale is a normal E4M3 number (3 mantissa bits), so the
    # error is at most one E2M1 unit of amax / 6 * (1 + 2^-4).
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    gs = global_scale_of(x)
    packed, scales = quant(x, gs)
    error = (dequantize_nvfp4(packed, scales, gs) - x.float()).abs().reshape(64, 16, 16)
    amax = x.float().abs().reshape(64, 16, 16).amax(-1, keepdim=True)
    assert bool((error <= amax / 6 * (1 + 2**-4)).all())


# ---------------------------------------------------------------------------------------------
# the Triton kernel in the CPU interpreter, bit for bit
# ---------------------------------------------------------------------------------------------

# (M, N, padded_n, tile, dtype): the seed's shapes, M = 1, odd M, M > 128 not a multiple of 128, N not a
# multiple of 64, padding by more than one tile, tiles smaller than the output so that programs meet at
# the edges, and programs that walk several row tiles (132 SMs assumed under the interpreter), with and
# without loads ahead, some ending on a partial tile or none.
BF16, FP16 = torch.bfloat16, torch.float16
KERNEL_CASES = [
    (128, 48, 64, TileShape(128, 64, 4), BF16),
    (128, 80, 96, TileShape(64, 128, 4), FP16),
    (150, 48, 64, TileShape(64, 64, 4), FP16),
    (150, 80, 96, TileShape(32, 32, 4), BF16),
    (64, 7152, 7168, TileShape(64, 1024, 4), BF16),
    (64, 7152, 7168, TileShape(64, 2048, 4), FP16),
    (1, 16, None, TileShape(64, 16, 1), BF16),
    (1, 7152, 7168, TileShape(128, 2048, 4), FP16),
    (7, 208, 256, TileShape(8, 64, 2), BF16),
    (33, 16, 96, TileShape(16, 32, 1), FP16),
    (257, 112, None, TileShape(128, 128, 4), BF16),
    (130, 304, 320, TileShape(64, 256, 4), BF16),
    (300, 48, 64, TileShape(2, 64, 1, programs_per_sm=1, stages=3), BF16),
    (260, 96, None, TileShape(4, 32, 1, programs_per_sm=1, stages=1), FP16),
    (600, 1040, 1056, TileShape(8, 512, 4, programs_per_sm=1, stages=2), BF16),
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "m,n,padded_n,tile,dtype", KERNEL_CASES, ids=[f"{c[0]}x{c[1]}->{c[2]}-{str(c[4])[6:]}" for c in KERNEL_CASES]
)
def test_kernel_is_bit_identical_to_reference(m, n, padded_n, tile, dtype, layout):
    x = random_input(m, n, dtype, seed=m * 1000 + n)
    gs = global_scale_of(x)
    packed, scales = launch_nvfp4_quant(x, gs, padded_n, layout, tile)
    ref_packed, ref_scales = reference_nvfp4_quant(x, gs, padded_n, layout)
    assert packed.shape == ref_packed.shape and scales.shape == ref_scales.shape
    assert torch.equal(packed, ref_packed)
    assert torch.equal(as_bytes(scales), as_bytes(ref_scales))


def test_kernel_with_one_row_tiles():
    x = random_input(3, 48, BF16, seed=5)
    gs = global_scale_of(x)
    packed, scales = launch_nvfp4_quant(x, gs, 64, "linear", TileShape(1, 16, 1))
    ref_packed, ref_scales = reference_nvfp4_quant(x, gs, 64, "linear")
    assert torch.equal(packed, ref_packed)
    assert torch.equal(as_bytes(scales), as_bytes(ref_scales))


@pytest.mark.parametrize("layout,tile", [("linear", None), ("swizzled", TileShape(64, 32, 2))])
def test_kernel_strided_rows_and_extreme_blocks(layout, tile):
    # Rows that are slices of a wider buffer; blocks of zeros, of subnormal-scale values, of ties, of inf.
    x = random_input(5, 64, torch.bfloat16, seed=3, stride=96)
    x[0, :16] = 0
    x[1, 16:32] = 1e-30
    x[2, :16] = torch.tensor([6, 5, 3.5, 2.5, 1.75, 1.25, 0.75, 0.25] * 2, dtype=torch.bfloat16)
    x[3, 32:48] = float("inf")
    gs = torch.tensor([1.0])
    assert x.stride() == (96, 1)
    packed, scales = launch_nvfp4_quant(x, gs, 96, layout, tile)
    ref_packed, ref_scales = reference_nvfp4_quant(x, gs, 96, layout)
    assert torch.equal(packed, ref_packed)
    assert torch.equal(as_bytes(scales), as_bytes(ref_scales))


def nan_input(dtype: torch.dtype) -> torch.Tensor:
    """Blocks holding a NaN (either sign) among ordinary values, next to blocks without one."""
    x = random_input(4, 96, dtype, seed=5)
    x[0, 3] = float("nan")
    x[1, 20] = -float("nan")
    x[1, 48:64] = float("nan")
    x[3, 95] = float("nan")
    return x


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # the interpreter's max over the block of NaNs
@pytest.mark.parametrize("dtype", [BF16, torch.float16])
def test_nan_is_left_out_of_the_amax_and_quantizes_to_six(dtype):
    x = nan_input(dtype)
    gs = torch.tensor([1.0])
    ref_packed, ref_scales = reference_nvfp4_quant(x, gs, 128, "linear")
    # The block's scale and its other codes are those of the block with the NaN set to 0; the NaN is +-6.
    zeroed = reference_nvfp4_quant(torch.nan_to_num(x, nan=0.0), gs, 128, "linear")
    assert torch.equal(as_bytes(ref_scales[:, :2]), as_bytes(zeroed[1][:, :2]))
    assert ref_packed[0, 1] >> 4 == 7 and ref_packed[0, 1] & 0xF == zeroed[0][0, 1] & 0xF  # +NaN at column 3
    assert ref_packed[1, 10] & 0xF == 7 | 8 * int(x.view(torch.int16)[1, 20] < 0)  # -NaN, if its sign survived
    assert as_bytes(ref_scales)[1, 3] == 0x7E and (ref_packed[1, 24:32] == 0x77).all()  # a block of NaNs: 448
    packed, scales = launch_nvfp4_quant(x, gs, 128, "linear")
    assert torch.equal(packed, ref_packed)
    assert torch.equal(as_bytes(scales), as_bytes(ref_scales))


def scale_tie_input(global_scale: float, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks whose float32 scale is exactly global_scale * 2^k, k = -16..8 (the block amax is 6 * 2^k and
    6 * float32(1/6) rounds to 1): with global_scale on an E4M3 midpoint (1.0625, 1.1875) every block scale
    is a tie, in the normal and (k <= -7) the subnormal range; 1.75 reaches 448 exactly at k = 8."""
    g = torch.Generator().manual_seed(seed)
    exponents = torch.arange(-16, 9, dtype=torch.float32)
    magnitudes = 6.0 * torch.pow(2.0, exponents)
    blocks = (torch.rand(3, len(exponents), 16, generator=g) * 2 - 1) * magnitudes[:, None]
    blocks[:, :, 5] = magnitudes * torch.where(torch.rand(3, len(exponents), generator=g) < 0.5, -1.0, 1.0)
    return blocks.reshape(3, -1).to(dtype), torch.tensor([global_scale])


@pytest.mark.parametrize("global_scale", [1.0625, 1.1875, 1.25, 1.75])
def test_kernel_rounds_scale_ties_and_subnormal_scales_like_the_reference(global_scale):
    x, gs = scale_tie_input(global_scale, BF16)
    packed, scales = launch_nvfp4_quant(x, gs, None, "linear", TileShape(4, 512, 4))
    ref_packed, ref_scales = reference_nvfp4_quant(x, gs)
    assert torch.equal(packed, ref_packed)
    assert torch.equal(as_bytes(scales), as_bytes(ref_scales))


def test_default_tile_is_one_warp_with_two_scale_blocks_a_thread():
    assert default_tile(7168) == TileShape(2, 512, 1)
    assert default_tile(512) == TileShape(2, 512, 1)
    assert default_tile(256) == TileShape(4, 256, 1)  # narrower than the default tile: more rows
    assert default_tile(48) == TileShape(16, 64, 1)
    for cols in (16, 48, 100, 256, 512, 7168):
        tile = default_tile(cols)
        assert tile.block_m * tile.block_k == 32 * 32 * tile.num_warps  # 32 values (2 blocks) a thread


# The kernel reads x as 32-bit words (two elements) where rows are 4-byte aligned, else as 2-byte elements:
# (M, N, row stride, first column of x in its buffer, padded_n, dtype, word loads expected).
ROW_LAYOUT_CASES = [
    (129, 7152, 7152, 0, 7168, BF16, True),
    (129, 7152, 7152, 0, 7168, FP16, True),
    (9, 96, 113, 0, 128, BF16, False),  # odd row stride
    (9, 96, 113, 0, None, FP16, False),
    (6, 64, 98, 1, 96, BF16, False),  # even stride, base 2 bytes past a word
    (6, 64, 98, 1, 96, FP16, False),
    (5, 48, 70, 6, 64, FP16, True),  # strided rows starting on a word
    (1, 16, 16, 0, 32, BF16, True),
    (1, 32, 33, 0, None, FP16, True),  # one row: its stride is never used
    (1, 32, 33, 1, 64, BF16, False),
]
ROW_LAYOUT_IDS = [f"{c[0]}x{c[1]}-stride{c[2]}+{c[3]}-{str(c[5])[6:]}" for c in ROW_LAYOUT_CASES]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "m,n,stride,first_col,padded_n,dtype,word_loads",
    ROW_LAYOUT_CASES,
    ids=ROW_LAYOUT_IDS,
)
def test_kernel_reads_any_row_alignment_bit_identically(m, n, stride, first_col, padded_n, dtype, word_loads, layout):
    buffer = random_input(m, stride, dtype, seed=stride + first_col)
    x = buffer[:, first_col : first_col + n]
    assert x.stride() == (stride, 1)
    assert word_loads_possible(x) == word_loads
    gs = global_scale_of(x)
    # Small tiles (programs meet inside x) where the interpreter can afford them; the default for one row.
    tile = None if m == 1 else TileShape(32, 2048, 4) if n > 1024 else TileShape(4, 64, 2)
    packed, scales = launch_nvfp4_quant(x, gs, padded_n, layout, tile)
    ref_packed, ref_scales = reference_nvfp4_quant(x, gs, padded_n, layout)
    assert torch.equal(packed, ref_packed)
    assert torch.equal(as_bytes(scales), as_bytes(ref_scales))


# ---------------------------------------------------------------------------------------------
# validation and fake shapes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_args,message",
    [
        (lambda x, gs: (x, gs, 40), "padded_n \\(40\\) must be >= N"),
        (lambda x, gs: (x, gs, 72), "multiple of 16"),
        (lambda x, gs: (x[:, :40], gs, None), "positive multiple of 16"),
        (lambda x, gs: (x.float(), gs, None), "x must have dtype"),
        (lambda x, gs: (x.reshape(2, 2, 48), gs, None), "x must be 2-D"),
        (lambda x, gs: (x.t().contiguous().t(), gs, None), "unit stride along N"),
        (lambda x, gs: (x, gs.double(), None), "global_scale must be float32"),
        (lambda x, gs: (x, gs.expand(2), None), "one element"),
    ],
)
def test_invalid_arguments_raise_clear_errors(make_args, message):
    x = torch.randn(4, 48, dtype=torch.bfloat16)
    with pytest.raises(KernelInputError, match=message):
        quant(*make_args(x, torch.tensor([1.0])))


@pytest.mark.parametrize("layout,message", [("swizzled_8x4", "8x4 layout is not supported"), ("tiled", "one of")])
def test_unsupported_scale_layouts_are_refused(layout, message):
    with pytest.raises(KernelInputError, match=message):
        quant(torch.randn(4, 48, dtype=torch.bfloat16), torch.tensor([1.0]), None, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fake_impl_shapes_match_the_real_op(layout):
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, gs = torch.randn(130, 48, dtype=torch.bfloat16), torch.tensor([1.0])
    real = quant(x, gs, 96, layout)
    with FakeTensorMode() as mode:
        fake = quant(mode.from_tensor(x), mode.from_tensor(gs), 96, layout)
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in real]


def test_row_programs_cap_at_programs_per_sm_and_share_the_tiles_evenly():
    walking = TileShape(2, 1024, 2, programs_per_sm=8, stages=3)
    # 8 * 132 // 7 = 150 programs would leave some with 4 of the 512 row tiles and most with 3; 128 take 4 each.
    assert walking.row_programs(row_tiles=512, k_tiles=7, sm_count=132) == 128
    assert walking.row_programs(row_tiles=4096, k_tiles=7, sm_count=132) == 147  # 28 each, the last 8
    assert walking.row_programs(row_tiles=10, k_tiles=7, sm_count=132) == 10
    assert walking.row_programs(row_tiles=1000, k_tiles=2000, sm_count=132) == 1
    assert TileShape(4, 1024, 4).row_programs(row_tiles=1000, k_tiles=7, sm_count=132) == 1000
    with pytest.raises(ValueError, match="stages >= 1"):
        TileShape(4, 1024, 4, stages=0)
