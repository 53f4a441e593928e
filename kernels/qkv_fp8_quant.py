"""Q/K/V to FP8 e4m3 with a per-tensor scale, head_dim zero-padded: ``fusionpasses.qkv_fp8_quant``.

cuDNN's FP8 attention wants packed, contiguous (T, H, D) operands with D a multiple of 16, while a
vision encoder's Q/K/V are usually strided views of one fused QKV projection
(``qkv.view(S, 3, H, D)[:, 0]``) and D is often 72 or 80. Eagerly, divide, clamp, cast and pad are
four kernels that each write a full tensor. This op is one pass: it reads the view through its strides,
divides by the scale, saturates to ±448, casts, and writes a contiguous (..., H, D + pad) tensor whose
pad columns are zero.

    x       (S, H, D) or (B, S, H, D); bfloat16, float16 or float32; any strides
    scale   float32, one element: the dequantization multiplier (real ≈ fp8 * scale)
    pad     zero columns appended to head_dim; None pads D up to the next multiple of 16
    out     (S, H, D + pad) or (B, S, H, D + pad) float8_e4m3fn, contiguous

The division is IEEE fp32 (``x.float() / scale``), as in the eager composite, so the result is bit
for bit that of ``F.pad((x.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn), (0, pad))``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ._e4m3 import divide_saturate, e4m3_bits, software_e4m3
from ._triton import jit, require_triton, tl, triton
from .library import OpSample, check, check_dtype, check_same_device, check_tensorwise_scale, op_name, opcheck_samples

OP = "qkv_fp8_quant"
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
HEAD_DIM_ALIGNMENT = 16
INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
PATHS = ("auto", "rows", "flat")

# Elements one program handles: enough bytes in flight per SM to saturate HBM, few enough programs
# that the row index arithmetic stays a small share of the work.
_ELEMENTS_PER_PROGRAM = 8192


def padded_head_dim(head_dim: int, pad: int | None = None) -> int:
    """head_dim after padding: ``head_dim + pad``, or the next multiple of 16 when ``pad`` is None.

    Works on SymInts too (the fake impl calls it with symbolic sizes).
    """
    if pad is None:
        return (head_dim + HEAD_DIM_ALIGNMENT - 1) // HEAD_DIM_ALIGNMENT * HEAD_DIM_ALIGNMENT
    return head_dim + pad


def _validate(x: torch.Tensor, scale: torch.Tensor, pad: int | None) -> None:
    check(x.dim() in (3, 4), OP, f"x must be (S, H, D) or (B, S, H, D), got shape {tuple(x.shape)}")
    check_dtype(x, OP, "x", INPUT_DTYPES)
    check(x.shape[-1] >= 1, OP, f"x must have a non-empty head_dim, got shape {tuple(x.shape)}")
    check_tensorwise_scale(scale, OP, "scale")
    check(pad is None or pad >= 0, OP, f"pad must be None or >= 0, got {pad}")
    check_same_device(OP, x=x, scale=scale)


def reference_qkv_fp8_quant(x: torch.Tensor, scale: torch.Tensor, pad: int | None = None) -> torch.Tensor:
    """The definition: fp32 division by the scale, saturation to ±448, RNE cast, zero pad on the right."""
    head_dim = x.shape[-1]
    q = (x.float() / scale.reshape(())).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return F.pad(q, (0, padded_head_dim(head_dim, pad) - head_dim)).contiguous()


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------


@jit
def _qkv_fp8_quant_kernel(
    x_ptr,
    scale_ptr,
    out_ptr,
    n_rows,
    n_elements,
    seq_len,
    num_heads,
    stride_b,
    stride_s,
    stride_h,
    stride_d,
    HEAD_DIM: tl.constexpr,
    PADDED_HEAD_DIM: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
    FLAT: tl.constexpr,
    SOFTWARE_E4M3: tl.constexpr,
):
    scale = tl.load(scale_ptr)
    pid = tl.program_id(0).to(tl.int64)
    if FLAT:
        # Contiguous input and no pad: input and output are the same flat index space.
        offsets = pid * (BLOCK_ROWS * BLOCK_COLS) + tl.arange(0, BLOCK_ROWS * BLOCK_COLS)
        mask = offsets < n_elements
        y = divide_saturate(tl.load(x_ptr + offsets, mask=mask, other=0.0), scale)
        tl.store(out_ptr + offsets, e4m3_bits(y, SOFTWARE_E4M3).to(tl.float8e4nv, bitcast=True), mask=mask)
    else:
        # One row is one (token, head): HEAD_DIM strided inputs -> PADDED_HEAD_DIM contiguous outputs.
        rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_mask = rows < n_rows
        head = rows % num_heads
        token = rows // num_heads
        src_rows = (token // seq_len) * stride_b + (token % seq_len) * stride_s + head * stride_h
        # Strides like 72 are not the multiples of 16 Triton specializes on; saying that every row
        # starts 16 bytes apart keeps the loads 16 bytes wide.
        src_rows = tl.multiple_of(src_rows, ROW_ALIGN)
        dst_rows = rows * PADDED_HEAD_DIM
        for start in tl.static_range(0, PADDED_HEAD_DIM, BLOCK_COLS):
            cols = start + tl.arange(0, BLOCK_COLS)
            in_head = (cols < HEAD_DIM)[None, :]
            x = tl.load(
                x_ptr + src_rows[:, None] + cols[None, :] * stride_d, mask=row_mask[:, None] & in_head, other=0.0
            )
            y = tl.where(in_head, divide_saturate(x, scale), 0.0)  # the pad is +0 whatever the scale (0 / 0 is NaN)
            store_mask = row_mask[:, None] & (cols < PADDED_HEAD_DIM)[None, :]
            q = e4m3_bits(y, SOFTWARE_E4M3).to(tl.float8e4nv, bitcast=True)
            tl.store(out_ptr + dst_rows[:, None] + cols[None, :], q, mask=store_mask)


def _column_block(padded: int) -> int:
    """Columns per inner step: the largest power of two (<= 128) dividing the padded head_dim, so the
    steps tile it exactly (80 -> 5 x 16, 96 -> 3 x 32, 128 -> 1 x 128); odd sizes get one masked step."""
    block = 1
    while block < 128 and padded % (2 * block) == 0:
        block *= 2
    if block < 16:
        block = triton.next_power_of_2(padded)
    return block


def _row_alignment(x: torch.Tensor, sizes: tuple[int, ...], strides: tuple[int, ...]) -> int:
    """The largest power of two (up to 16 bytes' worth of elements) dividing every row stride."""
    align = 16 // x.element_size()
    for size, stride in zip(sizes, strides):
        while size > 1 and stride % align:
            align //= 2
    return align


def _floor_power_of_2(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def _as_bshd(x: torch.Tensor) -> tuple[int, int, int, int, tuple[int, int, int, int]]:
    if x.dim() == 3:
        s, h, d = x.shape
        return 1, s, h, d, (0, *x.stride())
    b, s, h, d = x.shape
    return b, s, h, d, tuple(x.stride())


def quantize_pad_fp8(
    x: torch.Tensor,
    scale: torch.Tensor,
    pad: int | None = None,
    *,
    path: str = "auto",
) -> torch.Tensor:
    """Launch the Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``).

    ``path``: "rows" reads (token, head) rows through the strides; "flat" treats a contiguous,
    unpadded input as one flat array; "auto" takes "flat" when it applies. The benchmark compares
    both on contiguous aligned inputs.
    """
    require_triton(OP)
    _validate(x, scale, pad)
    check(path in PATHS, OP, f"path must be one of {PATHS}, got {path!r}")
    batch, seq_len, num_heads, head_dim, strides = _as_bshd(x)
    padded = padded_head_dim(head_dim, pad)
    out = torch.empty((*x.shape[:-1], padded), dtype=FP8_DTYPE, device=x.device)
    flat_ok = padded == head_dim and x.is_contiguous()
    check(path != "flat" or flat_ok, OP, "path='flat' needs a contiguous input and no pad")
    flat = flat_ok and path != "rows"
    n_rows = batch * seq_len * num_heads
    if n_rows == 0:
        return out
    if flat:
        block = _ELEMENTS_PER_PROGRAM
        block_rows, block_cols = 1, block
        grid = (triton.cdiv(n_rows * head_dim, block),)
    else:
        block_cols = _column_block(padded)
        block_rows = _floor_power_of_2(max(1, min(_ELEMENTS_PER_PROGRAM // padded, n_rows)))
        grid = (triton.cdiv(n_rows, block_rows),)
    _qkv_fp8_quant_kernel[grid](
        x,
        scale,
        out,
        n_rows,
        n_rows * head_dim,
        seq_len,
        num_heads,
        *strides,
        HEAD_DIM=head_dim,
        PADDED_HEAD_DIM=padded,
        BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols,
        ROW_ALIGN=_row_alignment(x, (batch, seq_len, num_heads), strides[:3]),
        FLAT=flat,
        SOFTWARE_E4M3=software_e4m3(x.device),
        num_warps=4,
    )
    return out


# ---------------------------------------------------------------------------------------------
# The op
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op(op_name(OP), mutates_args=(), device_types="cuda")
def qkv_fp8_quant(x: torch.Tensor, scale: torch.Tensor, pad: int | None = None) -> torch.Tensor:
    return quantize_pad_fp8(x, scale, pad)


@qkv_fp8_quant.register_kernel("cpu")
def _qkv_fp8_quant_cpu(x, scale, pad=None):
    _validate(x, scale, pad)
    return reference_qkv_fp8_quant(x, scale, pad)


@qkv_fp8_quant.register_fake
def _qkv_fp8_quant_fake(x, scale, pad=None):
    return x.new_empty((*x.shape[:-1], padded_head_dim(x.shape[-1], pad)), dtype=FP8_DTYPE)


@opcheck_samples(qkv_fp8_quant)
def _qkv_fp8_quant_samples() -> Iterator[OpSample]:
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.02])
    qkv = torch.randn(5, 3, 2, 72, generator=g).to(torch.bfloat16)
    yield OpSample((qkv[:, 0], scale), {}, name="strided-(5,2,72)-pad-to-80")
    yield OpSample((qkv[:, 2], scale, 0), {}, name="strided-(5,2,72)-no-pad")
    x4 = torch.randn(2, 3, 4, 16, generator=g, dtype=torch.float16)
    yield OpSample((x4, scale), {}, name="contiguous-(2,3,4,16)")
    yield OpSample((x4.transpose(1, 2), scale, 5), {}, name="transposed-(2,4,3,16)-pad-5")
