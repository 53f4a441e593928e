"""Pads, slices and symbolic sizes around ops whose fast path needs one size aligned.

Post-grad graphs spell "pad M up to a multiple of ``align`` then slice back" as::

    amount = (-M) % align                                  (sym nodes: sym_size, neg, mod, ...)
    x_pad  = constant_pad_nd(x, [0, 0, ..., 0, amount], value)        or
    x_pad  = cat([x, full([amount, ...], value)], dim)
    y      = op(x_pad, ...) -> ...                         (a chain of single-user nodes)
    out    = slice(y, dim, 0, M)

These helpers read such nodes into small records and prove facts about their symbolic sizes; the
cond_padding pass decides what to do with them.
"""

from __future__ import annotations

import functools
import operator
import sys
from dataclasses import dataclass
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.utils._sympy.functions import CeilDiv, FloorDiv, Mod, PythonMod

from .graph_utils import aten, is_op, static_int, val

SizeValue = int | torch.SymInt

# Ops that talk to other ranks: functional collectives, SymmetricMemory and torch's c10d ops by
# namespace, anyone else's fused communication op by its process-group argument.
COMMUNICATION_NAMESPACES = frozenset({"_c10d_functional", "_c10d_functional_autograd", "c10d_functional", "c10d", "symm_mem"})
PROCESS_GROUP_ARGUMENTS = frozenset({"group_name", "group", "process_group"})


@dataclass(frozen=True)
class Pad:
    """``node`` = ``source`` padded by ``widths[d] = (before, after)`` along each dim d (fake values)."""

    node: fx.Node
    source: fx.Node
    widths: tuple[tuple[SizeValue, SizeValue], ...]
    helpers: tuple[fx.Node, ...] = ()
    """Nodes that only exist to build the pad (the filler tensor of a ``cat`` pad)."""

    def padded_dims(self) -> list[int]:
        """Dims whose pad is not provably zero on both sides."""
        return [d for d, (lo, hi) in enumerate(self.widths) if not (_is_zero(lo) and _is_zero(hi))]


@dataclass(frozen=True)
class SliceBack:
    node: fx.Node
    source: fx.Node
    dim: int
    start: SizeValue
    end: SizeValue
    step: SizeValue


def _is_zero(x: SizeValue) -> bool:
    return static_int(x) == 0


def _value(arg: Any) -> Any:
    return val(arg) if isinstance(arg, fx.Node) else arg


