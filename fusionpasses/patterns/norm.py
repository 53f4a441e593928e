"""RMSNorm as post-grad graphs spell it, with the residual add in front and a quantization behind.

What :func:`match_norm_after` recognizes after a reduced tensor ``r`` (the all_reduce result):

    norm        fusionpasses.rms_norm(r, w, eps)
                fusionpasses.fused_add_rms_norm(r, residual, w, eps) -> (normed, residual + r)
                the decomposition hand-written models and F.rms_norm trace to:
                    v = r (or r.to(f32));  v * rsqrt(mean(v**2, -1, keepdim) + eps) [* w] [.to(dt)]
                (also ``v * v`` for the square and ``v / sqrt(...)`` for the scaling)
    residual    add(r, residual) in front of the norm, either operand order, r and residual possibly
                upcast first (``x.float() + residual.float()``); with the fused op, the op itself
    quant       fusionpasses.quant_fp8_static(normed, scale)
                the decomposition (normed.float() / scale).clamp(-448, 448).to(float8_e4m3fn), any
                chain of casts, div/mul by a one-element scale and clamps that ends in an fp8 cast
                fusionpasses.nvfp4_quant(normed, global_scale, padded_n, "linear")

Every node recognized is row-local: it reads only its own token's row of every (M, ...) tensor, and
its other operands (weights, scales, eps) have no token dim. That is what makes running all of them
on a shard of the tokens give the shard of the result, and the matchers check it rather than assume
it (a mean over any dim but the last is not a norm).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

import fusionpasses.kernels  # noqa: F401  (registers the ops matched here)

from .graph_utils import aten, is_op, static_int, val

fusionpasses_ops = torch.ops.fusionpasses
prims = torch.ops.prims

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
CONVERT = prims.convert_element_type.default
_ADD_SCALAR = (aten.add.Tensor, aten.add.Scalar, aten.add_.Tensor, aten.add_.Scalar)
# Elementwise ops a quantization chain is made of; their other operand must be a scalar or one element.
_QUANT_CHAIN_OPS = (
    CONVERT,
    aten.div.Tensor,
    aten.mul.Tensor,
    aten.clamp.default,
    aten.clamp_min.default,
    aten.clamp_max.default,
)


# ---------------------------------------------------------------------------------------------
# Quantization after the norm (one class per kind)
# ---------------------------------------------------------------------------------------------


@dataclass
class Quantization:
    """A quantization of the normed tensor: its nodes, the last ones being what the model reads."""

    nodes: list[fx.Node]

    suffix: ClassVar[str] = "+quant"


@dataclass
class StaticFP8Quant(Quantization):
    """``fusionpasses.quant_fp8_static(normed, scale)``."""

    suffix: ClassVar[str] = "+fp8_quant"


@dataclass
class FP8QuantChain(StaticFP8Quant):
    """The traced form of static FP8 quantization: casts, scale, clamps, fp8 cast."""


@dataclass
class NVFP4Quant(Quantization):
    """``fusionpasses.nvfp4_quant(normed, global_scale, padded_n, "linear")`` and its getitems: packed
    values and block scales, both with one row per token."""

    suffix: ClassVar[str] = "+nvfp4_quant"


def _is_one_element(arg: object) -> bool:
    """A Python number, or a tensor node of one element (a per-tensor scale)."""
    if isinstance(arg, (int, float)):
        return True
    if not isinstance(arg, fx.Node) or not isinstance(val(arg), torch.Tensor):
        return False
    return static_int(val(arg).numel()) == 1


def _scalar_elementwise(node: fx.Node, source: fx.Node) -> bool:
    """``node`` is an elementwise op of ``source`` whose other operands are scalars or one element."""
    if not is_op(node, *_QUANT_CHAIN_OPS) or node.kwargs:
        return False
    if node.target is CONVERT:
        return node.args[0] is source
    if node.target is aten.mul.Tensor and node.args[1] is source:
        others = [node.args[0]]
    elif node.args[0] is source:
        others = [a for a in node.args[1:] if a is not None]
    else:
        return False
    return all(_is_one_element(a) for a in others)


def match_quantization(normed: fx.Node) -> Quantization | str | None:
    """The quantization that is ``normed``'s only consumer, a decline reason, or None when there is none."""
    if len(normed.users) != 1:
        return None
    (user,) = normed.users
    if is_op(user, fusionpasses_ops.quant_fp8_static.default) and user.args[0] is normed:
        return StaticFP8Quant([user]) if _is_one_element(user.args[1]) else None
    nvfp4 = getattr(fusionpasses_ops, "nvfp4_quant", None)
    if nvfp4 is not None and is_op(user, nvfp4.default) and user.args[0] is normed:
        layout = user.args[3] if len(user.args) > 3 else user.kwargs.get("scale_layout", "linear")
        if layout != "linear":
            return (
                f"nvfp4_quant with scale_layout={layout!r}: its block scales are stored in 128-row tiles, "
                "so gathering them along tokens would scramble the tiles; use the 'linear' layout"
            )
        outputs = sorted((g for g in user.users if is_op(g, operator.getitem)), key=lambda g: g.args[1])
        if len(outputs) != len(user.users):
            return None
        return NVFP4Quant([user, *outputs])
    chain: list[fx.Node] = []
    current = normed
    while len(current.users) == 1:
        (step,) = current.users
        if not _scalar_elementwise(step, current):
            break
        chain.append(step)
        current = step
        if val(current) is not None and val(current).dtype in FP8_DTYPES:
            return FP8QuantChain(chain)
    return None


