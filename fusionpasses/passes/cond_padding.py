"""cond_padding: pad only when the size is unaligned, as a torch.cond, so one graph serves every M.

Ops whose fast path needs an aligned size (``ALIGNED_OPS``) used to be called as "pad always, slice
back"; with a dynamic M that pad is a copy on every call, also for the M that need none. The pass
turns the unconditional pad into a branch::

    amount = (-M) % 4
    y = block_fp8_mm(pad(A, rows=amount), B, pad(A_scale_t, cols=amount), B_scale)[:M]
 -> y = cond(M % 4 != 0,
             padded: block_fp8_mm(pad(A), B, pad(A_scale_t), B_scale)[:M],   # the original nodes
             direct: block_fp8_mm(A, B, A_scale_t, B_scale)[:M],              # the pads dropped
             (A, B, A_scale_t, B_scale, amount, M))[0]

Why it is exact: the pass proves that every pad amount equals ``(-M) % align`` for all M, so when
the direct branch runs (M aligned) every pad is empty and the direct branch computes the very values
the original nodes did. Nodes between the op and the slice (a chain of single-user nodes, e.g. an
epilogue) move into both branches unchanged.

Declined, with the reason in the stats, when: an aligned input is not padded, or padded on another
dim than the aligned one; the amount is not provably the round-up of the symbolic size; the sizes of
the aligned inputs are not provably equal; M is static (the choice is already made at compile
time); the padded output escapes or is not sliced back to M; or the branch would contain a
collective (its divisibility checks would install guards that specialize the cond; see
shared/research/torch_micro_tp.md §4.3). Inductor runs the pass on every torch.cond branch as well,
so a region inside a user's branch is rewritten like any other; the branches the pass creates are
never revisited (Inductor visits subgraphs before the graph that holds them).

The registry is a module constant on purpose: the pass manager's cache key hashes this file, so a
rule added at run time would be invisible to Inductor's FX graph cache.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._guards import detect_fake_mode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import fusionpasses.kernels  # noqa: F401  (registers the ops of the registry)
from fusionpasses.kernels.block_fp8_gemm import ALIGN_M

from ..patterns.aligned_padding import (
    Pad,
    SizeValue,
    SliceBack,
    insert_unaligned_predicate,
    is_communication,
    is_round_up_amount,
    is_symbolic,
    match_pad,
    match_slice,
    provably_equal,
)
from ..patterns.graph_utils import static_int, val
from .base import FusionPass

MAX_CHAIN = 16
"""Nodes allowed between the aligned op and the slice back (an epilogue, not a whole model)."""


@dataclass(frozen=True)
class AlignedOp:
    """An op whose fast path needs one size aligned, and where that size sits in its signature."""

    op: torch._ops.OpOverload
    aligned_args: tuple[tuple[int, int], ...]
    """(argument index, dim) of every input that carries the aligned size (all padded together)."""
    alignment: int
    direct: torch._ops.OpOverload
    """The op the unpadded branch calls on aligned inputs (often ``op`` itself)."""
    out_dim: int = 0
    """The output dim that carries the aligned size (the one sliced back)."""

    @property
    def pattern(self) -> str:
        return f"pad->{self.op._opname}->slice"


ALIGNED_OPS: tuple[AlignedOp, ...] = (
    # A (M, K) and A_scale_t (K/128, M): the TMA box over the M-major scales needs M % 4 == 0.
    AlignedOp(
        op=torch.ops.fusionpasses.block_fp8_mm.default,
        aligned_args=((0, 0), (2, 1)),
        alignment=ALIGN_M,
        direct=torch.ops.fusionpasses.block_fp8_mm.default,
    ),
)

_BY_OP = {spec.op: spec for spec in ALIGNED_OPS}


class Declined(Exception):
    """A candidate the pass leaves alone; the message is the reason."""


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise Declined(reason)


@dataclass(frozen=True)
class PaddedRegion:
    """pad(s) -> aligned op -> single-user chain -> slice back to M: the nodes that move into the cond."""

    spec: AlignedOp
    op_node: fx.Node
    pads: tuple[Pad, ...]
    chain: tuple[fx.Node, ...]
    slice_back: SliceBack

    def nodes(self) -> list[fx.Node]:
        """Every node of the region in an order that copies correctly: fillers, pads, op, chain, slice."""
        ordered = [h for pad in self.pads for h in pad.helpers] + [pad.node for pad in self.pads]
        return list(dict.fromkeys([*ordered, self.op_node, *self.chain, self.slice_back.node]))

    def operands(self) -> list[fx.Node]:
        """The values the region reads from outside, in first-use order: the cond's operands."""
        nodes = self.nodes()
        inside = set(nodes)
        return list(dict.fromkeys(arg for n in nodes for arg in n.all_input_nodes if arg not in inside))

    def replace(self) -> fx.Node:
        """Insert ``cond(M % align != 0, padded, direct, operands)[0]`` in place of the slice.

        Everything that can fail (building the branches, checking they agree) happens before the
        graph is touched: a :class:`Declined` leaves it exactly as it was.
        """
        operands = self.operands()
        padded, direct = self._branch(operands, direct=False), self._branch(operands, direct=True)
        output = self._propagate_fake_values(operands, padded, direct)

        graph = self.op_node.graph
        owner = graph.owning_module
        index = 0
        while hasattr(owner, f"cond_padding_padded_{index}") or hasattr(owner, f"cond_padding_direct_{index}"):
            index += 1
        padded_name, direct_name = f"cond_padding_padded_{index}", f"cond_padding_direct_{index}"
        owner.add_submodule(padded_name, padded)
        owner.add_submodule(direct_name, direct)
        dim = self.spec.aligned_args[0][1]
        with graph.inserting_before(self.slice_back.node):
            unaligned = insert_unaligned_predicate(graph, self.pads[0].source, dim, self.spec.alignment)
            padded_attr = graph.get_attr(padded_name)
            direct_attr = graph.get_attr(direct_name)
            cond = graph.call_function(torch.ops.higher_order.cond, (unaligned, padded_attr, direct_attr, tuple(operands)))
            cond.meta["val"] = (output,)
            result = graph.call_function(operator.getitem, (cond, 0))
            result.meta["val"] = output
        for key in ("stack_trace", "nn_module_stack"):
            if key in self.op_node.meta:
                cond.meta[key] = result.meta[key] = self.op_node.meta[key]
        self.slice_back.node.replace_all_uses_with(result)
        for n in reversed(self.nodes()):
            if not n.users:
                graph.erase_node(n)
        return cond

    def _branch(self, operands: list[fx.Node], direct: bool) -> fx.GraphModule:
        """The region as it is (padded), or with the pads bypassed and the op swapped (direct)."""
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for operand in operands:
            env[operand] = graph.placeholder(operand.name)
        pad_sources = {pad.node: pad.source for pad in self.pads}
        helpers = {h for pad in self.pads for h in pad.helpers}
        for n in self.nodes():
            if direct and n in pad_sources:
                env[n] = env[pad_sources[n]]  # the pad is empty whenever this branch runs
                continue
            if direct and n in helpers:
                continue
            copy = graph.node_copy(n, lambda arg: env[arg])
            if direct and n is self.op_node:
                copy.target = self.spec.direct
            env[n] = copy
        graph.output((env[self.slice_back.node],))
        return fx.GraphModule(torch.nn.Module(), graph)

    def _propagate_fake_values(
        self, operands: list[fx.Node], padded: fx.GraphModule, direct: fx.GraphModule
    ) -> torch.Tensor:
        """Fake values for every branch node, which Inductor lowers the branches from. The branches'
        outputs must agree in dtype, shape and strides, as cond requires; returns that output."""
        fake_args = [val(o) for o in operands]
        mode = detect_fake_mode([a for a in fake_args if isinstance(a, torch.Tensor)])
        _require(mode is not None, "no fake values on the operands")
        outputs = []
        for branch in (padded, direct):
            try:
                FakeTensorProp(branch, mode).propagate_dont_convert_inputs(*fake_args)
            except Exception as e:  # a fake impl rejecting the branch's inputs: leave the region alone
                raise Declined(f"fake propagation of a branch failed: {type(e).__name__}: {e}") from e
            outputs.append(val(branch.graph.output_node().args[0][0]))
        # Inductor makes a custom op's inputs match the strides recorded in "eager_input_vals". The
        # direct branch's copies still carry the padded inputs' (a row stride of M + amount where the
        # input has M), and matching those would install the guard M % align == 0: record what they
        # receive now.
        for n in direct.graph.nodes:
            if "eager_input_vals" in n.meta:
                n.meta["eager_input_vals"] = pytree.tree_map_only(fx.Node, val, (n.args, n.kwargs))
        a, b = outputs
        _require(
            a.dtype == b.dtype
            and a.dim() == b.dim()
            and all(provably_equal(x, y) for x, y in zip(a.shape, b.shape))
            and all(provably_equal(x, y) for x, y in zip(a.stride(), b.stride())),
            f"the branches' outputs differ: {tuple(a.shape)} {a.stride()} vs {tuple(b.shape)} {b.stride()}",
        )
        return a


