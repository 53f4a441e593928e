"""NVFP4 quantization on one GPU: the Triton kernel bit for bit against the CPU reference, its padding, and
the pad-folding pass under torch.compile.

    python -m pytest -q tests/gpu/test_nvfp4_quant.py

The reference runs on the CPU (its divisions are IEEE there); inputs are fresh random tensors on the GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fusionpasses import FusionConfig, PassManager
from fusionpasses.kernels.nvfp4_quant import (
    CANDIDATE_TILES,
    TileShape,
    launch_nvfp4_quant,
    reference_nvfp4_quant,
    unswizzle_scales,
    word_loads_possible,
)
from tests.test_nvfp4_quant import (
    ROW_LAYOUT_CASES,
    ROW_LAYOUT_IDS,
    SEED_SHAPES,
    as_bytes,
    encode_pairs,
    expected_pair_bytes,
    global_scale_of,
    midpoint_neighbourhood,
    nan_input,
    round_up,
    scale_tie_input,
)

pytestmark = pytest.mark.gpu

quant = torch.ops.fusionpasses.nvfp4_quant
LAYOUTS = ["linear", "swizzled"]
# The seed's shapes, M = 1, odd M, M > 128 not a multiple of 128, N not a multiple of 64, and sizes of the
# benchmark (the default tile shrinks to one row per program for small M).
SHAPES = [*SEED_SHAPES, (1, 16), (7, 208), (257, 112), (130, 304), (16, 14336), (1024, 7152), (2048, 7168)]


def cuda_input(m: int, n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    scale = torch.logspace(-3, 2, m, device="cuda").unsqueeze(1)
    return (torch.randn(m, n, generator=g, device="cuda") * scale).to(dtype)


def assert_matches_cpu_reference(
    x: torch.Tensor, gs: torch.Tensor, padded_n: int | None, layout: str, tile: TileShape | None = None
) -> None:
    packed, scales = launch_nvfp4_quant(x, gs, padded_n, layout, tile)
    ref_packed, ref_scales = reference_nvfp4_quant(x.cpu(), gs.cpu(), padded_n, layout)
    assert packed.shape == ref_packed.shape and scales.shape == ref_scales.shape
    mismatched = (packed.cpu() != ref_packed).sum().item()
    assert mismatched == 0, f"{mismatched} of {packed.numel()} packed bytes differ"
    assert torch.equal(as_bytes(scales).cpu(), as_bytes(ref_scales))


FP16_SHAPES = [*SEED_SHAPES, (1, 16), (129, 7152), (1024, 7152)]
CASES = [(m, n, torch.bfloat16) for m, n in SHAPES] + [(m, n, torch.float16) for m, n in FP16_SHAPES]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("m,n,dtype", CASES, ids=[f"{m}x{n}-{str(d)[6:]}" for m, n, d in CASES])
def test_kernel_is_bit_identical_to_reference(m, n, dtype, layout):
    x = cuda_input(m, n, dtype, seed=m + n)
    gs = global_scale_of(x)
    assert_matches_cpu_reference(x, gs, round_up(n, 32) if n % 32 else None, layout)
    assert_matches_cpu_reference(x, gs, round_up(n, 32) + 64, layout)


def test_pair_encoder_on_every_float32_up_to_24_in_magnitude():
    # The PTX encoder against the reference's E2M1 rounding on all 1.1e9 float32 magnitudes in [0, 24]
    # (every tie and every neighbour of one), each as a low and as a high value, with random signs.
    top = torch.tensor(24.0).view(torch.int32).item()
    chunk = 1 << 27
    g = torch.Generator(device="cuda").manual_seed(0)
    for start in range(0, top + 1, chunk):
        magnitudes = torch.arange(start, min(start + chunk, top + 1), device="cuda", dtype=torch.int32).view(torch.float32)
        signs = torch.where(torch.rand(magnitudes.shape, generator=g, device="cuda") < 0.5, -1.0, 1.0)
        low, high = magnitudes * signs, magnitudes.flip(0) * -signs
        mismatched = (encode_pairs(low, high) != expected_pair_bytes(low, high)).sum().item()
        assert mismatched == 0, f"{mismatched} pairs differ among magnitudes from bits {start:#x}"
    low = midpoint_neighbourhood(ulps=64).cuda()
    assert torch.equal(encode_pairs(-low, low), expected_pair_bytes(-low, low))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nan_inputs_match_the_reference(dtype):
    assert_matches_cpu_reference(nan_input(dtype).cuda(), torch.tensor([1.0], device="cuda"), 128, "swizzled")


@pytest.mark.parametrize("global_scale", [1.0625, 1.1875, 1.25, 1.75])
def test_hardware_e4m3_rounding_of_tied_and_subnormal_scales(global_scale):
    # On the GPU the block scales go through Triton's fp32 -> fp8e4nv cast (cvt.rn.satfinite).
    x, gs = scale_tie_input(global_scale, torch.bfloat16)
    assert_matches_cpu_reference(x.cuda(), gs.cuda(), None, "linear")


@pytest.mark.parametrize("m", [16, 128, 1024, 8192])
@pytest.mark.parametrize("n", [7152, 7168, 14336])
def test_padded_is_the_unpadded_result_plus_zeros(m, n):
    x = cuda_input(m, n, torch.bfloat16, seed=m * n)
    gs = global_scale_of(x)
    padded_n = round_up(n, 32) + 32
    packed, scales = quant(x, gs, padded_n, "swizzled")
    ref_packed, ref_scales = quant(x, gs, None, "swizzled")
    assert torch.equal(packed[:, : n // 2], ref_packed)
    assert torch.count_nonzero(packed[:, n // 2:]) == 0
    linear = unswizzle_scales(scales, scales.shape[0], scales.shape[1])
    assert torch.equal(as_bytes(linear[:m, : n // 16]), as_bytes(unswizzle_scales(ref_scales, m, n // 16)))
    assert torch.count_nonzero(as_bytes(linear)[:, n // 16:]) == 0
    assert torch.count_nonzero(as_bytes(linear)[m:]) == 0


@pytest.fixture(scope="module")
def tile_test_case():
    """An input with odd M, a partial last K tile and enough row tiles that walking programs take several
    each, with its CPU references (computed once: they take seconds at this size)."""
    x = cuda_input(2001, 7152, torch.bfloat16, seed=11)
    gs = global_scale_of(x)
    references = {
        (7168, "swizzled"): reference_nvfp4_quant(x.cpu(), gs.cpu(), 7168, "swizzled"),
        (None, "linear"): reference_nvfp4_quant(x.cpu(), gs.cpu(), None, "linear"),
    }
    return x, gs, references


def tile_id(tile: TileShape) -> str:
    walk = f"-{tile.programs_per_sm}perSM-s{tile.stages}" if tile.programs_per_sm else ""
    return f"{tile.block_m}x{tile.block_k}w{tile.num_warps}{walk}"


@pytest.mark.parametrize("tile", CANDIDATE_TILES, ids=tile_id)
def test_every_candidate_tile_is_bit_identical(tile, tile_test_case):
    # Any of these may become the default after a sweep.
    x, gs, references = tile_test_case
    for (padded_n, layout), (ref_packed, ref_scales) in references.items():
        packed, scales = launch_nvfp4_quant(x, gs, padded_n, layout, tile)
        mismatched = (packed.cpu() != ref_packed).sum().item()
        assert mismatched == 0, f"{layout}: {mismatched} of {packed.numel()} packed bytes differ"
        assert torch.equal(as_bytes(scales).cpu(), as_bytes(ref_scales)), layout


@pytest.mark.parametrize("layout", LAYOUTS)
def test_more_row_tiles_than_one_grid_axis_holds(layout):
    # 70000 one-row tiles: the row programs spill from grid axis 1 (65535 at most) into axis 2.
    x = cuda_input(70000, 32, torch.bfloat16, seed=3)
    assert_matches_cpu_reference(x, global_scale_of(x), 64, layout, TileShape(1, 32, 1))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "m,n,stride,first_col,padded_n,dtype,word_loads",
    ROW_LAYOUT_CASES,
    ids=ROW_LAYOUT_IDS,
)
def test_word_loads_and_their_fallback(m, n, stride, first_col, padded_n, dtype, word_loads, layout):
    # Word loads need 4-byte aligned rows; an odd row stride or a base 2 bytes past a word takes 2-byte loads.
    x = cuda_input(m, stride, dtype, seed=stride)[:, first_col : first_col + n]
    assert word_loads_possible(x) == word_loads
    assert_matches_cpu_reference(x, global_scale_of(x), padded_n, layout)


def test_strided_rows():
    wide = cuda_input(33, 512, torch.bfloat16, seed=7)
    x = wide[:, 128:336]
    assert_matches_cpu_reference(x, global_scale_of(x), 224, "swizzled")


def test_cuda_graph_replay_quantizes_new_inputs():
    x = cuda_input(256, 7152, torch.bfloat16, seed=1)
    gs = global_scale_of(x)
    quant(x, gs, 7168, "swizzled")  # compile the kernel outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        packed, scales = quant(x, gs, 7168, "swizzled")
    x.copy_(cuda_input(256, 7152, torch.bfloat16, seed=2))
    graph.replay()
    expected = quant(x, gs, 7168, "swizzled")
    assert torch.equal(packed, expected[0]) and torch.equal(as_bytes(scales), as_bytes(expected[1]))


def test_compiled_pass_folds_the_pad_and_matches_eager():
    def fn(x, gs):
        packed, scales = quant(x, gs, None, "swizzled")
        return F.pad(packed, (0, 8)), scales

    manager = PassManager(FusionConfig(nvfp4_pad_fold=True))
    options = {"post_grad_custom_post_pass": manager, "fx_graph_cache": False}
    compiled = torch.compile(fn, options=options, fullgraph=True)
    x = cuda_input(300, 7152, torch.bfloat16, seed=3)
    gs = global_scale_of(x)
    got, expected = compiled(x, gs), fn(x, gs)
    assert manager.pass_by_name("nvfp4_pad_fold").stats.matched == 1
    assert torch.equal(got[0], expected[0])
    assert torch.equal(as_bytes(got[1]), as_bytes(expected[1]))
