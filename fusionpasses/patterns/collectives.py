"""Functional collectives as post-grad graphs spell them, normalised into match dataclasses.

All-gather forms (``ag = all_gather_into_tensor(shard, ws, group)``, ``w = wait_tensor(ag)``):

    w                                             gather along dim 0
    view.dtype(w, fp8)       with shard = view.dtype(x_fp8, uint8)   fp8 gathered as bytes
    cat([split(w, s, 0)[i] for i in range(ws)], dim=d)              gather along dim d > 0

Reduce-scatter forms (``rs = reduce_scatter_tensor(x, op, ws, group)``, ``w = wait_tensor(rs)``):

    x                                             scatter along dim 0
    x = cat([split(y, s, d)[i] for i in range(ws)], 0)               scatter y along dim d > 0
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .graph_utils import aten, c10d, is_op, static_int, val

SPLITS = (aten.split.Tensor, aten.split_with_sizes.default)


@dataclass
class AllGatherMatch:
    ag: fx.Node
    wait: fx.Node
    shard: fx.Node
    """The tensor the all_gather sends (a uint8 view for fp8 gathered as bytes)."""
    result: fx.Node
    """The node whose value is the gathered tensor as the model uses it."""
    gather_dim: int
    world_size: int
    group_name: str
    erased_to: torch.dtype | None = None
    """The dtype the gathered bytes are viewed as afterwards (type-erased fp8 gathers)."""
    nodes: list[fx.Node] = field(default_factory=list)
    """Every node of the pattern, erased after the rewrite once they have no users."""


@dataclass
class ReduceScatterMatch:
    rs: fx.Node
    wait: fx.Node
    source: fx.Node
    """The tensor reduce-scattered, before any split/cat reordering."""
    scatter_dim: int
    reduce_op: str
    world_size: int
    group_name: str
    nodes: list[fx.Node] = field(default_factory=list)


def _single_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _split_cat(node: fx.Node, world_size: int) -> tuple[fx.Node, fx.Node, int, list[fx.Node]] | None:
    """``cat([split(node, s, d)[i] for i in range(ws)], cat_dim)`` starting at ``node``: returns
    (split, cat, split_dim, nodes) when ``node``'s only user is such a split whose pieces go, in order,
    into one cat."""
    split = _single_user(node)
    if not is_op(split, *SPLITS) or split.args[0] is not node:
        return None
    split_dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    getitems = list(split.users)
    if len(getitems) != world_size or not all(is_op(g, operator.getitem) for g in getitems):
        return None
    cats = {u for g in getitems for u in g.users}
    if len(cats) != 1:
        return None
    cat = cats.pop()
    if not is_op(cat, aten.cat.default):
        return None
    pieces = list(cat.args[0])
    if len(pieces) != world_size or any(p is not g for p, g in zip(pieces, sorted(getitems, key=lambda g: g.args[1]))):
        return None
    if [g.args[1] for g in pieces] != list(range(world_size)):
        return None
    return split, cat, split_dim, [split, *getitems, cat]


def _normalize_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def find_all_gathers(graph: fx.Graph) -> list[AllGatherMatch]:
    matches = []
    for ag in graph.nodes:
        if not is_op(ag, c10d.all_gather_into_tensor.default):
            continue
        shard, world_size, group_name = ag.args[:3]
        wait = _single_user(ag)
        if not is_op(wait, c10d.wait_tensor.default):
            continue
        match = AllGatherMatch(ag, wait, shard, wait, 0, int(world_size), str(group_name), nodes=[ag, wait])
        view = _single_user(wait)
        if is_op(view, aten.view.dtype) and val(view) is not None and val(view).dtype != val(wait).dtype:
            match.result, match.erased_to = view, view.args[1]
            match.nodes.append(view)
        split_cat = _split_cat(match.result, match.world_size)
        if split_cat is not None:
            split, cat, split_dim, nodes = split_cat
            if _normalize_dim(split_dim, val(match.result).dim()) == 0:
                match.result = cat
                match.gather_dim = _normalize_dim(cat.args[1] if len(cat.args) > 1 else 0, val(cat).dim())
                match.nodes.extend(nodes)
        matches.append(match)
    return matches


def find_reduce_scatters(graph: fx.Graph) -> list[ReduceScatterMatch]:
    matches = []
    for rs in graph.nodes:
        if not is_op(rs, c10d.reduce_scatter_tensor.default):
            continue
        x, reduce_op, world_size, group_name = rs.args[:4]
        wait = _single_user(rs)
        if not is_op(wait, c10d.wait_tensor.default):
            continue
        match = ReduceScatterMatch(rs, wait, x, 0, str(reduce_op), int(world_size), str(group_name), nodes=[rs, wait])
        if is_op(x, aten.cat.default) and static_int(x.args[1] if len(x.args) > 1 else 0) == 0:
            pieces = list(x.args[0])
            split = pieces[0].args[0] if pieces and is_op(pieces[0], operator.getitem) else None
            if split is not None and is_op(split, *SPLITS):
                source = split.args[0]
                found = _split_cat(source, match.world_size)
                if found is not None and found[1] is x:
                    match.source = source
                    match.scatter_dim = _normalize_dim(found[2], val(source).dim())
                    match.nodes.extend(found[3])
        matches.append(match)
    return matches
