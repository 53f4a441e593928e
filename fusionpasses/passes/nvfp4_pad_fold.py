"""NVFP4PadFoldPass: fold a zero pad of NVFP4-quantized activations along K into the quant kernel.

Block-scaled FP4 GEMMs need K padded (a multiple of 32 for CUTLASS and cuBLASLt). Quantizing and then
padding reads and writes the quantized tensor a second time; ``fusionpasses.nvfp4_quant`` can write the
padded buffer itself, padding exactly zero. Before -> after, for a pad of p bytes (2p values of K)::

    packed, scales = nvfp4_quant(x, gs, None, layout)
    packed = constant_pad_nd(packed, [0, p], 0)
    scales = constant_pad_nd(scales, [0, 2p/16], 0)      # linear scales only
->
    packed, scales = nvfp4_quant(x, gs, N + 2p, layout)    # swizzled scales keep their shape

Declined, with the reason in the stats: pads of other dims or before K, pad values other than +0, values
that other nodes also read unpadded, linear scales not padded by the matching number of blocks, swizzled
scales padded as a 2-D tensor or needing more 4-column tiles than the graph keeps, and K not whole blocks.
"""

from __future__ import annotations

import torch.fx as fx

from ..patterns.graph_utils import is_op
from ..patterns.nvfp4_pad import find_pad_fold, nvfp4_quant_op
from .base import FusionPass

PATTERN = "nvfp4_quant+pad"


class NVFP4PadFoldPass(FusionPass):
    name = "nvfp4_pad_fold"

    def run(self, graph: fx.Graph) -> None:
        quant_op = nvfp4_quant_op()
        worklist = [n for n in graph.nodes if is_op(n, quant_op)]
        while worklist:
            node = worklist.pop()
            fold = find_pad_fold(node)
            if fold is None:
                continue
            if isinstance(fold, str):
                self.decline(PATTERN, node, fold)
                continue
            new_quant = fold.replace(graph)
            self.matched(PATTERN, new_quant)
            # A pad of the already padded output (pad of pad) folds again.
            worklist.append(new_quant)
