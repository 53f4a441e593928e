"""The sequence-parallel pass's kernels on one GPU: ``pytest -q tests/gpu/test_sequence_parallel_kernels.py``.

The GPU rounds to nearest even where Triton's CPU interpreter does not, so here the residual sum and
the FP8 bytes must equal the references bit for bit; the normalized output differs from the
reference only by the order of the fp32 row reduction.
"""

from __future__ import annotations

import pytest
import torch

from fusionpasses.kernels.fp8_quant import reference_quant_fp8_static
from fusionpasses.kernels.rms_norm import MAX_ONE_PASS_BLOCK, reference_fused_add_rms_norm, reference_rms_norm

pytestmark = pytest.mark.gpu

fp = torch.ops.fusionpasses
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
TOLERANCE = {FP32: (1e-5, 1e-5), FP16: (2e-3, 2e-3), BF16: (1.6e-2, 1e-2)}


def _randn(*shape, dtype, seed, scale=1.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(*shape, device="cuda", generator=g) * scale).to(dtype)


@pytest.mark.parametrize("dtype", [BF16, FP16, FP32], ids=str)
@pytest.mark.parametrize(
    "shape",
    [(1, 1), (7, 33), (4096, 8192), (3, 5120), (2, 3, 1000), (5, MAX_ONE_PASS_BLOCK + 3), (64, 28672)],
    ids=str,
)
def test_rms_norm_ops_match_reference(shape, dtype):
    x = _randn(*shape, dtype=dtype, seed=1, scale=4.0)
    residual = _randn(*shape, dtype=dtype, seed=2)
    weight = 1 + 0.1 * _randn(shape[-1], dtype=dtype, seed=3)
    rtol, atol = TOLERANCE[dtype]

    out = fp.rms_norm(x, weight, 1e-6)
    torch.testing.assert_close(out, reference_rms_norm(x, weight, 1e-6), rtol=rtol, atol=atol)

    out, residual_out = fp.fused_add_rms_norm(x, residual, weight, 1e-5)
    expected_out, expected_residual = reference_fused_add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(residual_out, expected_residual)
    torch.testing.assert_close(out, expected_out, rtol=rtol, atol=atol)
    assert out.is_contiguous() and residual_out.is_contiguous()


def test_rms_norm_strided_rows_fp32_weight():
    wide = _randn(300, 8200, dtype=BF16, seed=4)
    x, residual = wide[:, :8192], wide[:, 8:]
    weight = _randn(8192, dtype=FP32, seed=5)
    out, residual_out = fp.fused_add_rms_norm(x, residual, weight, 1e-6)
    expected_out, expected_residual = reference_fused_add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(residual_out, expected_residual)
    torch.testing.assert_close(out, expected_out, rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("scale", [1.0, 0.37, 2.0**-10])
def test_quant_fp8_every_bf16_value_bit_exact(scale):
    x = torch.arange(1 << 16, dtype=torch.int32, device="cuda").to(torch.int16).view(BF16)
    s = torch.tensor([scale], device="cuda")
    out = fp.quant_fp8_static(x, s)
    assert torch.equal(out.view(torch.uint8), reference_quant_fp8_static(x, s).view(torch.uint8))


@pytest.mark.parametrize("dtype", [BF16, FP16, FP32], ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (8192, 8192), (33, 1001), (2, 3, 7)], ids=str)
def test_quant_fp8_matches_reference_bit_for_bit(shape, dtype):
    x = _randn(*shape, dtype=dtype, seed=6, scale=300.0)
    s = torch.tensor([0.731], device="cuda")
    out = fp.quant_fp8_static(x, s)
    assert out.shape == x.shape and out.dtype == torch.float8_e4m3fn
    assert torch.equal(out.view(torch.uint8), reference_quant_fp8_static(x, s).view(torch.uint8))


def test_quant_fp8_non_contiguous():
    x = _randn(256, 96, dtype=BF16, seed=7, scale=50.0).t()
    s = torch.tensor([0.2], device="cuda")
    assert torch.equal(fp.quant_fp8_static(x, s).view(torch.uint8), reference_quant_fp8_static(x, s).view(torch.uint8))


def test_ops_compile_into_a_graph():
    """Inductor keeps the ops as extern calls with the right layouts (fake impls agree with the kernels)."""

    def f(x, residual, weight, scale):
        out, residual_out = fp.fused_add_rms_norm(x, residual, weight, 1e-6)
        return fp.quant_fp8_static(fp.rms_norm(out, weight, 1e-6), scale), residual_out

    x, residual = _randn(64, 512, dtype=BF16, seed=8), _randn(64, 512, dtype=BF16, seed=9)
    weight = _randn(512, dtype=BF16, seed=10)
    scale = torch.tensor([0.05], device="cuda")
    q, r = torch.compile(f, fullgraph=True)(x, residual, weight, scale)
    eq, er = f(x, residual, weight, scale)
    assert torch.equal(q.view(torch.uint8), eq.view(torch.uint8)) and torch.equal(r, er)
