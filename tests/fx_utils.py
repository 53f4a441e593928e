"""Post-grad-shaped FX graphs for pass tests, without a full Inductor compile.

``post_grad_graph`` traces like Inductor does before its post-grad passes (make_fx with Inductor's
decompositions on fake tensors, views as reshapes, no-op aliases removed), so a pass can be run on the
result directly and the graph asserted on and executed.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import torch
import torch.fx as fx
from torch._inductor.decomposition import select_decomp_table
from torch._inductor.fx_passes.post_grad import remove_noop_ops, view_to_reshape
from torch.fx.experimental.proxy_tensor import make_fx

from fusionpasses.inspection import target_name


def post_grad_graph(fn: Callable, *args: torch.Tensor, tracing_mode: str = "fake") -> fx.GraphModule:
    gm = make_fx(fn, decomposition_table=select_decomp_table(), tracing_mode=tracing_mode)(*args)
    view_to_reshape(gm)
    remove_noop_ops(gm.graph)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def op_counts(gm: fx.GraphModule) -> collections.Counter[str]:
    return collections.Counter(target_name(n.target) for n in gm.graph.nodes if n.op == "call_function")


def nodes_of(gm: fx.GraphModule, target) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == target]


def assert_no_raw_symints(gm: fx.GraphModule) -> None:
    """Inserted nodes must pass sizes as nodes: a raw SymInt in args breaks inside torch.cond branches."""
    import torch.utils._pytree as pytree

    for n in gm.graph.nodes:
        for a in pytree.tree_leaves((n.args, n.kwargs)):
            assert not isinstance(a, torch.SymInt), f"{n.name} carries a raw SymInt {a} in its args"
