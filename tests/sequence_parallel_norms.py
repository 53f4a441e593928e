"""The spellings of RMSNorm (and residual add + RMSNorm) that the sequence-parallel tests feed the pass."""

from __future__ import annotations

import torch
import torch.nn.functional as F

fp = torch.ops.fusionpasses


def norm_op(x, w, eps):
    return fp.rms_norm(x, w, eps)


def norm_functional(x, w, eps):
    return F.rms_norm(x, (x.shape[-1],), w, eps)


def norm_plain(x, w, eps):  # in the input dtype, as hand-written models do
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def norm_hf(x, w, eps):  # upcast, normalize, cast back, then the weight
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def norm_sqrt_div(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


NORMS = [norm_op, norm_functional, norm_plain, norm_hf, norm_sqrt_div]


def add_norm_fused_op(x, residual, w, eps):
    return fp.fused_add_rms_norm(x, residual, w, eps)


def add_norm_fp32_sum(x, residual, weight, eps):
    """Residual add in fp32, the new residual kept in the input dtype, the fp32 sum normalized (the
    reference model's spelling in fusionpasses/models/llama_tp.py)."""
    h = x.float() + residual.float()
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return normed.to(x.dtype), h.to(x.dtype)


def add_norm_of(norm):
    def add_norm(x, residual, w, eps):
        r = x + residual
        return norm(r, w, eps), r

    add_norm.__name__ = f"add_{norm.__name__}"
    return add_norm


ADD_NORMS = [add_norm_fused_op, add_norm_fp32_sum, *(add_norm_of(n) for n in NORMS)]
