"""Matching the traced "per-tensor FP8 quantize + head_dim pad" of attention operands.

A model that quantizes Q/K/V for FP8 attention traces, after Inductor's decompositions, to::

    xf = convert_element_type(x, float32)          # optional: x may be divided as bf16 -> fp32 directly
    y  = div(xf, scale)                            # scale: float32 one-element tensor, or a number
    y  = clamp_max(clamp_min(y, -448), 448)        # or clamp(y, -448, 448), in either order
    q  = convert_element_type(y, float8_e4m3fn)
    q  = constant_pad_nd(q, [0, pad], 0)           # head_dim up to a multiple of 16

with the pad either last (:class:`QuantThenPadMatch`), first, on ``x`` (:class:`PadThenQuantMatch`), or
absent when ``q`` only feeds ``fusionpasses.fp8_attention`` (:class:`QuantForAttentionMatch`). Each match
replaces the chain with one ``fusionpasses.qkv_fp8_quant(x, scale, pad)``. The op divides in fp32
exactly like the chain, so the rewrite is bit-exact; chains it cannot prove that of are declined (a
division rounded to bf16 first, other clamp bounds, broadcasting scales, shared intermediates).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

import fusionpasses.kernels  # noqa: F401  (registers the op the matches emit)
from fusionpasses.kernels.qkv_fp8_quant import FP8_DTYPE, FP8_MAX, INPUT_DTYPES

from .graph_utils import aten, call, is_op, static_int, val

prims = torch.ops.prims
fusionpasses_ops = torch.ops.fusionpasses

# Where the replaced node came from, for stack traces and profiler names.
PROVENANCE_META = ("stack_trace", "nn_module_stack", "source_fn_stack", "original_aten", "seq_nr")


class NotRewritable(Exception):
    """A candidate the pass must leave alone; the message is the decline reason."""


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise NotRewritable(reason)


def _known_equal(a: Any, b: Any) -> bool:
    return statically_known_true(a == b)


def _fake(node: Any, name: str) -> torch.Tensor:
    _require(isinstance(node, fx.Node), f"{name} is not a graph value")
    value = val(node)
    _require(isinstance(value, torch.Tensor), f"{name} has no fake tensor metadata")
    return value


def is_e4m3_cast(node: Any) -> bool:
    if is_op(node, prims.convert_element_type.default):
        return node.args[1] == FP8_DTYPE
    if is_op(node, aten._to_copy.default):
        return node.kwargs == {"dtype": FP8_DTYPE}
    return False


def _clamp_bounds(node: fx.Node) -> tuple[fx.Node, float | None, float | None] | None:
    """(input, lower, upper) of a clamp node, None for any other node."""
    if is_op(node, aten.clamp_min.default):
        return node.args[0], node.args[1], None
    if is_op(node, aten.clamp_max.default):
        return node.args[0], None, node.args[1]
    if is_op(node, aten.clamp.default):
        args = [*node.args, None, None][:3]
        return args[0], node.kwargs.get("min", args[1]), node.kwargs.get("max", args[2])
    return None


def _last_dim_pad(node: fx.Node) -> int:
    """The number of zero columns a ``constant_pad_nd`` appends to the last dim (raises otherwise)."""
    widths = node.args[1]
    value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0)
    _require(value == 0, f"pads with {value}, not zero")
    _require(all(isinstance(w, int) for w in widths), f"pad widths {widths} are not static")
    _require(
        len(widths) >= 2 and widths[0] == 0 and all(w == 0 for w in widths[2:]),
        f"pad {widths} is not a right pad of the last dim only",
    )
    _require(widths[1] >= 0, f"pad {widths} crops the last dim")
    return widths[1]


@dataclass
class QuantChain:
    """The nodes from the divided tensor to the e4m3 cast: ``[upcast,] div, clamp..., cast``."""

    x: fx.Node
    scale: fx.Node | float
    div: fx.Node
    nodes: list[fx.Node]

    @classmethod
    def walk_back(cls, cast: fx.Node) -> QuantChain:
        nodes = [cast]
        node = cast.args[0]
        if is_op(node, prims.convert_element_type.default) and node.args[1] in (torch.bfloat16, torch.float16):
            raise NotRewritable(
                f"the division and clamp are rounded to {node.args[1]} before the FP8 cast (a 0-dim or "
                "Python-number scale keeps a bf16/fp16 input in its dtype); the fused op divides in fp32: "
                "divide x.float() by the scale, or use a float32 (1,) scale tensor"
            )
        lower: list[Any] = []
        upper: list[Any] = []
        while isinstance(node, fx.Node) and (bounds := _clamp_bounds(node)) is not None:
            nodes.append(node)
            node, lo, hi = bounds
            if lo is not None:
                lower.append(lo)
            if hi is not None:
                upper.append(hi)
        _require(
            lower == [-FP8_MAX] and upper == [FP8_MAX],
            f"the cast is not preceded by one clamp to [-448, 448] (found lower {lower}, upper {upper}); "
            "an unclamped or differently clamped cast does not saturate like the fused op",
        )
        _require(
            is_op(node, aten.div.Tensor) and not node.kwargs,
            f"the clamp's input is {getattr(node, 'target', node)}, not a true division by the scale",
        )
        nodes.append(node)
        div = node
        x, scale = node.args
        if is_op(x, prims.convert_element_type.default) and x.args[1] == torch.float32 and len(x.users) == 1:
            nodes.append(x)
            x = x.args[0]
        _require(isinstance(x, fx.Node), "the dividend is not a tensor")
        nodes.reverse()
        return cls(x, scale, div, nodes)

    @staticmethod
    def divided_tensor(cast: fx.Node) -> Any:
        """What the chain ending at ``cast`` divides (the input of its upcast), or None if it is no chain."""
        try:
            return QuantChain.walk_back(cast).x
        except NotRewritable:
            return None

    def check(self, source: fx.Node) -> None:
        """Everything the fused op needs to compute exactly this chain, proven on fake values."""
        x = _fake(self.x, "the quantized tensor")
        div = _fake(self.div, "the division")
        _require(
            div.dtype == torch.float32,
            f"the division is computed in {div.dtype}: rounding to it before the FP8 cast is not what the fused "
            "op (an fp32 division) computes; divide x.float() or use a float32 (1,) scale tensor",
        )
        _require(x.dtype in INPUT_DTYPES, f"the quantized tensor is {x.dtype}, not bf16/fp16/fp32")
        _require(
            div.dim() == x.dim() and all(_known_equal(a, b) for a, b in zip(div.shape, x.shape)),
            f"the scale broadcasts the result to {tuple(div.shape)} from {tuple(x.shape)}",
        )
        if isinstance(self.scale, fx.Node):
            scale = _fake(self.scale, "the scale")
            _require(scale.dtype == torch.float32, f"the scale is {scale.dtype}, not float32")
            _require(static_int(scale.numel()) == 1, f"the scale has shape {tuple(scale.shape)}: not one per tensor")
        else:
            _require(
                isinstance(self.scale, (int, float)) and not isinstance(self.scale, bool),
                f"the scale {self.scale!r} is not a number",
            )
        src = _fake(source, "the source tensor")
        _require(src.dim() in (3, 4), f"the source is {src.dim()}-D; the fused op takes (S, H, D) or (B, S, H, D)")
        for node in self.nodes[:-1]:
            _require(len(node.users) == 1, f"{node.name} has other users: fusing would leave it computed anyway")


@dataclass
class QKVQuantMatch(ABC):
    """One quantize(+pad) chain and the fused op that replaces it."""

    pattern: ClassVar[str]

    source: fx.Node
    scale: fx.Node | float
    pad: int
    nodes: list[fx.Node]  # the chain in graph order; the last one's users receive the fused result

    @property
    def output(self) -> fx.Node:
        return self.nodes[-1]

    @classmethod
    @abstractmethod
    def from_anchor(cls, anchor: fx.Node) -> QKVQuantMatch:
        """The match anchored at ``anchor``; raises :class:`NotRewritable` with the reason."""

    def check_output_layout(self) -> None:
        out = _fake(self.output, "the quantized output")
        expected = 1
        for size, stride in reversed(list(zip(out.shape, out.stride()))):
            _require(
                _known_equal(size, 1) or _known_equal(stride, expected),
                f"the quantized tensor has strides {tuple(out.stride())}; the fused op writes a contiguous tensor",
            )
            expected = expected * size

    def replace(self, graph: fx.Graph) -> fx.Node:
        with graph.inserting_before(self.output):
            scale = self.scale
            if not isinstance(scale, fx.Node):
                device = _fake(self.source, "the source tensor").device
                scale = call(
                    graph, aten.full.default, [1], float(scale), dtype=torch.float32, device=device, pin_memory=False
                )
            fused = call(graph, fusionpasses_ops.qkv_fp8_quant.default, self.source, scale, self.pad)
        for key in PROVENANCE_META:
            if key in self.output.meta:
                fused.meta[key] = self.output.meta[key]
        self.output.replace_all_uses_with(fused)
        for node in reversed(self.nodes):
            if not node.users:
                graph.erase_node(node)
        return fused


@dataclass
class QuantThenPadMatch(QKVQuantMatch):
    """``constant_pad_nd(e4m3(clamp(x / scale)), [0, pad])``, anchored at the pad."""

    pattern: ClassVar[str] = "quant_then_pad"

    @classmethod
    def from_anchor(cls, anchor: fx.Node) -> QuantThenPadMatch:
        pad = _last_dim_pad(anchor)
        cast = anchor.args[0]
        _require(len(cast.users) == 1, f"the unpadded FP8 tensor {cast.name} has other users")
        chain = QuantChain.walk_back(cast)
        chain.check(chain.x)
        match = cls(chain.x, chain.scale, pad, [*chain.nodes, anchor])
        match.check_output_layout()
        return match


@dataclass
class PadThenQuantMatch(QKVQuantMatch):
    """``e4m3(clamp(constant_pad_nd(x, [0, pad]) / scale))``, anchored at the cast."""

    pattern: ClassVar[str] = "pad_then_quant"

    @classmethod
    def from_anchor(cls, anchor: fx.Node) -> PadThenQuantMatch:
        chain = QuantChain.walk_back(anchor)
        pad_node = chain.x
        pad = _last_dim_pad(pad_node)
        _require(len(pad_node.users) == 1, f"the padded tensor {pad_node.name} has other users")
        source = pad_node.args[0]
        chain.check(source)
        match = cls(source, chain.scale, pad, [pad_node, *chain.nodes])
        match.check_output_layout()
        return match


@dataclass
class QuantForAttentionMatch(QKVQuantMatch):
    """``e4m3(clamp(x / scale))`` with no pad (head_dim already aligned) whose only users are
    ``fusionpasses.fp8_attention``, anchored at the cast."""

    pattern: ClassVar[str] = "quant_for_fp8_attention"

    @classmethod
    def from_anchor(cls, anchor: fx.Node) -> QuantForAttentionMatch:
        chain = QuantChain.walk_back(anchor)
        chain.check(chain.x)
        match = cls(chain.x, chain.scale, 0, chain.nodes)
        match.check_output_layout()
        return match


def find_candidates(graph: fx.Graph) -> Iterator[tuple[type[QKVQuantMatch], fx.Node]]:
    """(match type, anchor) for every e4m3 cast that looks like an attention operand's quantization:
    padded along head_dim before or after, or feeding ``fusionpasses.fp8_attention``. Other FP8 casts
    (e.g. GEMM activations) are not candidates and are not reported."""
    for node in list(graph.nodes):
        if not is_e4m3_cast(node):
            continue
        users = list(node.users)
        pads = [u for u in users if is_op(u, aten.constant_pad_nd.default)]
        if pads:
            yield QuantThenPadMatch, pads[0]
        elif is_op(QuantChain.divided_tensor(node), aten.constant_pad_nd.default):
            yield PadThenQuantMatch, node
        elif users and all(is_op(u, fusionpasses_ops.fp8_attention.default) for u in users):
            yield QuantForAttentionMatch, node
