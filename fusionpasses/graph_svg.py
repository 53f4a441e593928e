"""FX graphs as SVG pictures, with no dependency beyond the standard library (no graphviz on CI).

The layout is a plain layered one, which suits the long, narrow graphs of transformer layers:

- a node's layer is one below its deepest input, then every node with users moves down to right
  above its first user, so weights and side chains sit where they are consumed (short edges);
- within a layer, nodes go where the mean of their inputs is, pushed right just enough to not overlap.

:func:`graph_changes` says which nodes a pass added, removed or rewired, and :func:`render_svg` draws
a graph (or only the neighbourhood of those changes) with them highlighted.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .inspection import NodeView

ADDED, REMOVED, REWIRED, DECLINED = "added", "removed", "rewired", "declined"

_LAYER_HEIGHT = 54
_BOX_HEIGHT = 30
_GAP_X = 14
_MARGIN = 12
_CHAR_WIDTH = 6.6  # of the 11px monospace label
_SHAPE_CHAR_WIDTH = 5.4  # of the 9px monospace shape line
_MAX_BOX_WIDTH = 250.0
_MAX_SHAPE_CHARS = int((_MAX_BOX_WIDTH - 16) / _SHAPE_CHAR_WIDTH)
_COMPONENT_GAP = 26

_COLLECTIVE_NAMESPACES = ("_c10d_functional.", "c10d_functional.", "symm_mem.")
_GEMM_OPS = ("aten.mm.", "aten.addmm.", "aten.bmm.", "aten._scaled_mm.", "aten._scaled_mm_v2.")


@dataclass(frozen=True)
class GraphChanges:
    """What one pass did to a graph, by node name (FX keeps the names of nodes it does not touch)."""

    added: frozenset[str]
    removed: frozenset[str]
    rewired: frozenset[str]

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed or self.rewired)

    def marks_before(self) -> dict[str, str]:
        return {**{n: REWIRED for n in self.rewired}, **{n: REMOVED for n in self.removed}}

    def marks_after(self) -> dict[str, str]:
        return {**{n: REWIRED for n in self.rewired}, **{n: ADDED for n in self.added}}

    def summary(self) -> str:
        return f"+{len(self.added)} added, -{len(self.removed)} removed, {len(self.rewired)} rewired"


def graph_changes(before: Sequence[NodeView], after: Sequence[NodeView]) -> GraphChanges:
    old = {n.name: n for n in before}
    new = {n.name: n for n in after}
    rewired = {
        name
        for name, n in new.items()
        if name in old and (old[name].target != n.target or old[name].inputs != n.inputs) and n.op != "output"
    }
    return GraphChanges(frozenset(new.keys() - old.keys()), frozenset(old.keys() - new.keys()), frozenset(rewired))


def short_target(node: NodeView) -> str:
    """``mm`` for ``aten.mm.default``, ``symm_mem.fused_all_gather_matmul`` for a symm_mem op."""
    if node.op in ("placeholder", "get_attr", "output"):
        return node.name if node.op != "output" else "output"
    parts = node.target.split(".")
    if len(parts) >= 3 and parts[-1] in ("default", "Tensor", "Scalar", "int", "dim", "self", "Tensor_Scalar"):
        parts = parts[:-1]
    if parts[0] in ("aten", "prims", "_operator", "operator"):
        parts = parts[1:]
    elif parts[0] in ("_c10d_functional", "c10d_functional"):
        parts = parts[1:]
    return ".".join(parts) or node.target


def short_shape(shape: str) -> str:
    """The shape line of a box: multi-output nodes that do not fit say how many outputs they have."""
    if len(shape) <= _MAX_SHAPE_CHARS:
        return shape
    outputs = shape.count("], ") + 1
    return f"{outputs} outputs" if outputs > 1 else shape[: _MAX_SHAPE_CHARS - 1] + "…"


def node_kind(node: NodeView) -> str:
    if node.op in ("placeholder", "get_attr"):
        return "input"
    if node.op == "output":
        return "output"
    if node.target.startswith(_COLLECTIVE_NAMESPACES):
        return "collective"
    namespace, _, rest = node.target.partition(".")
    if node.target.startswith(_GEMM_OPS) or (namespace == "fusionpasses" and "mm" in rest.split(".")[0]):
        return "gemm"
    return "op"


@dataclass
class _Box:
    node: NodeView
    layer: int
    width: float
    x: float = 0.0
    y: float = 0.0

    @property
    def center(self) -> float:
        return self.x + self.width / 2


@dataclass
class _Component:
    boxes: list[_Box] = field(default_factory=list)
    width: float = 0.0
    height: float = 0.0


def _layout_component(nodes: list[NodeView]) -> _Component:
    names = {n.name for n in nodes}
    preds = {n.name: [i for i in n.inputs if i in names] for n in nodes}
    users: dict[str, list[str]] = {n.name: [] for n in nodes}
    for n in nodes:
        for i in preds[n.name]:
            users[i].append(n.name)

    layer: dict[str, int] = {}
    for n in nodes:  # nodes are in topological (graph) order
        layer[n.name] = 1 + max(layer[p] for p in preds[n.name]) if preds[n.name] else 0
    for n in reversed(nodes):
        if users[n.name]:
            # As late as possible: right above the first user, so a chain hangs next to where it is
            # consumed (weights and side branches too) instead of everything bunching at the top.
            layer[n.name] = min(layer[u] for u in users[n.name]) - 1

    boxes = {
        n.name: _Box(n, layer[n.name], max(64.0, min(_MAX_BOX_WIDTH, max(
            _CHAR_WIDTH * len(short_target(n)), _SHAPE_CHAR_WIDTH * len(short_shape(n.shape))) + 16)))
        for n in nodes
    }
    by_layer: dict[int, list[_Box]] = {}
    for n in nodes:
        by_layer.setdefault(layer[n.name], []).append(boxes[n.name])

    def place(row: list[_Box], desired: dict[str, float]) -> None:
        row.sort(key=lambda b: desired[b.node.name])
        right = 0.0
        for b in row:
            b.x = max(desired[b.node.name] - b.width / 2, right)
            right = b.x + b.width + _GAP_X

    # Top-down: operations under the mean of their operation inputs (sources are placed after).
    for depth in sorted(by_layer):
        row = [b for b in by_layer[depth] if preds[b.node.name]]
        desired = {}
        for b in row:
            anchors = [boxes[p].center for p in preds[b.node.name] if preds[p]]
            desired[b.node.name] = sum(anchors) / len(anchors) if anchors else 0.0
        place(row, desired)
    # Then the sources, over the mean of their users, around the operations already placed.
    for depth in sorted(by_layer):
        fixed = [b for b in by_layer[depth] if preds[b.node.name]]
        free = [b for b in by_layer[depth] if not preds[b.node.name]]
        desired = {b.node.name: b.center for b in fixed}
        for b in free:
            us = [boxes[u].center for u in users[b.node.name]]
            desired[b.node.name] = sum(us) / len(us) if us else 0.0
        place(fixed + free, desired)

    shift = -min((b.x for b in boxes.values()), default=0.0)
    for b in boxes.values():
        b.x += shift
        b.y = b.layer * _LAYER_HEIGHT
    comp = _Component(list(boxes.values()))
    comp.width = max((b.x + b.width for b in comp.boxes), default=0.0)
    comp.height = (max(layer.values(), default=0) + 1) * _LAYER_HEIGHT - (_LAYER_HEIGHT - _BOX_HEIGHT)
    return comp


def _components(nodes: Sequence[NodeView]) -> list[list[NodeView]]:
    """Weakly connected components, each in graph order, ordered by their first node."""
    parent = {n.name: n.name for n in nodes}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for n in nodes:
        for i in n.inputs:
            if i in parent:
                parent[find(i)] = find(n.name)
    groups: dict[str, list[NodeView]] = {}
    for n in nodes:
        groups.setdefault(find(n.name), []).append(n)
    return list(groups.values())


def neighbourhood(nodes: Sequence[NodeView], centre: Iterable[str], hops: int = 1) -> list[NodeView]:
    """``centre`` and every node within ``hops`` edges of it (either direction), in graph order."""
    adjacent: dict[str, set[str]] = {n.name: set() for n in nodes}
    for n in nodes:
        for i in n.inputs:
            if i in adjacent:
                adjacent[n.name].add(i)
                adjacent[i].add(n.name)
    keep = {c for c in centre if c in adjacent}
    frontier = set(keep)
    for _ in range(hops):
        frontier = {m for f in frontier for m in adjacent[f]} - keep
        keep |= frontier
    return [n for n in nodes if n.name in keep]


def render_svg(nodes: Sequence[NodeView], marks: dict[str, str] | None = None, *, title: str = "") -> str:
    """An inline ``<svg>`` of ``nodes`` (one picture per connected component, stacked top to bottom).

    ``marks`` maps node names to ADDED / REMOVED / REWIRED / DECLINED, drawn as CSS classes the
    report styles.
    Every node carries a ``<title>`` tooltip (name, target, shape) and ``data-name``/``data-target``
    attributes, so the page can be searched and tested without parsing the drawing.
    """
    marks = marks or {}
    comps = [_layout_component(c) for c in _components(nodes)]
    width = max((c.width for c in comps), default=0.0) + 2 * _MARGIN
    y = float(_MARGIN)
    parts: list[str] = []
    for k, comp in enumerate(comps):
        if k:
            parts.append(f'<line class="sep" x1="0" x2="{width:.0f}" y1="{y - _COMPONENT_GAP / 2:.0f}" y2="{y - _COMPONENT_GAP / 2:.0f}"/>')
        index = {b.node.name: b for b in comp.boxes}
        for b in comp.boxes:
            for i in b.node.inputs:
                if i in index:
                    parts.append(_edge(index[i], b, y, marks))
        for b in comp.boxes:
            parts.append(_node(b, y, marks.get(b.node.name)))
        y += comp.height + _COMPONENT_GAP
    height = max(y - _COMPONENT_GAP + _MARGIN, 2 * _MARGIN)
    label = f' aria-label="{html.escape(title)}"' if title else ""
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="graph" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" role="img"{label}>'
        '<defs><marker id="arrow" viewBox="0 0 8 8" refX="7" refY="4" markerWidth="6" markerHeight="6" '
        'orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#8a93a0"/></marker></defs>' + "".join(parts) + "</svg>"
    )


def _edge(src: _Box, dst: _Box, y0: float, marks: dict[str, str]) -> str:
    x1, y1 = src.center + _MARGIN, src.y + y0 + _BOX_HEIGHT
    x2, y2 = dst.center + _MARGIN, dst.y + y0
    bend = (y2 - y1) / 2
    hot = marks.get(dst.node.name) in (ADDED, REMOVED, REWIRED) or marks.get(src.node.name) in (ADDED, REMOVED)
    cls = "edge hot" if hot else "edge"
    return (
        f'<path class="{cls}" d="M{x1:.1f},{y1:.1f} C{x1:.1f},{y1 + bend:.1f} {x2:.1f},{y2 - bend:.1f} '
        f'{x2:.1f},{y2 - 1:.1f}" marker-end="url(#arrow)"/>'
    )


def _node(b: _Box, y0: float, mark: str | None) -> str:
    n = b.node
    classes = " ".join(c for c in ("node", node_kind(n), mark) if c)
    x, y = b.x + _MARGIN, b.y + y0
    tip = html.escape(f"{n.name} = {n.target}" + (f"\n{n.shape}" if n.shape else ""))
    label = html.escape(short_target(n))
    shape = html.escape(short_shape(n.shape))
    text = (
        f'<text class="label" x="{x + b.width / 2:.1f}" y="{y + 13:.1f}">{label}</text>'
        f'<text class="shape" x="{x + b.width / 2:.1f}" y="{y + 25:.1f}">{shape}</text>'
        if shape
        else f'<text class="label" x="{x + b.width / 2:.1f}" y="{y + 19:.1f}">{label}</text>'
    )
    return (
        f'<g class="{classes}" data-name="{html.escape(n.name)}" data-target="{html.escape(n.target)}">'
        f"<title>{tip}</title>"
        f'<rect x="{x:.1f}" y="{y:.1f}" width="{b.width:.1f}" height="{_BOX_HEIGHT}" rx="5"/>{text}</g>'
    )
