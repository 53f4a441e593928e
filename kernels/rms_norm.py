"""RMSNorm and fused residual add + RMSNorm: ``rms_norm`` and ``fused_add_rms_norm``.

    out = torch.ops.fusionpasses.rms_norm(x, weight, eps)
    out, residual_out = torch.ops.fusionpasses.fused_add_rms_norm(x, residual, weight, eps)

Definition (every row of the last dim on its own, fp32 math, one rounding at the end):
    residual_out = x + residual                       (in x's dtype, as ``x + residual`` rounds)
    h            = residual_out (fused) or x           (read back from the rounded sum)
    out          = (h.float() * rsqrt(mean(h.float()**2) + eps) * weight.float()).to(x.dtype)

Layouts: x (..., H) bf16, fp16 or fp32, any strides (rows are gathered to a dense copy only when the
last dim is not unit-stride or the leading dims cannot be flattened); residual with x's shape and
dtype; weight (H,) bf16, fp16 or fp32. Outputs are contiguous, with x's shape and dtype.

Both ops are row-local (each row reads only itself), which is what lets the sequence-parallel pass
run them on a rank's shard of the tokens.

GPU kernel: Triton, one program per row. Rows up to ``MAX_ONE_PASS_BLOCK`` elements are read once
and kept in registers; longer rows are read twice (sum of squares, then scale), recomputing the
residual sum instead of reading back what the program just stored.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from ._triton import jit, require_triton, tl, triton
from .library import (
    HALF_DTYPES,
    OpSample,
    check,
    check_dtype,
    check_ndim,
    check_same_device,
    op_name,
    opcheck_samples,
)

FLOAT_DTYPES = (*HALF_DTYPES, torch.float32)
MAX_ONE_PASS_BLOCK = 16384
"""Longest row (in elements, a power of two) the kernel keeps in registers in one pass."""
LOOP_BLOCK = 4096
"""Chunk length of the two-pass loop for longer rows."""


def _validate(op: str, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> None:
    check(x.dim() >= 1, op, f"x must have at least one dim (..., H), got shape {tuple(x.shape)}")
    check_dtype(x, op, "x", FLOAT_DTYPES)
    check_ndim(weight, op, "weight", 1)
    check_dtype(weight, op, "weight", FLOAT_DTYPES)
    check(
        weight.shape[0] == x.shape[-1],
        op,
        f"weight must have H = x.shape[-1] = {x.shape[-1]} elements, got shape {tuple(weight.shape)}",
    )
    check(math.isfinite(eps) and eps >= 0.0, op, f"eps must be finite and >= 0, got {eps}")
    if residual is not None:
        check(
            residual.shape == x.shape and residual.dtype == x.dtype,
            op,
            f"residual must match x ({tuple(x.shape)}, {x.dtype}), got {tuple(residual.shape)}, {residual.dtype}",
        )
    check_same_device(op, x=x, weight=weight, residual=residual)


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The definition of ``rms_norm``: fp32 math over the last dim, one rounding to x's dtype."""
    h = x.float()
    rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * rstd * weight.float()).to(x.dtype).contiguous()


