"""What the passes did: per-pattern match counts, declines with reasons, timings, graph snapshots.

Every pass owns a :class:`PassStats`. The pass manager collects them; ``PassManager.report()`` prints
them and the inspection command renders them into a table and an HTML report.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx


@dataclass
class Decline:
    """A candidate a pass found but left alone, and why."""

    pattern: str
    node: str
    reason: str


@dataclass
class PatternStats:
    matched: int = 0
    declined: list[Decline] = field(default_factory=list)


@dataclass
class NodeView:
    """One FX node, reduced to what a report shows."""

    name: str
    op: str
    target: str
    inputs: list[str]
    shape: str


@dataclass
class GraphSnapshot:
    """A graph as text and as a node list, before or after one pass."""

    text: str
    nodes: list[NodeView]

    def op_histogram(self) -> collections.Counter[str]:
        return collections.Counter(n.target for n in self.nodes if n.op == "call_function")


@dataclass
class PassRun:
    """One call of a pass on one graph (Inductor calls the passes once per graph and subgraph)."""

    graph_index: int
    seconds: float
    before: GraphSnapshot | None = None
    after: GraphSnapshot | None = None


@dataclass
class PassStats:
    name: str
    patterns: dict[str, PatternStats] = field(default_factory=dict)
    runs: list[PassRun] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def pattern(self, pattern: str) -> PatternStats:
        return self.patterns.setdefault(pattern, PatternStats())

    @property
    def matched(self) -> int:
        return sum(p.matched for p in self.patterns.values())

    @property
    def declined(self) -> list[Decline]:
        return [d for p in self.patterns.values() for d in p.declined]

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.runs)

    def matched_count(self, pattern: str) -> int:
        return self.patterns[pattern].matched if pattern in self.patterns else 0

    def reset(self) -> None:
        self.patterns.clear()
        self.runs.clear()
        self.notes.clear()


def target_name(target: Any) -> str:
    """``aten.mm.default`` style names for OpOverloads, ``operator.getitem`` style for functions."""
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}.{target._overloadname}"
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"higher_order.{target.__name__}"
    if isinstance(target, str):
        return target
    module = getattr(target, "__module__", "") or ""
    return f"{module.removeprefix('_')}.{getattr(target, '__name__', repr(target))}".lstrip(".")


def _shape_of(node: fx.Node) -> str:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return f"{str(val.dtype).removeprefix('torch.')}{list(val.shape)}"
    if isinstance(val, (tuple, list)) and val and all(isinstance(v, torch.Tensor) for v in val):
        return ", ".join(f"{str(v.dtype).removeprefix('torch.')}{list(v.shape)}" for v in val)
    return ""


def snapshot(graph: fx.Graph) -> GraphSnapshot:
    nodes = [
        NodeView(
            name=n.name,
            op=n.op,
            target=target_name(n.target),
            inputs=[a.name for a in n.all_input_nodes],
            shape=_shape_of(n),
        )
        for n in graph.nodes
    ]
    return GraphSnapshot(text=str(graph), nodes=nodes)


def op_histogram(graph: fx.Graph) -> collections.Counter[str]:
    return collections.Counter(target_name(n.target) for n in graph.nodes if n.op == "call_function")


def write_dump(directory: str, index: int, pass_name: str, when: str, graph: fx.Graph) -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"graph{index:03d}.{pass_name}.{when}.txt")
    with open(path, "w") as f:
        f.write(str(graph))
    return path


def format_report(stats: list[PassStats]) -> str:
    """A plain-text table: per pass and pattern, matches and declines with reasons."""
    lines = [f"{'pass':<22} {'pattern':<34} {'matched':>7} {'declined':>8}  time"]
    for s in stats:
        if not s.patterns:
            lines.append(f"{s.name:<22} {'(no candidates)':<34} {0:>7} {0:>8}  {s.seconds * 1e3:.1f} ms")
        for i, (name, p) in enumerate(sorted(s.patterns.items())):
            timing = f"{s.seconds * 1e3:.1f} ms" if i == 0 else ""
            lines.append(f"{s.name if i == 0 else '':<22} {name:<34} {p.matched:>7} {len(p.declined):>8}  {timing}")
        for note in s.notes:
            lines.append(f"{'':<22} note: {note}")
    declines = [(s.name, d) for s in stats for d in s.declined]
    if declines:
        lines.append("")
        lines.append("declined:")
        for pass_name, d in declines:
            lines.append(f"  {pass_name}/{d.pattern} at {d.node}: {d.reason}")
    return "\n".join(lines)
