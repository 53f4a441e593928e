"""FP8 attention operands: the traced per-tensor quantize + head_dim pad onto one fused kernel.

A vision encoder that feeds cuDNN's FP8 attention quantizes each of Q, K, V and pads head_dim to a
multiple of 16. Traced, that is four ops per tensor, each reading and writing the whole tensor::

    q  = qkv.view(S, 3, H, D)[:, 0]                               # strided view, D = 72
    q8 = e4m3(clamp(q.float() / q_scale, -448, 448))              # div, clamp, cast
    q8 = constant_pad_nd(q8, [0, 8])                              # (S, H, 80), pad zeroed
 -> q8 = fusionpasses.qkv_fp8_quant(q, q_scale, 8)                # one strided read, one write

The same rewrite applies when the pad comes first (pad ``q``, then quantize) and, for a head_dim that
is already aligned, when the quantized tensor only feeds ``fusionpasses.fp8_attention``. The matches
live in :mod:`fusionpasses.patterns.fp8_attention_quant`; the op's fp32 division makes each rewrite
bit-exact, and chains that would not be (a bf16 division, other clamp bounds, shared intermediates,
a broadcasting scale) are declined with the reason. On CUDA the kernel's e4m3 cast needs sm89+.
"""

from __future__ import annotations

import torch.fx as fx

from ..patterns.fp8_attention_quant import NotRewritable, QKVQuantMatch, find_candidates
from ..patterns.graph_utils import val
from ..platform import device_capability, family_name
from .base import FusionPass

MIN_CAPABILITY = (8, 9)


class FP8AttentionQuantPass(FusionPass):
    """Rewrites traced Q/K/V FP8 quantization (+ head_dim pad) onto ``fusionpasses.qkv_fp8_quant``."""

    name = "fp8_attention_quant"

    def run(self, graph: fx.Graph) -> None:
        # Candidates are disjoint chains (every inner node has one user), so they are collected first
        # and rewritten one by one.
        for match_type, anchor in list(find_candidates(graph)):
            try:
                match = match_type.from_anchor(anchor)
                self._check_device(match)
            except NotRewritable as reason:
                self.decline(match_type.pattern, anchor, str(reason))
                continue
            new = match.replace(graph)
            self.matched(match.pattern, new)

    def _check_device(self, match: QKVQuantMatch) -> None:
        device = val(match.source).device
        if device.type == "cpu":  # the op's CPU kernel is the reference
            return
        if device.type != "cuda":
            raise NotRewritable(f"tensors on {device}: the fused op has CPU and CUDA kernels only")
        capability = device_capability(self.config)
        if capability is None:
            raise NotRewritable("CUDA tensors but no GPU capability known (set FusionConfig.device_capability)")
        if capability < MIN_CAPABILITY:
            raise NotRewritable(f"{family_name(capability)}: the kernel's e4m3 cast needs sm89 or newer")
