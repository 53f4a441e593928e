"""Matching ``pad(nvfp4_quant(x))`` along K, and the rewrite onto the quant op's own padding.

A candidate is an ``nvfp4_quant`` whose packed values feed an ``aten.constant_pad_nd`` (directly or
through ``aten.view.dtype`` between byte dtypes, e.g. float8 scales viewed as uint8 for the pad). :func:`find_pad_fold` returns a
:class:`NVFP4PadFold` when folding is exactly equivalent, else the reason it is not.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from .graph_utils import call, is_op, static_int, val

aten = torch.ops.aten
BLOCK_SIZE = 16
SWIZZLE_TILE_COLS = 4
_BYTE_DTYPES = (torch.uint8, torch.int8, torch.float8_e4m3fn, torch.float8_e5m2)


def nvfp4_quant_op() -> torch._ops.OpOverload:
    import fusionpasses.kernels  # noqa: F401  (registers the op)

    return torch.ops.fusionpasses.nvfp4_quant.default


@dataclass(frozen=True)
class QuantCall:
    """The arguments of one ``nvfp4_quant`` node, defaults filled in."""

    x: fx.Node
    global_scale: fx.Node
    padded_n: object
    scale_layout: str

    @staticmethod
    def of(node: fx.Node) -> QuantCall:
        names = ("x", "global_scale", "padded_n", "scale_layout")
        bound = {"padded_n": None, "scale_layout": "linear", **dict(zip(names, node.args)), **node.kwargs}
        return QuantCall(bound["x"], bound["global_scale"], bound["padded_n"], bound["scale_layout"])

    def width(self) -> int | None:
        """K of the op's output (padded_n, else N), when it is a static int."""
        if self.padded_n is not None:
            return static_int(self.padded_n)
        x = val(self.x)
        return None if x is None else static_int(x.shape[-1])


@dataclass(frozen=True)
class PadUse:
    """A trailing zero pad of the last dim applied to one output, maybe through byte dtype views."""

    pad: fx.Node
    views: tuple[fx.Node, ...]
    amount: int

    def nodes(self) -> list[fx.Node]:
        """The pad and its views, users first (the order to erase them in)."""
        return [self.pad, *reversed(self.views)]

    def rebuild(self, graph: fx.Graph, output: fx.Node) -> fx.Node:
        """What replaces the pad: the new output, viewed as the pad's input was."""
        return output if not self.views else call(graph, aten.view.dtype, output, self.views[-1].args[1])


def _pad_amount(pad: fx.Node) -> int | str:
    """Elements a constant_pad_nd appends to the end of the last dim, or why it is not such a pad."""
    amounts = [static_int(a) for a in pad.args[1]]
    if any(a is None for a in amounts):
        return "the pad amounts are dynamic"
    value = pad.args[2] if len(pad.args) > 2 else pad.kwargs.get("value", 0)
    if not isinstance(value, (int, float)) or value != 0 or math.copysign(1.0, value) < 0:
        return f"the pad value is {value!r}, not 0"
    before, after = amounts[0], amounts[1] if len(amounts) > 1 else 0
    if any(amounts[2:]):
        return f"the pad {amounts} also pads dims other than the last (K); only K can be folded"
    if before != 0:
        return f"the pad {amounts} pads before the first column of K"
    if after < 0:
        return f"the pad {amounts} crops K"
    if after == 0:
        return "the pad appends nothing"
    return after


def _pad_uses(output: fx.Node) -> tuple[list[PadUse], list[fx.Node]]:
    """Pads of ``output`` (through byte dtype views that have no other user), and its other users."""
    pads: list[PadUse] = []
    others: list[fx.Node] = []
    for user in output.users:
        views: list[fx.Node] = []
        target = user
        while is_op(target, aten.view.dtype) and target.args[1] in _BYTE_DTYPES and len(target.users) == 1:
            views.append(target)
            target = next(iter(target.users))
        if is_op(target, aten.constant_pad_nd.default):
            pads.append(PadUse(target, tuple(views), 0))
        else:
            others.append(user)
    return pads, others


def _with_amount(use: PadUse) -> PadUse | str:
    amount = _pad_amount(use.pad)
    return amount if isinstance(amount, str) else PadUse(use.pad, use.views, amount)