def reference_fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition of ``fused_add_rms_norm``: the rounded sum, then ``rms_norm`` of it."""
    residual_out = (x + residual).contiguous()
    return reference_rms_norm(residual_out, weight, eps), residual_out


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------


@jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    n_cols,
    x_row_stride,
    residual_row_stride,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    ONE_PASS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # int64 row offsets: M * H passes 2**31 at serving sizes (262144 tokens x 8192).
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    residual_row = residual_ptr + row * residual_row_stride
    out_row = out_ptr + row * n_cols
    residual_out_row = residual_out_ptr + row * n_cols
    cols = tl.arange(0, BLOCK)
    if ONE_PASS:
        mask = cols < n_cols
        h = tl.load(x_row + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(residual_row + cols, mask=mask, other=0.0)
            # Round the sum to the input dtype first: the norm reads the residual the model keeps.
            h = (h.to(tl.float32) + r.to(tl.float32)).to(residual_out_ptr.dtype.element_ty)
            tl.store(residual_out_row + cols, h, mask=mask)
        hf = h.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(hf * hf, axis=0) / n_cols + eps)
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_row + cols, (hf * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            offs = start + cols
            mask = offs < n_cols
            h = tl.load(x_row + offs, mask=mask, other=0.0)
            if HAS_RESIDUAL:
                r = tl.load(residual_row + offs, mask=mask, other=0.0)
                h = (h.to(tl.float32) + r.to(tl.float32)).to(residual_out_ptr.dtype.element_ty)
                tl.store(residual_out_row + offs, h, mask=mask)
            hf = h.to(tl.float32)
            acc += hf * hf
        rstd = tl.rsqrt(tl.sum(acc, axis=0) / n_cols + eps)
        for start in range(0, n_cols, BLOCK):
            offs = start + cols
            mask = offs < n_cols
            h = tl.load(x_row + offs, mask=mask, other=0.0)
            if HAS_RESIDUAL:
                r = tl.load(residual_row + offs, mask=mask, other=0.0)
                h = (h.to(tl.float32) + r.to(tl.float32)).to(residual_out_ptr.dtype.element_ty)
            w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_row + offs, (h.to(tl.float32) * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as (rows, H) with unit stride along H, copying only when no such view exists."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def launch_rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the Triton kernel: (out, residual_out or None). ``block`` overrides the chunk length
    (a power of two); rows longer than it take the two-pass loop."""
    require_triton("rms_norm")
    n_cols = x.shape[-1]
    weight = weight.contiguous()
    x_rows = _rows(x)
    residual_rows = _rows(residual) if residual is not None else x_rows
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    residual_out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else out
    if x_rows.shape[0] == 0 or n_cols == 0:
        return out, residual_out if residual is not None else None
    one_pass_block = triton.next_power_of_2(n_cols)
    if block is None:
        block = one_pass_block if one_pass_block <= MAX_ONE_PASS_BLOCK else LOOP_BLOCK
    check(block & (block - 1) == 0, "rms_norm", f"block must be a power of two, got {block}")
    one_pass = block >= n_cols
    if one_pass:
        block = one_pass_block
    num_warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    _rms_norm_kernel[(x_rows.shape[0],)](
        x_rows,
        residual_rows,
        weight,
        out,
        residual_out,
        n_cols,
        x_rows.stride(0),
        residual_rows.stride(0),
        eps,
        HAS_RESIDUAL=residual is not None,
        ONE_PASS=one_pass,
        BLOCK=block,
        num_warps=num_warps,
    )
    return out, residual_out if residual is not None else None


# ---------------------------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op(op_name("rms_norm"), mutates_args=(), device_types="cuda")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    _validate("rms_norm", x, weight, eps)
    return launch_rms_norm(x, weight, eps)[0]


@rms_norm.register_kernel("cpu")
def _rms_norm_cpu(x, weight, eps):
    _validate("rms_norm", x, weight, eps)
    return reference_rms_norm(x, weight, eps)


@rms_norm.register_fake
def _rms_norm_fake(x, weight, eps):
    return x.new_empty(x.shape)


@torch.library.custom_op(op_name("fused_add_rms_norm"), mutates_args=(), device_types="cuda")
def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    _validate("fused_add_rms_norm", x, weight, eps, residual)
    out, residual_out = launch_rms_norm(x, weight, eps, residual)
    return out, residual_out


@fused_add_rms_norm.register_kernel("cpu")
def _fused_add_rms_norm_cpu(x, residual, weight, eps):
    _validate("fused_add_rms_norm", x, weight, eps, residual)
    return reference_fused_add_rms_norm(x, residual, weight, eps)


@fused_add_rms_norm.register_fake
def _fused_add_rms_norm_fake(x, residual, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape)


def _samples() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, str]]:
    g = torch.Generator().manual_seed(0)
    for shape, dtype, w_dtype, eps in (
        ((1, 1), torch.bfloat16, torch.bfloat16, 1e-6),
        ((5, 33), torch.float16, torch.float32, 1e-5),
        ((2, 3, 16), torch.float32, torch.float32, 0.0),
    ):
        x = torch.randn(*shape, generator=g).to(dtype)
        residual = torch.randn(*shape, generator=g).to(dtype)
        weight = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(w_dtype)
        yield x, residual, weight, eps, f"{tuple(shape)}-{str(dtype).removeprefix('torch.')}"
    # Rows with a stride (a slice of a wider tensor): the kernel reads them in place.
    wide = torch.randn(6, 48, generator=g).to(torch.bfloat16)
    yield wide[:, :40], wide[:, 8:], torch.randn(40, generator=g).to(torch.bfloat16), 1e-6, "strided-rows"


@opcheck_samples(rms_norm)
def _rms_norm_samples() -> Iterator[OpSample]:
    for x, _, weight, eps, name in _samples():
        yield OpSample((x, weight, eps), {}, name=name)


@opcheck_samples(fused_add_rms_norm)
def _fused_add_rms_norm_samples() -> Iterator[OpSample]:
    for x, residual, weight, eps, name in _samples():
        yield OpSample((x, residual, weight, eps), {}, name=name)