# ---------------------------------------------------------------------------------------------
# The norm
# ---------------------------------------------------------------------------------------------


@dataclass
class NormAfterReduce:
    """An RMSNorm reading a reduced tensor, with its residual add and quantization.

    ``nodes`` holds every node between the reduced tensor and the outputs, in topological order; the
    reduced tensor itself, the residual and the weights/scales are not among them.
    """

    reduced: fx.Node
    form: str
    """Which spelling of the norm: "fusionpasses.rms_norm", "fusionpasses.fused_add_rms_norm" or "decomposed"."""
    normed: fx.Node
    eps: float
    nodes: list[fx.Node]
    residual: fx.Node | None = None
    """The other summand of the residual add in front of the norm (None: the norm reads ``reduced``)."""
    residual_sum: fx.Node | None = None
    """``reduced + residual``: the new residual stream (None when nothing reads it)."""
    quant: Quantization | None = None


@dataclass
class _Norm:
    form: str
    nodes: list[fx.Node]
    normed: fx.Node
    eps: float


def _is_convert_to(node: fx.Node, source: fx.Node) -> bool:
    return is_op(node, CONVERT) and node.args[0] is source


def _itemsize(node: fx.Node) -> int | None:
    v = val(node)
    return v.dtype.itemsize if isinstance(v, torch.Tensor) else None


def _other_operand(node: fx.Node, operand: fx.Node) -> object:
    a, b = node.args[0], node.args[1]
    if a is operand:
        return b
    return a if b is operand else None


def _is_last_dim(dims: object, ndim: int) -> bool:
    return isinstance(dims, (list, tuple)) and len(dims) == 1 and dims[0] in (-1, ndim - 1)


def _weight_like(arg: object, hidden: object) -> bool:
    """A tensor with the hidden size as its only non-1 dim: it broadcasts along tokens."""
    if not isinstance(arg, fx.Node) or not isinstance(val(arg), torch.Tensor):
        return False
    shape = val(arg).shape
    return len(shape) >= 1 and _same_size(shape[-1], hidden) and all(static_int(s) == 1 for s in shape[:-1])


def _same_size(a: object, b: object) -> bool:
    """Sizes provably equal, without installing a shape guard."""
    return a is b or bool(statically_known_true(a == b))


def _same_shape(a: torch.Size, b: torch.Size) -> bool:
    return len(a) == len(b) and all(_same_size(x, y) for x, y in zip(a, b, strict=True))