def _outputs(node: fx.Node) -> dict[int, fx.Node] | str:
    outputs: dict[int, fx.Node] = {}
    for user in node.users:
        if not (is_op(user, operator.getitem) and user.args[1] in (0, 1)) or user.args[1] in outputs:
            return f"its output is used by {user.format_node()} rather than one getitem per output"
        outputs[user.args[1]] = user
    return outputs


@dataclass(frozen=True)
class NVFP4PadFold:
    """``nvfp4_quant(x, gs, width)`` whose values (and linear scales) are zero-padded to ``padded_n``."""

    quant: fx.Node
    call_args: QuantCall
    values: fx.Node
    values_pad: PadUse
    scales: fx.Node | None
    scales_pad: PadUse | None
    padded_n: int

    def replace(self, graph: fx.Graph) -> fx.Node:
        """Emit ``nvfp4_quant(x, gs, padded_n)`` in place of the quant and its pads; returns the new quant."""
        args = self.call_args
        with graph.inserting_before(self.quant):
            quant = call(graph, nvfp4_quant_op(), args.x, args.global_scale, self.padded_n, args.scale_layout)
            values = call(graph, operator.getitem, quant, 0)
            scales = call(graph, operator.getitem, quant, 1)
            self.values_pad.pad.replace_all_uses_with(self.values_pad.rebuild(graph, values))
            if self.scales_pad is not None:
                self.scales_pad.pad.replace_all_uses_with(self.scales_pad.rebuild(graph, scales))
            elif self.scales is not None:
                # Same shape and bytes: the layout's padding already covered the new blocks.
                self.scales.replace_all_uses_with(scales)
        dead = [*self.values_pad.nodes(), self.values]
        if self.scales_pad is not None:
            dead += self.scales_pad.nodes()
        if self.scales is not None:
            dead.append(self.scales)
        for node in [*dead, self.quant]:
            graph.erase_node(node)
        if not scales.users:
            graph.erase_node(scales)
        return quant


def find_pad_fold(node: fx.Node) -> NVFP4PadFold | str | None:
    """The fold for one ``nvfp4_quant`` node; a reason when it has pads that cannot be folded; None when
    it has no pads at all (not a candidate)."""
    outputs = _outputs(node)
    if isinstance(outputs, str):
        return outputs
    values, scales = outputs.get(0), outputs.get(1)
    value_pads, value_others = _pad_uses(values) if values is not None else ([], [])
    scale_pads, _ = _pad_uses(scales) if scales is not None else ([], [])
    if not value_pads:
        return "only the scales are padded, not the packed values" if scale_pads else None
    if len(value_pads) > 1 or value_others:
        return "the unpadded packed values have other users; folding would leave a second quantization"
    values_pad = _with_amount(value_pads[0])
    if isinstance(values_pad, str):
        return values_pad

    call_args = QuantCall.of(node)
    width = call_args.width()
    if width is None:
        return "K (x.shape[1] or padded_n) is not a static size"
    padded_n = width + 2 * values_pad.amount
    if padded_n % BLOCK_SIZE != 0:
        return f"the values are padded to K = {padded_n}, not a multiple of {BLOCK_SIZE} (whole scale blocks)"

    scales_pad = None
    if call_args.scale_layout == "swizzled":
        if scale_pads:
            return ("the swizzled scales are padded as a 2-D tensor, which is not the 128x4-tile layout "
                    "of the padded K")
        old_cols = _round_up(width // BLOCK_SIZE, SWIZZLE_TILE_COLS)
        new_cols = _round_up(padded_n // BLOCK_SIZE, SWIZZLE_TILE_COLS)
        if scales is not None and scales.users and old_cols != new_cols:
            return (f"K = {padded_n} needs {new_cols} swizzled scale columns but the graph keeps using the "
                    f"{old_cols} of K = {width}")
    elif scales is not None and scales.users:
        extra_blocks = (padded_n - width) // BLOCK_SIZE
        if len(scale_pads) != 1 or len(scales.users) != 1:
            return (f"the linear scales must be padded by {extra_blocks} blocks alongside the values, and "
                    "have no other users")
        scales_pad = _with_amount(scale_pads[0])
        if isinstance(scales_pad, str):
            return f"scales: {scales_pad}"
        if scales_pad.amount != extra_blocks:
            return (f"the values are padded to K = {padded_n} ({extra_blocks} more blocks) but the scales by "
                    f"{scales_pad.amount} blocks")
    return NVFP4PadFold(node, call_args, values, values_pad, scales, scales_pad, padded_n)


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple
