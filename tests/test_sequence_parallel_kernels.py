"""The norm and FP8 quantization kernels of the sequence-parallel pass, in Triton's CPU interpreter,
against their plain-PyTorch references; input validation of the ops.

Triton's interpreter converts fp32 to bf16 by truncation (the GPU rounds to nearest even), so bf16
results are compared to within one bf16 step here and bit for bit in tests/gpu. The FP8 kernel
encodes its bytes with integer arithmetic and is compared bit for bit everywhere.
"""

from __future__ import annotations

import pytest
import torch

from fusionpasses.kernels.fp8_quant import launch_quant_fp8_static, reference_quant_fp8_static
from fusionpasses.kernels.library import KernelInputError
from fusionpasses.kernels.rms_norm import launch_rms_norm, reference_fused_add_rms_norm, reference_rms_norm

pytest.importorskip("triton")

fp = torch.ops.fusionpasses
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32

# (rtol, atol) of the kernel vs the reference: reduction order (fp32), one output rounding step (fp16),
# the interpreter's truncating bf16 cast.
TOLERANCE = {FP32: (1e-5, 1e-6), FP16: (1e-3, 1e-3), BF16: (1.6e-2, 1e-2)}


def _inputs(shape, dtype, weight_dtype=None, scale=1.0):
    x = (torch.randn(*shape) * scale).to(dtype)
    residual = torch.randn(*shape).to(dtype)
    weight = (1 + 0.5 * torch.randn(shape[-1])).to(weight_dtype or dtype)
    return x, residual, weight


def _assert_close(actual, expected):
    rtol, atol = TOLERANCE[expected.dtype]
    assert actual.shape == expected.shape and actual.dtype == expected.dtype and actual.is_contiguous()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [BF16, FP16, FP32], ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (4, 33), (2, 1000), (2, 3, 40)], ids=str)
def test_rms_norm_kernels_match_reference(shape, dtype):
    x, residual, weight = _inputs(shape, dtype, scale=3.0)
    out, none = launch_rms_norm(x, weight, 1e-6)
    assert none is None
    _assert_close(out, reference_rms_norm(x, weight, 1e-6))

    out, residual_out = launch_rms_norm(x, weight, 1e-6, residual=residual)
    expected_out, expected_residual = reference_fused_add_rms_norm(x, residual, weight, 1e-6)
    _assert_close(out, expected_out)
    if dtype == BF16:
        _assert_close(residual_out, expected_residual)
    else:  # numpy rounds fp16 and fp32 like the GPU: the sum is exact to the bit
        assert torch.equal(residual_out, expected_residual)


@pytest.mark.parametrize("shape,block", [((3, 100), 16), ((2, 40), 64), ((1, 33), 32)], ids=str)
def test_rms_norm_two_pass_loop(shape, block):
    """Rows longer than the block take the two-pass loop (the GPU path for hidden > 16384)."""
    x, residual, weight = _inputs(shape, FP16, weight_dtype=FP32)
    out, residual_out = launch_rms_norm(x, weight, 1e-5, residual=residual, block=block)
    expected_out, expected_residual = reference_fused_add_rms_norm(x, residual, weight, 1e-5)
    _assert_close(out, expected_out)
    assert torch.equal(residual_out, expected_residual)


def test_rms_norm_strided_rows_and_mixed_weight_dtype():
    wide = torch.randn(5, 64).to(FP16)
    x, residual = wide[:, :48], wide[:, 16:]
    weight = torch.randn(48, dtype=FP32)
    out, residual_out = launch_rms_norm(x, weight, 0.0, residual=residual)
    expected_out, expected_residual = reference_fused_add_rms_norm(x, residual, weight, 0.0)
    _assert_close(out, expected_out)
    assert torch.equal(residual_out, expected_residual)
    # Not the contiguous answer by accident: the two inputs overlap in memory with other rows.
    assert not torch.equal(out, reference_rms_norm(wide[:, 16:], weight, 0.0))


def test_rms_norm_empty_rows():
    x, residual, weight = _inputs((0, 8), BF16)
    out, residual_out = launch_rms_norm(x, weight, 1e-6, residual=residual)
    assert out.shape == (0, 8) and residual_out.shape == (0, 8)


