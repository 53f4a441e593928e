"""The SVG graph pictures: layout invariants, change detection, and what the drawing carries."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import torch
import torch.fx as fx

from fusionpasses.graph_svg import (
    ADDED,
    REMOVED,
    graph_changes,
    neighbourhood,
    render_svg,
    short_shape,
    short_target,
)
from fusionpasses.inspection import NodeView, snapshot


def _node(name: str, target: str, inputs: list[str], op: str = "call_function", shape: str = "") -> NodeView:
    return NodeView(name=name, op=op, target=target, inputs=inputs, shape=shape)


class _Boxes(HTMLParser):
    """Each node's rectangle and each edge's end points, read back from the SVG."""

    def __init__(self) -> None:
        super().__init__()
        self.boxes: dict[str, tuple[float, float, float, float]] = {}
        self.classes: dict[str, set[str]] = {}
        self.edges: list[tuple[float, float, float, float]] = []
        self._name: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "g" and "data-name" in a:
            self._name = a["data-name"]
            self.classes[self._name] = set(a["class"].split())
        elif tag == "rect" and self._name is not None:
            self.boxes[self._name] = tuple(float(a[k]) for k in ("x", "y", "width", "height"))
            self._name = None
        elif tag == "path" and "edge" in a.get("class", ""):
            nums = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?", a["d"])]
            self.edges.append((nums[0], nums[1], nums[-2], nums[-1]))


def _parse(svg: str) -> _Boxes:
    p = _Boxes()
    p.feed(svg)
    return p


def _diamond_with_weights() -> list[NodeView]:
    return [
        _node("x", "x", [], op="placeholder", shape="bfloat16[8, 64]"),
        _node("w1", "w1", [], op="placeholder"),
        _node("w2", "w2", [], op="placeholder"),
        _node("mm", "aten.mm.default", ["x", "w1"], shape="bfloat16[8, 64]"),
        _node("ar", "_c10d_functional.all_reduce.default", ["mm"]),
        _node("wait", "_c10d_functional.wait_tensor.default", ["ar"]),
        _node("relu", "aten.relu.default", ["x"]),
        _node("add", "aten.add.Tensor", ["wait", "relu"]),
        _node("mm2", "aten.mm.default", ["add", "w2"]),
        _node("lonely", "aten.zeros.default", []),
        _node("output", "output", ["mm2"], op="output"),
    ]


def test_layout_edges_point_down_and_boxes_do_not_overlap():
    nodes = _diamond_with_weights()
    pic = _parse(render_svg(nodes))
    assert set(pic.boxes) == {n.name for n in nodes}
    assert len(pic.edges) == sum(len(n.inputs) for n in nodes)
    for _, y1, _, y2 in pic.edges:
        assert y2 > y1
    rows: dict[float, list[tuple[float, float]]] = {}
    for x, y, w, _ in pic.boxes.values():
        rows.setdefault(y, []).append((x, x + w))
    for spans in rows.values():
        spans.sort()
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False))
    # A weight sits right above the GEMM that reads it, not at the top of the picture.
    assert pic.boxes["w2"][1] == pic.boxes["mm2"][1] - 54
    # Nodes of other components are stacked below, not beside.
    assert pic.boxes["lonely"][1] > max(y for name, (_, y, _, _) in pic.boxes.items() if name != "lonely")


def test_node_kinds_and_marks_become_css_classes():
    nodes = _diamond_with_weights()
    pic = _parse(render_svg(nodes, {"mm": REMOVED, "add": ADDED}))
    assert {"node", "gemm", "removed"} <= pic.classes["mm"]
    assert {"node", "collective"} <= pic.classes["ar"]
    assert {"node", "input"} <= pic.classes["w1"]
    assert "added" in pic.classes["add"]
    assert not pic.classes["relu"] & {"added", "removed", "rewired", "declined"}


def test_graph_changes_on_a_real_rewrite():
    def f(x, w):
        return torch.relu(torch.mm(x, w)) + 1

    gm = fx.symbolic_trace(f)
    before = snapshot(gm.graph).nodes
    mm = next(n for n in gm.graph.nodes if n.target is torch.mm)
    with gm.graph.inserting_before(mm):
        fused = gm.graph.call_function(torch.matmul, mm.args)
    mm.replace_all_uses_with(fused)
    gm.graph.erase_node(mm)
    changes = graph_changes(before, snapshot(gm.graph).nodes)
    assert changes.added == {"matmul"} and changes.removed == {"mm"} and changes.rewired == {"relu"}
    assert changes.summary() == "+1 added, -1 removed, 1 rewired"
    assert changes.marks_before() == {"mm": "removed", "relu": "rewired"}
    assert graph_changes(before, before).changed is False


def test_neighbourhood_keeps_changed_nodes_and_their_direct_neighbours_in_order():
    nodes = _diamond_with_weights()
    near = [n.name for n in neighbourhood(nodes, {"ar"})]
    assert near == ["mm", "ar", "wait"]
    assert [n.name for n in neighbourhood(nodes, {"ar"}, hops=2)] == ["x", "w1", "mm", "ar", "wait", "add"]
    assert neighbourhood(nodes, {"not_in_graph"}) == []


def test_labels_are_short_and_shapes_fit():
    assert short_target(_node("a", "aten.mm.default", [])) == "mm"
    assert short_target(_node("a", "_c10d_functional.all_gather_into_tensor.default", [])) == "all_gather_into_tensor"
    assert short_target(_node("a", "fusionpasses.all_gather_gemm.default", [])) == "fusionpasses.all_gather_gemm"
    assert short_target(_node("a", "aten.add.Tensor", [])) == "add"
    assert short_target(_node("arg0_1", "arg0_1", [], op="placeholder")) == "arg0_1"
    many = ", ".join(["bfloat16[64, 128]"] * 3)
    assert short_shape(many) == "3 outputs"
    assert short_shape("bfloat16[64, 128]") == "bfloat16[64, 128]"
    long_single = "float32[" + ", ".join(["123456"] * 12) + "]"
    assert short_shape(long_single).endswith("…") and len(short_shape(long_single)) < len(long_single)


def test_svg_escapes_names_and_is_standalone():
    nodes = [_node("a<b", "my.op<&>.default", [], shape="f32[1]")]
    svg = render_svg(nodes, title='t"1')
    assert "a<b" not in svg and 'data-name="a&lt;b"' in svg and "my.op&lt;&amp;&gt;.default" in svg
    assert 'xmlns="http://www.w3.org/2000/svg"' in svg and "href" not in svg
    assert render_svg([]).startswith("<svg")
