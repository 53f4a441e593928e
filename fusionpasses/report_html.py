"""The inspection report as one self-contained HTML page: inline CSS and SVG, no script, no network.

Sections: a card per pass, the match and decline tables next to the op counts that changed, timings
when measured, each pass's effect on each graph (the changed neighbourhood before and after, the whole
graphs folded away, the text diff), the FusionConfig, and the environment. Tables and graph nodes
carry ids and ``data-`` attributes so that tests and scripts can read the page back.
"""

from __future__ import annotations

import dataclasses
import html
from typing import Any

from .config import FusionConfig
from .graph_svg import DECLINED, neighbourhood, render_svg
from .inspect import GraphRecord, InspectionResult, PassStep, config_line

_CSS = """
:root { --fg:#1f2933; --muted:#667085; --line:#e4e7ec; --bg:#f8fafc; --accent:#2563eb;
        --add:#16a34a; --add-bg:#dcfce7; --rm:#dc2626; --rm-bg:#fee2e2; --rw:#ca8a04; --rw-bg:#fef9c3; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: var(--bg); }
header { background: #0f172a; color: #e2e8f0; padding: 14px 28px 12px; }
header h1 { margin: 0 0 4px; font-size: 20px; font-weight: 600; color: #fff; }
header .meta { color: #94a3b8; font-size: 13px; }
header .meta b { color: #e2e8f0; font-weight: 500; }
main { padding: 8px 28px 40px; max-width: 1800px; }
h2 { font-size: 16px; margin: 20px 0 8px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 14px; margin: 18px 0 6px; }
.overview { display: grid; grid-template-columns: repeat(2, minmax(0, max-content)); gap: 0 36px; align-items: start; }
.overview > div:first-child { max-width: 760px; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin-top: 12px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 6px 12px; }
.card .name { font-weight: 600; font-family: ui-monospace, SFMono-Regular, Menlo, monospace; }
.card .nums { margin-top: 2px; color: var(--muted); }
.card .nums b { font-size: 16px; color: var(--fg); margin-right: 2px; }
.card.exec { max-width: 640px; }
.ok { color: var(--add); } .warn { color: #b45309; }
table { border-collapse: collapse; background: #fff; border: 1px solid var(--line); font-size: 13px; }
th, td { padding: 4px 10px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { background: #f1f5f9; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.mono, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12px; }
tr.changed td { background: #f0f9ff; }
tr.nondefault td { background: #fffbeb; }
.zero { color: #98a2b3; }
.notes { color: var(--muted); margin: 6px 0; padding-left: 18px; }
.legend { display: flex; gap: 14px; flex-wrap: wrap; font-size: 12px; color: var(--muted); margin: 6px 0; }
.legend span::before { content: ""; display: inline-block; width: 12px; height: 12px; border-radius: 3px;
                       margin-right: 5px; vertical-align: -2px; border: 1.5px solid; }
.legend .l-add::before { background: var(--add-bg); border-color: var(--add); }
.legend .l-rm::before { background: var(--rm-bg); border-color: var(--rm); }
.legend .l-rw::before { background: var(--rw-bg); border-color: var(--rw); }
.legend .l-dec::before { background: #fff; border-color: #f97316; border-style: dashed; }
.legend .l-coll::before { background: #fff; border-color: var(--accent); }
.legend .l-gemm::before { background: #fff; border-color: #7c3aed; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 14px; }
.pane { background: #fff; border: 1px solid var(--line); border-radius: 8px; overflow: auto; max-height: 80vh; }
.pane .cap { position: sticky; top: 0; left: 0; background: #fff; padding: 6px 10px; font-size: 12px;
             color: var(--muted); border-bottom: 1px solid var(--line); }
details { margin: 8px 0; }
summary { cursor: pointer; color: var(--accent); }
pre { background: #fff; border: 1px solid var(--line); padding: 10px; overflow: auto; max-height: 520px;
      font-size: 11.5px; line-height: 1.35; }
pre .add { color: var(--add); } pre .rm { color: var(--rm); }
svg.graph { display: block; }
svg .node rect { fill: #fff; stroke: #9aa4b2; stroke-width: 1; }
svg .node.input rect { fill: #f3f4f6; stroke: #d0d5dc; }
svg .node.output rect { fill: #f3f4f6; }
svg .node.collective rect { stroke: var(--accent); stroke-width: 1.8; }
svg .node.gemm rect { stroke: #7c3aed; stroke-width: 1.8; }
svg .node.added rect { fill: var(--add-bg); stroke: var(--add); stroke-width: 2.2; }
svg .node.removed rect { fill: var(--rm-bg); stroke: var(--rm); stroke-width: 2.2; stroke-dasharray: 5 2; }
svg .node.rewired rect { fill: var(--rw-bg); stroke: var(--rw); stroke-width: 2; }
svg .node.declined rect { stroke: #f97316; stroke-width: 2.2; stroke-dasharray: 3 2; }
svg text { text-anchor: middle; font-family: ui-monospace, SFMono-Regular, Menlo, monospace; }
svg text.label { font-size: 11px; fill: #111827; }
svg text.shape { font-size: 9px; fill: #6b7280; }
svg .edge { fill: none; stroke: #c0c6cf; stroke-width: 1; }
svg .edge.hot { stroke: #475569; stroke-width: 1.5; }
svg .sep { stroke: #e5e7eb; stroke-dasharray: 4 4; }
"""

