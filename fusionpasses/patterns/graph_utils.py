"""Small FX helpers: op tests, fake-value propagation for inserted nodes, symbolic sizes as nodes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._guards import detect_fake_mode

aten = torch.ops.aten
c10d = torch.ops._c10d_functional


def is_op(node: Any, *targets: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def val(node: fx.Node) -> Any:
    return node.meta.get("val")


def set_fake_value(node: fx.Node) -> None:
    """Fill ``meta["val"]`` of an inserted node by running its target on its inputs' fake values.

    Inductor re-derives metadata after the custom pass anyway; doing it here lets the next pass of the
    same manager read shapes of nodes this pass inserted.
    """
    fake_inputs = pytree.tree_leaves([val(n) for n in node.all_input_nodes])
    mode = detect_fake_mode([v for v in fake_inputs if isinstance(v, torch.Tensor)])
    if mode is None:
        return
    args, kwargs = pytree.tree_map_only(fx.Node, val, (node.args, node.kwargs))
    with mode:
        node.meta["val"] = node.target(*args, **kwargs)


def call(graph: fx.Graph, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
    node = graph.call_function(target, args, kwargs)
    set_fake_value(node)
    return node


def size_arg(graph: fx.Graph, node: fx.Node, dim: int) -> int | fx.Node:
    """``node.shape[dim]`` as an int when static, else as an ``aten.sym_size.int`` node.

    Inserted nodes must never carry raw SymInts in their args: inside torch.cond branches they
    are printed as free symbols (``s77``) that the branch's code cannot resolve.
    """
    size = val(node).shape[dim]
    if isinstance(size, int):
        return size
    if static_int(size) is not None:
        return static_int(size)
    return call(graph, aten.sym_size.int, node, dim)


def ancestors(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def hoist_before(anchor: fx.Node, nodes: Iterable[fx.Node]) -> None:
    """Move ``nodes`` (and their ancestors that come after ``anchor``) in front of ``anchor``,
    keeping their relative order. Callers make sure none of them depends on ``anchor``."""
    order = {n: i for i, n in enumerate(anchor.graph.nodes)}
    late = [n for n in ancestors(nodes) if order[n] > order[anchor]]
    for n in sorted(late, key=order.__getitem__):
        anchor.prepend(n)


def static_int(x: Any) -> int | None:
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt):
        return x.node.maybe_as_int()
    return None