def test_rms_norm_eps_reaches_the_kernel():
    x = torch.zeros(2, 16, dtype=FP32)
    x[0, 0] = 1e-3
    weight = torch.ones(16)
    small, _ = launch_rms_norm(x, weight, 1e-12)
    large, _ = launch_rms_norm(x, weight, 1.0)
    torch.testing.assert_close(small[0, 0], torch.tensor(4.0), rtol=1e-4, atol=0)  # 1e-3 / sqrt(1e-6 / 16)
    torch.testing.assert_close(large[0, 0], torch.tensor(1e-3), rtol=1e-4, atol=0)


# The interpreter's numpy division warns on the NaN and inf inputs; the results are checked below.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("scale", [1.0, 0.37, 3.0, 2.0**-10])
def test_quant_fp8_every_bf16_value_bit_exact(scale):
    x = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(BF16)  # NaN, inf, subnormals, all
    s = torch.tensor([scale])
    out = launch_quant_fp8_static(x, s)
    assert out.dtype == torch.float8_e4m3fn
    assert torch.equal(out.view(torch.uint8), reference_quant_fp8_static(x, s).view(torch.uint8))


@pytest.mark.parametrize("dtype", [FP16, FP32], ids=str)
def test_quant_fp8_ties_subnormals_and_saturation_bit_exact(dtype):
    # Exact ties between E4M3 neighbours (both parities), the subnormal/normal boundary, values just
    # below 448, beyond it, and the special values.
    ties = torch.tensor([200.0, 208.0 + 8, 13.0 - 0.5, 12.5, 2.0**-7 + 2.0**-10, 3 * 2.0**-10, 2.0**-6 - 2.0**-10])
    special = torch.tensor([0.0, -0.0, 447.0, 448.0, 449.0, 1e6, -1e6, float("inf"), -float("inf"), float("nan")])
    x = torch.cat([ties, -ties, special, torch.randn(3000) * 100, torch.randn(300) * 1e-3]).to(dtype)
    s = torch.tensor([1.0])
    expected = reference_quant_fp8_static(x, s)
    assert torch.equal(launch_quant_fp8_static(x, s).view(torch.uint8), expected.view(torch.uint8))


def test_quant_fp8_non_contiguous_input_keeps_shape():
    x = torch.randn(16, 24, dtype=BF16).t()
    s = torch.tensor([0.05])
    out = launch_quant_fp8_static(x, s)
    assert out.shape == (24, 16) and out.is_contiguous()
    assert torch.equal(out.view(torch.uint8), reference_quant_fp8_static(x, s).view(torch.uint8))


# ---- validation (the CPU ops run the same checks as the GPU ops) --------------------------------


@pytest.mark.parametrize(
    "make_args,message",
    [
        (lambda: (torch.randn(2, 8, dtype=BF16), torch.randn(7, dtype=BF16), 1e-6), "weight must have H"),
        (lambda: (torch.randn(2, 8).to(torch.int32), torch.randn(8), 1e-6), "x must have dtype"),
        (lambda: (torch.randn(2, 8, dtype=BF16), torch.randn(2, 8, dtype=BF16), 1e-6), "weight must be 1-D"),
        (lambda: (torch.randn(2, 8, dtype=BF16), torch.randn(8, dtype=BF16), -1.0), "eps must be finite and >= 0"),
    ],
)
def test_rms_norm_validation(make_args, message):
    with pytest.raises(KernelInputError, match=message):
        fp.rms_norm(*make_args())


def test_fused_add_rms_norm_validation():
    x, weight = torch.randn(2, 8, dtype=BF16), torch.randn(8, dtype=BF16)
    with pytest.raises(KernelInputError, match="fused_add_rms_norm: residual must match x"):
        fp.fused_add_rms_norm(x, torch.randn(2, 8, dtype=FP16), weight, 1e-6)
    with pytest.raises(KernelInputError, match="residual must match x"):
        fp.fused_add_rms_norm(x, torch.randn(4, 8, dtype=BF16), weight, 1e-6)


@pytest.mark.parametrize(
    "scale,message",
    [
        (torch.tensor([0.5, 0.5]), "scale must be a tensor-wise scale"),
        (torch.tensor([0.5], dtype=BF16), "scale must be float32"),
    ],
)
def test_quant_fp8_validation(scale, message):
    with pytest.raises(KernelInputError, match=message):
        fp.quant_fp8_static(torch.randn(2, 8, dtype=BF16), scale)


def test_quant_fp8_rejects_integer_input():
    with pytest.raises(KernelInputError, match="x must have dtype"):
        fp.quant_fp8_static(torch.ones(2, 8, dtype=torch.int32), torch.tensor([1.0]))
