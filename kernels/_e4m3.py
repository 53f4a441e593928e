"""FP8 E4M3 (``float8_e4m3fn``) encoding inside Triton kernels, shared by the quantization kernels.

From sm_89 (Ada, Hopper, Blackwell) the GPU converts float32 to E4M3 itself
(``cvt.rn.satfinite.e4m3x2.f32``: round to nearest even, saturating, NaN kept). Elsewhere, and in
Triton's CPU interpreter, whose fp8 cast rounds ties half-up, drops the carry into the exponent
(127.03 becomes 64) and maps NaN to 384, the byte is assembled with integer arithmetic to the same
bits, so the CPU suite checks every kernel bit for bit against its reference.
"""

from __future__ import annotations

import torch

from ._triton import interpreting, jit, tl


def software_e4m3(device: torch.device) -> bool:
    """Whether kernels on ``device`` must encode E4M3 in software: the CPU interpreter, or a GPU before sm_89."""
    return interpreting() or torch.cuda.get_device_capability(device) < (8, 9)


@jit
def divide_saturate(x, scale):
    """IEEE ``x / scale`` in float32 (Triton's ``/`` is approximate on NVIDIA GPUs), clamped to
    [-448, 448] with NaN kept, as ``torch.clamp`` keeps it."""
    y = tl.math.div_rn(x.to(tl.float32), scale)
    return tl.minimum(
        tl.maximum(y, -448.0, propagate_nan=tl.PropagateNan.ALL), 448.0, propagate_nan=tl.PropagateNan.ALL
    )


@jit
def e4m3_bits(y, SOFTWARE: tl.constexpr):
    """uint8 E4M3 codes of float32 ``y`` (|y| <= 448 or NaN), rounded to nearest even."""
    if SOFTWARE:
        return _software_e4m3_bits(y)
    else:
        return y.to(tl.float8e4nv).to(tl.uint8, bitcast=True)


@jit
def _software_e4m3_bits(y):
    bits = y.to(tl.uint32, bitcast=True)
    sign = (bits >> 24) & 0x80
    magnitude = bits & 0x7FFFFFFF
    # |y| >= 2**-6 is a normal E4M3 number: drop 20 of fp32's 23 mantissa bits, ties to even; the
    # carry may ripple into the exponent, which is the right result. Re-bias 127 -> 7: (120 << 3).
    rounded = magnitude + 0x7FFFF + ((magnitude >> 20) & 1)
    normal_code = (rounded >> 20) - 960
    # |y| < 2**-6: E4M3 subnormals are the multiples of 2**-9, so the code is round(|y| * 512); adding
    # and subtracting 2**23 rounds to an integer, ties to even. Code 8 (a carry) is 2**-6, still right.
    tiny = tl.where(magnitude < 0x3C800000, tl.abs(y), 0.0) * 512.0
    subnormal_code = ((tiny + 8388608.0) - 8388608.0).to(tl.uint32)
    code = tl.where(magnitude >= 0x3C800000, normal_code, subnormal_code)
    code = tl.where(magnitude > 0x7F800000, 0x7F, code)  # NaN
    return (code | sign).to(tl.uint8)