def _arg(node: fx.Node, index: int) -> Any:
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get(node.target._schema.arguments[index].name)  # type: ignore[union-attr]


def _arg_name(spec: AlignedOp, index: int) -> str:
    return spec.op._schema.arguments[index].name


def match_region(op_node: fx.Node, spec: AlignedOp) -> PaddedRegion | None:
    """The padded region around ``op_node``; None when no aligned input is padded (a plain call).

    Raises :class:`Declined` with the reason when the inputs are padded but the region cannot be
    proven safe to branch.
    """
    pads = [match_pad(_arg(op_node, index)) for index, _ in spec.aligned_args]
    if all(p is None for p in pads):
        return None
    size = _check_pads(spec, pads)
    chain, slice_back = _chain_to_slice_back(op_node, spec, size)
    for n in (op_node, *chain):
        _require(
            not is_communication(n),
            f"branch would contain a collective ({n.target}): its size checks would install guards that "
            f"specialize the cond",
        )
    _require(op_node.graph.owning_module is not None, "the graph has no owning module to hold the branches")
    return PaddedRegion(spec, op_node, tuple(pads), tuple(chain), slice_back)


def _check_pads(spec: AlignedOp, pads: list[Pad | None]) -> SizeValue:
    """Every aligned input padded at the end of its aligned dim only, by the round-up of one symbolic
    size; returns that size (M)."""
    sizes = []
    for (index, dim), pad in zip(spec.aligned_args, pads):
        name = _arg_name(spec, index)
        _require(pad is not None, f"{name} is not padded, the other aligned inputs are")
        padded_dims = pad.padded_dims()
        _require(
            padded_dims == [dim],
            f"pad not on the aligned dim: {name} is padded on dims {padded_dims}, the aligned dim is {dim}",
        )
        _require(static_int(pad.widths[dim][0]) == 0, f"{name} is padded before its start on dim {dim}")
        sizes.append(val(pad.source).shape[dim])
    size = sizes[0]
    _require(is_symbolic(size), f"M is static ({size}): whether to pad is decided at compile time")
    _require(
        all(provably_equal(s, size) for s in sizes),
        f"the aligned sizes of the inputs are not provably equal: {sizes}",
    )
    for (index, dim), pad in zip(spec.aligned_args, pads):
        amount = pad.widths[dim][1]
        _require(
            is_round_up_amount(amount, size, spec.alignment),
            f"amount {amount} of {_arg_name(spec, index)} is not the round-up of the symbolic size {size} "
            f"to a multiple of {spec.alignment}",
        )
    return size


