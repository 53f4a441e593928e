"""The passes, one per file, and the order the pass manager runs them in.

Order and why:
1. batch_invariant: decides whether the collective passes may run at all and rewrites FP8 GEMMs
   before any other pass pattern-matches them.
2. sequence_parallel: turns all_reduce + norm into reduce_scatter + norm + all_gather ...
3. async_tp: ... whose reduce_scatter/all_gather it then fuses with the neighbouring GEMMs.
4. fp8_attention_quant, nvfp4_pad_fold: local rewrites onto fused quantization kernels.
5. cond_padding: last, because it moves ops into torch.cond branches that the passes above would
   no longer see (Inductor runs post-grad passes on branches before the graph that holds them).
"""

from __future__ import annotations

from .base import FusionPass

# (FusionConfig switch, module in fusionpasses.passes, class name)
PASS_ORDER: tuple[tuple[str, str, str], ...] = (
    ("batch_invariant", "batch_invariant", "BatchInvariantPass"),
    ("sequence_parallel", "sequence_parallel", "SequenceParallelPass"),
    ("async_tp", "async_tp", "AsyncTPPass"),
    ("fp8_attention_quant", "fp8_attention_quant", "FP8AttentionQuantPass"),
    ("nvfp4_pad_fold", "nvfp4_pad_fold", "NVFP4PadFoldPass"),
    ("cond_padding", "cond_padding", "CondPaddingPass"),
)

__all__ = ["FusionPass", "PASS_ORDER"]