def match_pad(node: Any) -> Pad | None:
    """``constant_pad_nd`` with non-negative widths, or ``cat([x, full(...)], dim)``; else None."""
    if is_op(node, aten.constant_pad_nd.default):
        source = node.args[0]
        if not isinstance(val(source), torch.Tensor):
            return None
        ndim = val(source).dim()
        flat = [_value(p) for p in node.args[1]]
        if len(flat) % 2 or len(flat) > 2 * ndim or not all(isinstance(w, (int, torch.SymInt)) for w in flat):
            return None
        widths = [(0, 0)] * ndim
        # The pad list starts at the last dim: (last_before, last_after, second_last_before, ...).
        for i in range(len(flat) // 2):
            widths[ndim - 1 - i] = (flat[2 * i], flat[2 * i + 1])
        if any(static_int(w) is not None and static_int(w) < 0 for pair in widths for w in pair):
            return None  # a negative width crops; that is no pad
        return Pad(node, source, tuple(widths))
    if is_op(node, aten.cat.default):
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if len(tensors) != 2 or not is_op(tensors[1], aten.full.default):
            return None
        source, filler = tensors
        if not (isinstance(val(source), torch.Tensor) and isinstance(val(filler), torch.Tensor)):
            return None
        ndim = val(source).dim()
        dim = dim + ndim if dim < 0 else dim
        widths = [(0, 0)] * ndim
        widths[dim] = (0, val(filler).shape[dim])
        return Pad(node, source, tuple(widths), helpers=(filler,))
    return None


def match_slice(node: Any) -> SliceBack | None:
    if not is_op(node, aten.slice.Tensor) or not isinstance(val(node.args[0]), torch.Tensor):
        return None
    names = ("dim", "start", "end", "step")
    defaults = (0, None, None, 1)
    values = [
        node.args[i + 1] if len(node.args) > i + 1 else node.kwargs.get(name, default)
        for i, (name, default) in enumerate(zip(names, defaults))
    ]
    dim, start, end, step = (_value(v) for v in values)
    ndim = val(node.args[0]).dim()
    start = 0 if start is None else start
    end = sys.maxsize if end is None else end
    return SliceBack(node, node.args[0], dim + ndim if dim < 0 else dim, start, end, step)


def is_communication(node: fx.Node) -> bool:
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return False
    if target.namespace in COMMUNICATION_NAMESPACES:
        return True
    return any(arg.name in PROCESS_GROUP_ARGUMENTS for arg in target._schema.arguments)


def is_symbolic(size: SizeValue) -> bool:
    return static_int(size) is None


def provably_equal(a: SizeValue, b: SizeValue) -> bool:
    """a == b for every value of the symbols (no guard is installed)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return bool(statically_known_true(a == b))


def _expr(size: SizeValue) -> sympy.Expr:
    if isinstance(size, torch.SymInt):
        node = size.node
        return node.shape_env.simplify(node.expr) if node.shape_env is not None else node.expr
    return sympy.Integer(size)


def _to_sympy_integer_functions(expr: sympy.Expr) -> sympy.Expr:
    # torch's PythonMod/FloorDiv do not simplify 4q+3 mod 4 for a symbolic q; sympy's Mod/floor do.
    # With a positive divisor (every divisor here is the alignment) the definitions agree.
    return (
        expr.replace(PythonMod, lambda a, b: sympy.Mod(a, b))
        .replace(Mod, lambda a, b: sympy.Mod(a, b))
        .replace(FloorDiv, lambda a, b: sympy.floor(a / b))
        .replace(CeilDiv, lambda a, b: sympy.ceiling(a / b))
    )


def is_round_up_amount(amount: SizeValue, size: SizeValue, align: int) -> bool:
    """True when ``amount == (-size) % align`` for every value of ``size``'s symbols.

    Then the amount is zero exactly when size is aligned. The proof writes size = align*q + r and
    checks, for each remainder r, that the difference evaluates to 0 for a symbolic integer q >= 0.
    A False is "not proven", never "proven wrong".
    """
    if not is_symbolic(size):
        concrete = static_int(amount)
        return concrete is not None and concrete == (-static_int(size)) % align
    return _is_round_up_expr(_expr(amount), _expr(size), align)


@functools.lru_cache(maxsize=256)
def _is_round_up_expr(amount: sympy.Expr, size: sympy.Expr, align: int) -> bool:
    m = sympy.Dummy("m", integer=True, nonnegative=True)
    q = sympy.Dummy("q", integer=True, nonnegative=True)
    amount = _to_sympy_integer_functions(amount)
    in_terms_of_m = amount.xreplace({size: m}) if size.is_Symbol else amount.subs(size, m)
    if in_terms_of_m.free_symbols - {m}:
        return False
    # sympy evaluates Mod(4q + 3, 4) and floor(q + 3/2) for an integer q on construction, so a true
    # identity comes out as a literal 0 (no simplify(): it is slow and only matters for non-identities).
    return all(in_terms_of_m.xreplace({m: align * q + r}) - ((-r) % align) == 0 for r in range(align))


def insert_unaligned_predicate(graph: fx.Graph, source: fx.Node, dim: int, align: int) -> fx.Node:
    """Insert ``sym_size(source, dim) % align != 0`` as nodes (a SymBool), with fake values set.

    Predicates and sizes must be nodes, never raw SymInts in args: inside torch.cond branches a raw
    SymInt prints as a free symbol that the branch code cannot resolve.
    """
    size_val = val(source).shape[dim]
    size = graph.call_function(aten.sym_size.int, (source, dim))
    size.meta["val"] = size_val
    remainder = graph.call_function(operator.mod, (size, align))
    remainder.meta["val"] = size_val % align
    unaligned = graph.call_function(operator.ne, (remainder, 0))
    unaligned.meta["val"] = remainder.meta["val"] != 0
    return unaligned