def _chain_to_slice_back(op_node: fx.Node, spec: AlignedOp, size: SizeValue) -> tuple[list[fx.Node], SliceBack]:
    """The single-user nodes from the op to the slice that keeps the first ``size`` rows."""
    chain: list[fx.Node] = []
    node = op_node
    while True:
        users = list(node.users)
        _require(len(users) == 1, f"{node.name} has {len(users)} users: the padded result escapes the region")
        user = users[0]
        _require(user.op == "call_function", f"the padded result reaches the graph output without a slice back to {size}")
        slice_back = match_slice(user)
        if slice_back is not None and slice_back.dim == spec.out_dim:
            break
        _require(len(chain) < MAX_CHAIN, f"no slice back to {size} within {MAX_CHAIN} nodes of the op")
        chain.append(user)
        node = user
    _require(
        static_int(slice_back.start) == 0 and static_int(slice_back.step) == 1 and provably_equal(slice_back.end, size),
        f"the slice keeps [{slice_back.start}:{slice_back.end}:{slice_back.step}], not the first {size} rows",
    )
    return chain, slice_back


class CondPaddingPass(FusionPass):
    """Unconditional pad -> aligned op -> slice back becomes torch.cond(M % align != 0, padded, direct)."""

    name = "cond_padding"

    def run(self, graph: fx.Graph) -> None:
        candidates = [n for n in graph.nodes if n.op == "call_function" and n.target in _BY_OP]
        for op_node in candidates:
            spec = _BY_OP[op_node.target]
            try:
                region = match_region(op_node, spec)
                if region is None:
                    continue
                region.replace()
            except Declined as reason:
                self.decline(spec.pattern, op_node, str(reason))
            else:
                self.matched(spec.pattern, op_node)
