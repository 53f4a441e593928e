"""cuBLASLt's FP8 GEMM adding onto C (the two-rank reduce_scatter's own GEMM) on one GPU:
``pytest -q tests/gpu/test_scaled_mm_accumulate.py``."""

from __future__ import annotations

import pytest
import torch

from fusionpasses.kernels.scaled_mm_accumulate import scaled_mm_accumulate_

pytestmark = pytest.mark.gpu

FP8 = torch.float8_e4m3fn


def _operands(m, k, n, out_dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = (torch.randn(m, k, device="cuda", generator=g) * 2).to(FP8)
    w = (torch.randn(n, k, device="cuda", generator=g) * 2).to(FP8)
    sa = torch.tensor([0.5 / k**0.5], device="cuda")
    sb = torch.tensor([0.25], device="cuda")
    c = torch.randn(m, n, device="cuda", generator=g).to(out_dtype)
    return a, w, sa, sb, c


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("m,k,n", [(1, 16, 16), (17, 64, 48), (256, 512, 384), (1000, 4096, 1024), (4096, 8192, 7168)])
@pytest.mark.parametrize("fast_accum", [False, True], ids=["promoted", "fast-accum"])
def test_adds_the_scaled_product_onto_c(m, k, n, out_dtype, fast_accum):
    a, w, sa, sb, c = _operands(m, k, n, out_dtype, seed=m + k + n)
    want = (a.float() @ w.float().t() * (sa * sb) + c.float()).to(out_dtype)
    # The unfused graph: torch._scaled_mm, then a separate add (two roundings).
    two_roundings = torch._scaled_mm(a, w.t(), sa, sb, out_dtype=out_dtype, use_fast_accum=fast_accum) + c
    got = scaled_mm_accumulate_(a, w.t(), sa, sb, c.clone(), use_fast_accum=fast_accum)
    torch.testing.assert_close(got.float(), want.float(), rtol=1.6e-2, atol=2e-2)
    assert (got != c).any(), "the product was not added"
    # cuBLASLt's FP8 epilogue rounds the scaled product to C's type before it adds C (measured with
    # cuBLAS 13 on H200: every element, where a single rounding would differ in about 24% of them), so
    # the two-rank reduce_scatter that adds in its GEMM gives the unfused sum bit for bit. Should a
    # cuBLAS change that, the results stay within FP8 tolerance (above) but stop matching bitwise.
    assert torch.equal(got, two_roundings), f"{(got != two_roundings).float().mean().item():.2%} of elements differ"


def test_row_slices_at_any_alignment_and_in_a_cuda_graph():
    # The pipeline passes row pieces of its buffers; the second piece of 3 rows starts 3 * 48 bytes in.
    a, w, sa, sb, c = _operands(6, 64, 48, torch.bfloat16, seed=3)
    want = (a.float() @ w.float().t() * (sa * sb) + c.float()).bfloat16()
    got = c.clone()
    for rows in (slice(0, 3), slice(3, 6)):
        scaled_mm_accumulate_(a[rows], w.t(), sa, sb, got[rows])
    torch.testing.assert_close(got.float(), want.float(), rtol=1.6e-2, atol=2e-2)

    replayed = c.clone()
    scaled_mm_accumulate_(a, w.t(), sa, sb, c.clone())  # plan and workspace made outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        scaled_mm_accumulate_(a, w.t(), sa, sb, replayed)
    replayed.copy_(c)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(replayed.float(), want.float(), rtol=1.6e-2, atol=2e-2)