_LEGEND = (
    '<div class="legend"><span class="l-add">added</span><span class="l-rm">removed</span>'
    '<span class="l-rw">rewired (new inputs)</span><span class="l-dec">declined candidate</span>'
    '<span class="l-coll">collective</span><span class="l-gemm">GEMM</span></div>'
)


def _e(value: Any) -> str:
    return html.escape(str(value))


def render_report(result: InspectionResult) -> str:
    env = result.environment
    title = f"fusionpasses inspection: {result.model}"
    meta = (
        f"<b>{_e(result.model)}</b> · inputs <b>{_e(result.inputs)}</b> · world size <b>{result.world_size}</b> "
        f"({_e(result.process_group)} process group, rank {result.rank}) · <b>{_e(result.device)}</b><br>"
        f"{_e(env.get('device', ''))} · torch {_e(env.get('torch', ''))} · {_e(env.get('date', ''))}<br>"
        f"config: <b>{_e(config_line(result.config))}</b>"
    )
    body = [
        f"<header><h1>fusionpasses inspection</h1><div class=\"meta\">{meta}</div></header><main>",
        _cards(result),
        f'<div class="overview"><div>{_match_table(result)}{_decline_table(result)}</div><div>{_histogram(result)}</div></div>',
        _timings(result),
        _graphs(result),
        _config(result),
        _environment(result),
        "</main>",
    ]
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>" + "".join(body) + "</body></html>\n"
    )


def _cards(result: InspectionResult) -> str:
    cards = []
    for s in result.stats:
        declined = len(s.declined)
        cards.append(
            f'<div class="card" data-pass="{_e(s.name)}"><div class="name">{_e(s.name)}</div>'
            f'<div class="nums"><b>{s.matched}</b> matched · <b>{declined}</b> declined · {s.seconds * 1e3:.1f} ms</div></div>'
        )
    if not result.stats:
        cards.append('<div class="card"><div class="name">no pass enabled</div><div class="nums">graphs shown as compiled</div></div>')
    status = "ok" if result.executed else "warn"
    cards.append(
        f'<div class="card exec" id="execution"><div class="name">execution · compiled in {result.compile_seconds:.1f} s</div>'
        f'<div class="nums {status}">{_e(result.execution_note)}</div></div>'
    )
    return f'<section class="cards">{"".join(cards)}</section>'


def _match_table(result: InspectionResult) -> str:
    rows = []
    for s in result.stats:
        patterns = sorted(s.patterns.items())
        if not patterns:
            rows.append(
                f'<tr data-pass="{_e(s.name)}" data-pattern=""><td class="mono">{_e(s.name)}</td>'
                '<td class="zero">no candidates</td><td class="num zero">0</td><td class="num zero">0</td></tr>'
            )
        for name, p in patterns:
            rows.append(
                f'<tr data-pass="{_e(s.name)}" data-pattern="{_e(name)}"><td class="mono">{_e(s.name)}</td>'
                f'<td class="mono">{_e(name)}</td><td class="num{"" if p.matched else " zero"}">{p.matched}</td>'
                f'<td class="num{"" if p.declined else " zero"}">{len(p.declined)}</td></tr>'
            )
    parts = [
        '<h2 id="matches">Matches and declines per pattern</h2>',
        '<table id="match-table"><thead><tr><th>pass</th><th>pattern</th><th class="num">matched</th>'
        f'<th class="num">declined</th></tr></thead><tbody>{"".join(rows)}</tbody></table>',
    ]
    notes = [(s.name, n) for s in result.stats for n in s.notes]
    if notes:
        parts.append('<ul class="notes" id="pass-notes">' + "".join(f"<li><b>{_e(p)}</b>: {_e(n)}</li>" for p, n in notes) + "</ul>")
    return "".join(parts)


