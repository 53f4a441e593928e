"""Block-scaled FP8 GEMM on a Hopper GPU: the Triton kernel against the reference, every tile shape,
the M alignment, and the torch.cond dispatch and the cond_padding pass compiled with one graph.

    python -m pytest -q tests/gpu/test_block_fp8.py
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F
from fusionpasses.kernels import block_fp8_gemm as bf
from fusionpasses.kernels.library import KernelInputError

from fusionpasses import FusionConfig, PassManager
from tests.test_block_fp8_gemm import branch_checked_calls, spy_on_gemms

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _hopper():
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the kernel uses TMA and fp8 wgmma: needs sm90 or newer")


def random_operands(M: int, N: int, K: int, row_stride: int | None = None):
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
    A, A_scale_t = bf.quantize_activation_blockwise(x, row_stride)
    B, B_scale = bf.quantize_weight_blockwise(w)
    return A, B, A_scale_t, B_scale


def exact_operands(M: int, N: int, K: int, row_stride: int | None = None):
    """Small integers and power-of-two scales: every sum is exact in fp32 in any order, so the kernel and
    the reference reach the same fp32 value and round it to float16 the same way."""
    A = torch.randint(-2, 3, (M, K), device="cuda").float().to(torch.float8_e4m3fn)
    B = torch.randint(-2, 3, (N, K), device="cuda").float().to(torch.float8_e4m3fn)
    A_scale_t = torch.zeros(K // 128, row_stride or M, device="cuda")[:, :M]
    A_scale_t.copy_(2.0 ** torch.randint(-3, 1, (K // 128, M), device="cuda").float())
    B_scale = 2.0 ** torch.randint(-3, 1, (-(-N // 128), K // 128), device="cuda").float()
    return A, B, A_scale_t, B_scale


def assert_close_to_reference(out: torch.Tensor, A, B, A_scale_t, B_scale) -> None:
    ref = bf.reference_block_fp8_mm(A, B, A_scale_t, B_scale, out.dtype)
    # The fp8 MMA sums each 128-wide group in its own order and precision; one bf16 ulp apart at most.
    torch.testing.assert_close(out, ref, rtol=2**-7, atol=1e-3 * ref.abs().max().item())


@pytest.mark.parametrize(
    "M,N,K",
    [(1, 2048, 7168), (4, 7168, 2048), (128, 2048, 7168), (1000, 18432, 512), (4096, 2048, 1024), (260, 200, 384)],
)
def test_direct_op_matches_reference(M, N, K):
    args = random_operands(M, N, K, row_stride=-(-M // 4) * 4)  # padded scale rows for M = 1
    out = torch.ops.fusionpasses.block_fp8_mm(*args, torch.bfloat16)
    assert_close_to_reference(out, *args)


# Every compile-time variant scripts/bench_block_fp8.py --sweep times (any of them may become a rule).
SCALE_VARIANTS = {
    "tma": {"SCALE_LOAD": bf.SCALE_TMA},
    "ptr": {"SCALE_LOAD": bf.SCALE_PTR},
}
TILES = [(64, 64, 4, 4), (64, 128, 4, 4), (128, 64, 8, 4), (128, 128, 8, 3), (128, 128, 4, 5), (128, 256, 8, 3),
         (64, 256, 4, 4)]


def _launch_exact(M, N, K, row_stride, config):
    A, B, A_scale_t, B_scale = exact_operands(M, N, K, row_stride)
    out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.float16)
    bf.launch_block_fp8_mm(A, B, A_scale_t, B_scale, out, config)
    return out, bf.reference_block_fp8_mm(A, B, A_scale_t, B_scale, torch.float16)


# Each case compiles a kernel (~1-2 s): every tile unsplit, split-K on the small-M tiles only.
VARIANT_CASES = [(tile, 1) for tile in TILES] + [(TILES[0], 4), (TILES[2], 4)]


@pytest.mark.parametrize("scale", list(SCALE_VARIANTS))
@pytest.mark.parametrize("tile,split_k", VARIANT_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("M,N,K,row_stride", [(3, 136, 896, 4), (300, 392, 2304, None)])
def test_every_variant_is_exact(scale, tile, split_k, M, N, K, row_stride):
    block_m, block_n, num_warps, num_stages = tile
    config = bf.launch_config(M, N, K, 132, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
                              num_stages=num_stages, SPLIT_K=split_k, **SCALE_VARIANTS[scale])
    out, reference = _launch_exact(M, N, K, row_stride, config)
    assert torch.equal(out, reference)


@pytest.mark.parametrize("scale", ["tma", "ptr"])
def test_warp_specialized_loop_is_exact(scale):
    """Triton's automatic warp specialization may not support this loop on sm90 in every release: a
    compile failure skips (the sweep reports it too); a kernel that runs must be exact."""
    config = bf.launch_config(300, 392, 2304, 132, WARP_SPECIALIZE=True, **SCALE_VARIANTS[scale])
    try:
        out, reference = _launch_exact(300, 392, 2304, None, config)
    except Exception as error:
        # Front-end errors are CompilationError, MLIR pass failures a RuntimeError naming the PassManager.
        if "CompilationError" not in type(error).__name__ and "PassManager" not in str(error):
            raise
        pytest.skip(f"warp_specialize does not compile here: {type(error).__name__}")
    assert torch.equal(out, reference)


def test_unaligned_scale_rows_are_rejected_and_padded_rows_accepted():
    A, B, A_scale_t, B_scale = random_operands(5, 256, 256)
    with pytest.raises(KernelInputError, match="multiple of 4"):
        torch.ops.fusionpasses.block_fp8_mm(A, B, A_scale_t, B_scale, torch.bfloat16)
    A, B, A_scale_t, B_scale = random_operands(5, 256, 256, row_stride=8)
    assert_close_to_reference(torch.ops.fusionpasses.block_fp8_mm(A, B, A_scale_t, B_scale, torch.bfloat16),
                              A, B, A_scale_t, B_scale)


@pytest.mark.parametrize("M", [1, 6, 8])
def test_padded_op_and_any_m_match_reference(M):
    args = random_operands(M, 512, 1024)
    padded = torch.ops.fusionpasses.block_fp8_mm_padded(*args, torch.bfloat16)
    assert_close_to_reference(padded, *args)
    assert torch.equal(bf.block_fp8_mm_any_m(*args), padded)


def pad_mm(A, B, A_scale_t, B_scale):
    """What callers did before: pad every M, run the fast path, slice back."""
    torch._check(A_scale_t.shape[1] == A.shape[0])
    M = A.shape[0]
    pad = (-M) % 4
    out = torch.ops.fusionpasses.block_fp8_mm(F.pad(A, (0, 0, 0, pad)), B, F.pad(A_scale_t, (0, pad)), B_scale,
                                              torch.bfloat16)
    return out[:M]


@pytest.mark.parametrize("program", ["any_m", "pass"])
def test_compiled_cond_serves_every_m_from_one_graph(program):
    fn = bf.block_fp8_mm_any_m if program == "any_m" else pad_mm
    manager = PassManager(FusionConfig(cond_padding=True))
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    _, B, _, B_scale = random_operands(4, 256, 512)

    def activations(M: int) -> tuple[torch.Tensor, torch.Tensor]:
        A, _, A_scale_t, _ = random_operands(M, 256, 512)
        return A, A_scale_t

    patch, calls, caller_ptr = spy_on_gemms("launch_block_fp8_mm")
    # No FX graph cache: a cache hit would skip the pass, whose stats the test reads.
    with torch._inductor.config.patch(post_grad_custom_post_pass=manager, fx_graph_cache=False), patch:
        compiled = torch.compile(fn, backend=counter, fullgraph=True)
        for M, A, A_scale_t, out in branch_checked_calls(compiled, B, B_scale, activations, calls, caller_ptr):
            assert torch.equal(out, bf.block_fp8_mm_any_m(A, B, A_scale_t, B_scale)), f"M={M}"
            assert_close_to_reference(out, A, B, A_scale_t, B_scale)
    assert counter.frame_count == 1
    if program == "pass":
        assert manager.pass_by_name("cond_padding").stats.matched == 1
