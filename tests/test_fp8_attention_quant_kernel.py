"""fusionpasses.qkv_fp8_quant: the Triton kernel (CPU interpreter) bit for bit against the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from fusionpasses.kernels import KernelInputError
from fusionpasses.kernels.qkv_fp8_quant import (
    FP8_DTYPE,
    padded_head_dim,
    quantize_pad_fp8,
    reference_qkv_fp8_quant,
)


def assert_same_fp8(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal shapes, NaN at the same places, every other byte identical."""
    assert actual.dtype == expected.dtype == FP8_DTYPE
    assert actual.shape == expected.shape
    nan_a, nan_e = torch.isnan(actual.float()), torch.isnan(expected.float())
    assert torch.equal(nan_a, nan_e), "NaN positions differ"
    a, e = actual.view(torch.uint8)[~nan_a], expected.view(torch.uint8)[~nan_e]
    mismatches = (a != e).nonzero().flatten()
    assert mismatches.numel() == 0, (
        f"{mismatches.numel()} of {a.numel()} bytes differ, first at {mismatches[:5].tolist()}: "
        f"{a[mismatches[:5]].tolist()} vs {e[mismatches[:5]].tolist()}"
    )


def spread_values(shape: tuple[int, ...], dtype: torch.dtype, seed: int, device: str = "cpu") -> torch.Tensor:
    """Magnitudes over many octaves, so that with scale 0.01 the results cover e4m3 subnormals,
    normals and saturation."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g) * 3)
    return x.to(device=device, dtype=dtype)


def make_view(
    layout: str, seq: int, heads: int, head_dim: int, dtype: torch.dtype, seed: int, device: str = "cpu"
) -> torch.Tensor:
    """A (S, H, D) or (B, S, H, D) input laid out the way models produce it (views made on ``device``)."""

    def values(*shape: int) -> torch.Tensor:
        return spread_values(shape, dtype, seed, device)

    if layout == "contiguous":
        return values(seq, heads, head_dim)
    if layout == "qkv_view":  # q of a fused projection: qkv.view(S, 3, H, D)[:, 0]
        return values(seq, 3, heads, head_dim)[:, 1]
    if layout == "qkv_view_4d":  # (B, S, 3, H, D)[:, :, 2]
        return values(2, seq, 3, heads, head_dim)[:, :, 2]
    if layout == "heads_major":  # (H, S, D).transpose(0, 1): token stride smaller than head stride
        return values(heads, seq, head_dim).transpose(0, 1)
    if layout == "batch_inner_4d":  # (S, B, H, D).transpose(0, 1)
        return values(seq, 2, heads, head_dim).transpose(0, 1)
    if layout == "strided_head_dim":  # every other element of the last dim
        return values(seq, heads, 2 * head_dim)[..., ::2]
    raise ValueError(layout)


CASES = [
    # layout, S, H, D, dtype, pad
    ("qkv_view", 33, 3, 72, torch.bfloat16, None),
    ("qkv_view", 7, 2, 80, torch.bfloat16, None),
    ("qkv_view", 5, 2, 64, torch.float16, None),
    ("qkv_view", 3, 1, 128, torch.bfloat16, None),
    ("qkv_view_4d", 9, 3, 72, torch.bfloat16, None),
    ("contiguous", 1, 1, 1, torch.float32, None),
    ("contiguous", 7, 3, 17, torch.float16, None),
    ("contiguous", 33, 3, 72, torch.float32, None),
    ("contiguous", 4, 2, 16, torch.bfloat16, 5),
    ("contiguous", 5, 2, 72, torch.bfloat16, 0),
    ("heads_major", 17, 3, 40, torch.bfloat16, None),
    ("batch_inner_4d", 6, 2, 24, torch.float16, None),
    ("strided_head_dim", 5, 2, 36, torch.bfloat16, 3),
]


@pytest.mark.parametrize("layout,seq,heads,head_dim,dtype,pad", CASES, ids=lambda v: str(v).removeprefix("torch."))
def test_kernel_matches_reference_bitwise(layout, seq, heads, head_dim, dtype, pad):
    x = make_view(layout, seq, heads, head_dim, dtype, seed=seq * 1000 + head_dim)
    scale = torch.tensor([0.01])
    out = quantize_pad_fp8(x, scale, pad)
    expected = reference_qkv_fp8_quant(x, scale, pad)
    assert out.shape == (*x.shape[:-1], padded_head_dim(head_dim, pad))
    assert out.is_contiguous()
    assert_same_fp8(out, expected)
    assert torch.all(out[..., head_dim:].view(torch.uint8) == 0), "the pad must be +0"


def test_rounding_ties_subnormals_and_specials():
    """Every e4m3 value, the midpoints between neighbours (ties round to even) and values just off
    them, NaN, infinities and values beyond ±448, through both kernel paths."""
    grid = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).float()
    grid = grid[~torch.isnan(grid)].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e-30, -1e-30, -0.0, 449.0, -1e6, 464.0])
    values = torch.cat([grid, mids, mids * (1 + 1e-6), mids * (1 - 1e-6), specials])
    values = values[: values.numel() // 16 * 16].reshape(-1, 1, 16)
    scale = torch.tensor([1.0])
    expected = reference_qkv_fp8_quant(values, scale)
    for path in ("rows", "flat"):
        assert_same_fp8(quantize_pad_fp8(values, scale, path=path), expected)


def test_flat_and_rows_paths_agree_on_contiguous_aligned_input():
    x = spread_values((2, 9, 3, 64), torch.bfloat16, seed=3)
    scale = torch.tensor([0.02])
    assert_same_fp8(quantize_pad_fp8(x, scale, path="flat"), quantize_pad_fp8(x, scale, path="rows"))


@pytest.mark.filterwarnings("ignore:divide by zero", "ignore:invalid value")  # numpy, inside the interpreter
def test_pad_is_zero_even_for_a_zero_scale():
    x = spread_values((3, 2, 72), torch.bfloat16, seed=4)
    out = quantize_pad_fp8(x, torch.tensor([0.0]))
    assert torch.all(out[..., 72:].view(torch.uint8) == 0)
    assert_same_fp8(out, reference_qkv_fp8_quant(x, torch.tensor([0.0])))


def test_scale_shapes_with_one_element_are_accepted():
    x = spread_values((3, 2, 24), torch.float16, seed=5)
    for scale in (torch.tensor(0.05), torch.tensor([0.05]), torch.full((1, 1, 1, 1), 0.05)):
        assert_same_fp8(quantize_pad_fp8(x, scale), reference_qkv_fp8_quant(x, scale))


def test_empty_sequence():
    x = torch.empty(0, 3, 72, dtype=torch.bfloat16)
    out = quantize_pad_fp8(x, torch.tensor([1.0]))
    assert out.shape == (0, 3, 80) and out.dtype == FP8_DTYPE


def test_op_on_cpu_is_the_reference():
    qkv = spread_values((5, 3, 2, 72), torch.bfloat16, seed=6)
    scale = torch.tensor([0.03])
    out = torch.ops.fusionpasses.qkv_fp8_quant(qkv[:, 1], scale)
    assert_same_fp8(out, reference_qkv_fp8_quant(qkv[:, 1], scale))
    composite = F.pad((qkv[:, 1].float() / scale).clamp(-448, 448).to(FP8_DTYPE), (0, 8))
    assert_same_fp8(out, composite)


@pytest.mark.parametrize(
    "x,scale,pad,message",
    [
        (torch.randn(4, 72), torch.tensor([1.0]), None, "(S, H, D) or (B, S, H, D)"),
        (torch.randn(2, 4, 8).to(torch.int32), torch.tensor([1.0]), None, "x must have dtype"),
        (torch.randn(2, 4, 0), torch.tensor([1.0]), None, "non-empty head_dim"),
        (torch.randn(2, 4, 8), torch.tensor([1.0], dtype=torch.float16), None, "scale must be float32"),
        (torch.randn(2, 4, 8), torch.tensor([1.0, 2.0]), None, "one element"),
        (torch.randn(2, 4, 8), torch.tensor([1.0]), -1, "pad must be None or >= 0"),
    ],
)
def test_validation(x, scale, pad, message):
    with pytest.raises(KernelInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        torch.ops.fusionpasses.qkv_fp8_quant(x, scale, pad)
    with pytest.raises(KernelInputError):
        quantize_pad_fp8(x, scale, pad)


def test_flat_path_needs_contiguous_unpadded_input():
    with pytest.raises(KernelInputError, match="path='flat'"):
        quantize_pad_fp8(torch.randn(2, 3, 72), torch.tensor([1.0]), path="flat")


def test_fake_impl_with_symbolic_sizes():
    def fn(x, scale):
        return torch.ops.fusionpasses.qkv_fp8_quant(x, scale), torch.ops.fusionpasses.qkv_fp8_quant(x, scale, 3)

    gm = make_fx(fn, tracing_mode="symbolic")(torch.randn(5, 2, 72), torch.tensor([1.0]))
    vals = [n.meta["val"] for n in gm.graph.nodes if n.op == "call_function"]
    assert all(v.dtype == FP8_DTYPE for v in vals)
    x_val = next(n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder")
    assert any(isinstance(s, torch.SymInt) for s in vals[0].shape), "the sizes should stay symbolic"
    assert str(vals[1].shape[-1]) == str(x_val.shape[-1] + 3)
    # the traced graph serves other sizes: D=24 pads to 32 and by 3
    out, out3 = gm(torch.randn(3, 4, 24), torch.tensor([1.0]))
    assert out.shape == (3, 4, 32) and out3.shape == (3, 4, 27)