def _decline_table(result: InspectionResult) -> str:
    declines = [(s.name, d) for s in result.stats for d in s.declined]
    if not declines:
        return ""
    rows = "".join(
        f'<tr data-pass="{_e(p)}" data-pattern="{_e(d.pattern)}"><td class="mono">{_e(p)}</td>'
        f'<td class="mono">{_e(d.pattern)}</td><td class="mono">{_e(d.node)}</td><td>{_e(d.reason)}</td></tr>'
        for p, d in declines
    )
    return (
        '<h3>Declined: why the passes left these alone</h3><table id="decline-table"><thead><tr><th>pass</th>'
        f"<th>pattern</th><th>node</th><th>reason</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _declined_nodes(result: InspectionResult, pass_name: str) -> set[str]:
    return {d.node for s in result.stats if s.name == pass_name for d in s.declined}


def _graphs(result: InspectionResult) -> str:
    parts = ['<h2 id="graphs">Graphs before and after each pass</h2>', _LEGEND]
    if not result.graphs:
        parts.append("<p>No graph reached the pass manager.</p>")
    for g in result.graphs:
        parts.append(
            f'<h3>graph {g.index}: {len(g.before.nodes)} nodes in, {len(g.after.nodes)} nodes out</h3>'
            + (f'<p class="warn">no kernel on this device: {_e(", ".join(g.missing_kernels))}</p>' if g.missing_kernels else "")
        )
        if not g.steps:
            parts.append(
                f"<details><summary>whole graph ({len(g.before.nodes)} nodes)</summary>"
                f'<div class="pane">{render_svg(g.before.nodes, title=f"graph {g.index}")}</div></details>'
            )
        for k, step in enumerate(g.steps, start=1):
            parts.append(_step(result, g, k, step))
    return "".join(parts)


def _step(result: InspectionResult, g: GraphRecord, k: int, step: PassStep) -> str:
    changes = step.changes
    declined = _declined_nodes(result, step.pass_name)
    before_marks = {**{n: DECLINED for n in declined}, **changes.marks_before()}
    after_marks = {**{n: DECLINED for n in declined}, **changes.marks_after()}
    head = (
        f'<div class="step" data-graph="{g.index}" data-pass="{_e(step.pass_name)}" '
        f'data-added="{len(changes.added)}" data-removed="{len(changes.removed)}" data-rewired="{len(changes.rewired)}">'
        f'<h3>graph {g.index} · {_e(step.pass_name)}: <span class="ok">+{len(changes.added)} added</span>, '
        f'<span style="color:var(--rm)">−{len(changes.removed)} removed</span>, {len(changes.rewired)} rewired '
        f'<span class="zero">({step.seconds * 1e3:.1f} ms)</span></h3>'
    )
    before_focus = neighbourhood(step.before.nodes, set(before_marks))
    after_focus = neighbourhood(step.after.nodes, set(after_marks))
    if not before_focus and not after_focus:
        body = "<p class=\"zero\">No change and no declined candidate in this graph.</p>"
    else:
        body = (
            '<div class="pair">'
            f'<div class="pane before"><div class="cap">before: changed nodes and their neighbours '
            f"({len(before_focus)} of {len(step.before.nodes)})</div>"
            f"{render_svg(before_focus, before_marks, title=f'before {step.pass_name}')}</div>"
            f'<div class="pane after"><div class="cap">after: changed nodes and their neighbours '
            f"({len(after_focus)} of {len(step.after.nodes)})</div>"
            f"{render_svg(after_focus, after_marks, title=f'after {step.pass_name}')}</div></div>"
        )
    whole = (
        f"<details><summary>whole graphs ({len(step.before.nodes)} → {len(step.after.nodes)} nodes)</summary>"
        f'<div class="pair"><div class="pane">{render_svg(step.before.nodes, before_marks)}</div>'
        f'<div class="pane">{render_svg(step.after.nodes, after_marks)}</div></div></details>'
    )
    diff = step.text_diff(g.index)
    diff_html = "".join(
        f'<span class="{"add" if line.startswith("+") else "rm"}">{_e(line)}</span>'
        if line.startswith(("+", "-")) and not line.startswith(("+++", "---"))
        else _e(line)
        for line in diff.splitlines(keepends=True)
    )
    dump = f"graphs/graph{g.index}.{k}.{step.pass_name}"
    text = (
        f"<details><summary>text diff (raw dumps: <span class=\"mono\">{_e(dump)}.txt</span>, "
        f"<span class=\"mono\">{_e(dump)}.diff</span>)</summary><pre>{diff_html or 'no textual change'}</pre></details>"
    )
    return head + body + whole + text + "</div>"


def _histogram(result: InspectionResult) -> str:
    rows = result.histogram()
    changed = [r for r in rows if r[1] != r[2]]
    unchanged = [r for r in rows if r[1] == r[2]]

    def table(table_id: str, entries: list[tuple[str, int, int]]) -> str:
        body = "".join(
            f'<tr data-op="{_e(op)}"><td class="mono">{_e(op)}</td><td class="num">{before}</td>'
            f'<td class="num">{after}</td><td class="num">{after - before:+d}</td></tr>'
            for op, before, after in entries
        )
        return (
            f'<table id="{table_id}"><thead><tr><th>op</th><th class="num">before</th><th class="num">after</th>'
            f'<th class="num">change</th></tr></thead><tbody>{body}</tbody></table>'
        )

    return (
        '<h2 id="histogram">Op counts that changed (all graphs)</h2>'
        + (table("op-histogram", changed) if changed else '<p class="zero" id="op-histogram">No op count changed.</p>')
        + f"<details><summary>{len(unchanged)} ops with unchanged counts</summary>"
        + table("op-histogram-unchanged", unchanged) + "</details>"
    )


def _timings(result: InspectionResult) -> str:
    if not result.timings:
        return ""

    def cell(v: float | None, spec: str, suffix: str = "") -> str:
        return '<td class="num zero">n/a</td>' if v is None else f'<td class="num">{v:{spec}}{suffix}</td>'

    rows = "".join(
        f'<tr data-rank="{t.rank}"><td class="num">{t.rank}</td>{cell(t.baseline_ms, ".3f")}{cell(t.passes_ms, ".3f")}'
        f'{cell(t.speedup, ".2f", "×")}{cell(t.max_abs_diff, ".3g")}</tr>'
        for t in result.timings
    )
    note = f'<p class="notes">{_e(result.timing_note)}</p>' if result.timing_note else ""
    return (
        '<h2 id="timings">Per-rank timings of the compiled model (median)</h2>'
        '<table id="timing-table"><thead><tr><th class="num">rank</th><th class="num">no passes (ms)</th>'
        '<th class="num">passes (ms)</th><th class="num">speedup</th><th class="num">max |diff|</th></tr></thead>'
        f"<tbody>{rows}</tbody></table>{note}"
    )


def _config(result: InspectionResult) -> str:
    default = FusionConfig()
    rows = []
    for f in dataclasses.fields(FusionConfig):
        value = getattr(result.config, f.name)
        changed = value != getattr(default, f.name)
        why = result.preview.get(f.name, "")
        row_class = ' class="nondefault"' if changed else ""
        rows.append(
            f'<tr data-field="{_e(f.name)}"{row_class}><td class="mono">{_e(f.name)}</td>'
            f'<td class="mono">{_e(repr(value))}</td><td class="mono zero">{_e(repr(getattr(default, f.name)))}</td>'
            f"<td>{_e('CPU preview: ' + why) if why else ''}</td></tr>"
        )
    return (
        '<h2 id="config">FusionConfig</h2><table id="config-table"><thead><tr><th>field</th><th>value</th>'
        f'<th>default</th><th>why</th></tr></thead><tbody>{"".join(rows)}</tbody></table>'
    )


def _environment(result: InspectionResult) -> str:
    rows = "".join(f'<tr><td>{_e(k)}</td><td class="mono">{_e(v)}</td></tr>' for k, v in result.environment.items())
    extra = "".join(f'<tr><td>extra pass</td><td class="mono">{_e(p)}</td></tr>' for p in result.extra_passes)
    return f'<h2 id="environment">Environment</h2><table id="environment-table"><tbody>{rows}{extra}</tbody></table>'