def _depends_on(node: fx.Node, target: fx.Node) -> bool:
    """Whether ``target`` is an ancestor of ``node``."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n is target:
            return True
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return False


def _single_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _decomposed_norm(source: fx.Node) -> _Norm | None:
    """``v * rsqrt(mean(v**2, -1, keepdim=True) + eps)`` with v = source or an upcast of it, then an
    optional weight multiply and narrowing casts."""
    source_val = val(source)
    if not isinstance(source_val, torch.Tensor) or source_val.dim() < 1:
        return None
    ndim, hidden = source_val.dim(), source_val.shape[-1]
    for v in [source, *(u for u in source.users if _is_convert_to(u, source))]:
        for square in v.users:
            squares = (is_op(square, aten.pow.Tensor_Scalar) and square.args[0] is v and square.args[1] == 2) or (
                is_op(square, aten.mul.Tensor) and square.args[0] is v and square.args[1] is v
            )
            if not squares:
                continue
            mean = _single_user(square)
            if not is_op(mean, aten.mean.dim) or mean.args[0] is not square or mean.kwargs:
                continue
            if not _is_last_dim(mean.args[1], ndim) or not (len(mean.args) > 2 and mean.args[2] is True):
                continue
            add_eps = _single_user(mean)
            # In place on the fresh mean when traced without functionalization (F.rms_norm's decomposition).
            if not is_op(add_eps, *_ADD_SCALAR) or add_eps.kwargs:
                continue
            eps = _other_operand(add_eps, mean)
            if not isinstance(eps, (int, float)) or isinstance(eps, bool):
                continue
            scale = _single_user(add_eps)
            if is_op(scale, aten.rsqrt.default):
                normed = _single_user(scale)
                if not (is_op(normed, aten.mul.Tensor) and _other_operand(normed, scale) is v):
                    continue
            elif is_op(scale, aten.sqrt.default):
                normed = _single_user(scale)
                if not (is_op(normed, aten.div.Tensor) and normed.args[0] is v and normed.args[1] is scale):
                    continue
            else:
                continue
            if normed.kwargs:
                continue
            nodes = ([] if v is source else [v]) + [square, mean, add_eps, scale, normed]
            tail, has_weight = normed, False
            while (step := _single_user(tail)) is not None:
                if not has_weight and is_op(step, aten.mul.Tensor) and not step.kwargs and _weight_like(
                    _other_operand(step, tail), hidden
                ):
                    has_weight = True
                elif _is_convert_to(step, tail) and (_itemsize(step) or 0) <= (_itemsize(tail) or 0):
                    # Narrowing casts only: an upcast after the norm starts a quantization, and
                    # gathering before it moves half the bytes.
                    pass
                else:
                    break
                nodes.append(step)
                tail = step
            return _Norm("decomposed", nodes, tail, float(eps))
    return None


def _norm_of(source: fx.Node) -> _Norm | None:
    """An RMSNorm of ``source``: the rms_norm op, or the decomposition."""
    for user in source.users:
        if is_op(user, fusionpasses_ops.rms_norm.default) and user.args[0] is source:
            return _Norm("fusionpasses.rms_norm", [user], user, float(user.args[2]))
    return _decomposed_norm(source)


def _fused_add_norm(reduced: fx.Node) -> NormAfterReduce | None:
    for user in reduced.users:
        if not is_op(user, fusionpasses_ops.fused_add_rms_norm.default):
            continue
        x, residual = user.args[0], user.args[1]
        if (x is reduced) == (residual is reduced):
            continue  # neither operand, or reduced added to itself
        other = residual if x is reduced else x
        if _depends_on(other, reduced):
            continue  # ``reduced`` is the residual of a later layer's add, not this norm's input
        getitems = {g.args[1]: g for g in user.users if is_op(g, operator.getitem)}
        if 0 not in getitems or len(getitems) != len(user.users):
            continue
        normed, residual_sum = getitems[0], getitems.get(1)
        nodes = [user, normed] + ([residual_sum] if residual_sum is not None else [])
        return NormAfterReduce(
            reduced, "fusionpasses.fused_add_rms_norm", normed, float(user.args[3]), nodes, other, residual_sum
        )
    return None


def _residual_add_norm(reduced: fx.Node) -> NormAfterReduce | None:
    """``add(reduced, residual)`` (each possibly upcast first), then a norm of the sum."""
    shape = val(reduced).shape
    for lhs in [reduced, *(u for u in reduced.users if _is_convert_to(u, reduced))]:
        for add in lhs.users:
            if not is_op(add, aten.add.Tensor) or add.kwargs or len(add.args) != 2:
                continue
            other = _other_operand(add, lhs)
            if not isinstance(other, fx.Node) or _depends_on(other, reduced):
                continue  # ``reduced`` is the residual of a later layer's add (or added to itself)
            other_val = val(other)
            if not isinstance(other_val, torch.Tensor) or not _same_shape(other_val.shape, shape):
                continue  # a bias or a broadcast: not a residual stream
            norm = _norm_of(add)
            if norm is None:
                continue
            nodes = ([] if lhs is reduced else [lhs]) + [add] + norm.nodes
            return NormAfterReduce(reduced, norm.form, norm.normed, norm.eps, nodes, other, add)
    return None


def _plain_norm(reduced: fx.Node) -> NormAfterReduce | None:
    norm = _norm_of(reduced)
    if norm is None:
        return None
    return NormAfterReduce(reduced, norm.form, norm.normed, norm.eps, list(norm.nodes))


def _describe_users(node: fx.Node) -> str:
    from ..inspection import target_name

    names = sorted({target_name(u.target) if u.op == "call_function" else u.op for u in node.users})
    return ", ".join(names) or "nothing"


def match_norm_after(reduced: fx.Node) -> NormAfterReduce | str:
    """The RMSNorm that reads ``reduced`` (a 2-D (tokens, hidden) tensor), or why there is none."""
    reduced_val = val(reduced)
    if not isinstance(reduced_val, torch.Tensor):
        return "the all_reduce result has no fake tensor metadata"
    match = _fused_add_norm(reduced) or _residual_add_norm(reduced) or _plain_norm(reduced)
    if match is None:
        return (
            f"unknown norm: the all_reduce result feeds {_describe_users(reduced)}, not an RMSNorm "
            "(fusionpasses.rms_norm / fused_add_rms_norm, or x * rsqrt(mean(x**2, -1) + eps) * w)"
        )
    quant = match_quantization(match.normed)
    if isinstance(quant, str):
        return quant
    if quant is not None:
        match.quant = quant
        match.nodes.extend(quant.nodes)
    if match.residual_sum is not None:
        # Casts of the sum to a dtype no wider are the residual stream the model keeps (the reference
        # model adds in fp32 and keeps bf16): shard them too, so the next layer reads them in that dtype.
        in_match = set(match.nodes)
        match.nodes.extend(
            u
            for u in match.residual_sum.users
            if u not in in_match
            and _is_convert_to(u, match.residual_sum)
            and (_itemsize(u) or 0) <= (_itemsize(match.residual_sum) or 0)
        )
    return match
