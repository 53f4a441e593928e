"""The inspection command end to end on CPU: the printed tables and the HTML report, parsed back.

Each run compiles a small model once (module-scoped fixtures), and several tests read its output.
Expectations for the sequence-parallel pass on the reference model live in SP_EXPECTATIONS: the
test skips until fusionpasses.passes.sequence_parallel exists.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch.distributed as dist

from fusionpasses.inspect import main, pass_available

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
USER_MODULE = f"{FIXTURES / 'user_module.py'}"
FIXTURE_PASS = f"{FIXTURES / 'inspect_pass.py'}"
# Small enough to compile in seconds; the same sizes in every test so Inductor's kernel cache is shared.
SMALL_REFERENCE = ["--hidden-size", "64", "--intermediate-size", "128", "--num-heads", "4", "--num-kv-heads", "2",
                   "--layers", "1", "--tokens", "16"]


# ---------------------------------------------------------------------------------------------
# Reading the output back
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    out: Path

    def section(self, name: str) -> list[str]:
        """The lines of the ``== name ==`` section of the printed summary."""
        lines = self.stdout.splitlines()
        start = lines.index(f"== {name} ==") + 1
        end = next((i for i in range(start, len(lines)) if lines[i].startswith("== ")), len(lines))
        return [line for line in lines[start:end] if line.strip()]

    def pass_rows(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(pass, pattern) -> (matched, declined) from the printed pass table."""
        rows: dict[tuple[str, str], tuple[int, int]] = {}
        current = ""
        for line in self.section("passes")[1:]:
            if line == "declined:":
                break
            m = re.match(r"^(\S+)?\s+(\S.*?)\s+(\d+)\s+(\d+)(\s+[\d.]+ ms)?\s*$", line)
            if m:
                current = m.group(1) or current
                rows[(current, m.group(2))] = (int(m.group(3)), int(m.group(4)))
        return rows

    def declines(self) -> list[tuple[str, str, str, str]]:
        """(pass, pattern, node, reason) from the printed decline list."""
        lines = self.section("passes")
        if "declined:" not in lines:
            return []
        found = []
        for line in lines[lines.index("declined:") + 1:]:
            m = re.match(r"^\s+([^/\s]+)/(\S+) at (\S+): (.*)$", line)
            assert m, f"unparsed decline line: {line!r}"
            found.append(m.groups())
        return found

    def notes(self) -> list[str]:
        return [line.split("note:", 1)[1].strip() for line in self.section("passes") if line.strip().startswith("note:")]

    def histogram(self) -> dict[str, tuple[int, int]]:
        rows = {}
        for line in self.section("op histogram")[1:]:
            m = re.match(r"^(\S+)\s+(\d+)\s+(\d+)$", line)
            if m:
                rows[m.group(1)] = (int(m.group(2)), int(m.group(3)))
        return rows

    def html(self) -> ReportPage:
        page = ReportPage()
        page.feed((self.out / "report.html").read_text(encoding="utf-8"))
        return page

    def summary(self) -> dict:
        return json.loads((self.out / "summary.json").read_text())


@dataclass
class SvgNode:
    name: str
    target: str
    classes: set[str]


@dataclass
class Step:
    graph: int
    pass_name: str
    counts: dict[str, int]
    nodes: list[SvgNode] = field(default_factory=list)
    """Nodes of the before/after focus pictures (the first two SVGs of the step)."""


class ReportPage(HTMLParser):
    """Tables by id (rows of cell texts) and, per pass step, the highlighted nodes of its pictures."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.steps: list[Step] = []
        self.external_refs: list[str] = []
        self.tags: set[str] = set()
        self._table: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._svgs_in_step = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        for key in ("src", "href"):
            if a.get(key, "").startswith(("http:", "https:", "//")):
                self.external_refs.append(a[key])
        if tag in ("script", "link", "img", "iframe"):
            self.external_refs.append(tag)
        if tag == "table":
            self._table = a.get("id", "")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "div" and "step" in a.get("class", "").split():
            counts = {k: int(a[f"data-{k}"]) for k in ("added", "removed", "rewired")}
            self.steps.append(Step(int(a["data-graph"]), a["data-pass"], counts))
            self._svgs_in_step = 0
        elif tag == "svg" and self.steps:
            self._svgs_in_step += 1
        elif tag == "g" and "data-name" in a and self.steps and self._svgs_in_step <= 2:
            self.steps[-1].nodes.append(SvgNode(a["data-name"], a["data-target"], set(a.get("class", "").split())))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def rows(self, table_id: str) -> list[list[str]]:
        """Body rows (the header row dropped)."""
        return self.tables[table_id][1:]


def run_cli(tmp_path: Path, *args: str) -> Run:
    out = tmp_path / "inspect_out"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main([*args, "--out", str(out)])
    assert not dist.is_initialized(), "the command must destroy the process group it created"
    return Run(code, stdout.getvalue(), stderr.getvalue(), out)


# ---------------------------------------------------------------------------------------------
# Reference model with a pass that matches some GEMMs and declines others
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Run:
    return run_cli(
        tmp_path_factory.mktemp("reference"), *SMALL_REFERENCE, "--passes", "none",
        "--extra-pass", f"{FIXTURE_PASS}:TagColumnParallelMM", "--extra-pass", f"{FIXTURE_PASS}:AlwaysOffPass",
    )


def test_reference_table_counts_matches_and_declines(reference_run):
    run = reference_run
    assert run.returncode == 0, run.stderr
    # One layer: qkv and gate_up are column-parallel (fused), o and down feed an all_reduce (declined).
    assert run.pass_rows() == {("tag_mm", "column_parallel_mm"): (2, 2), ("always_off", "(no candidates)"): (0, 0)}
    declines = run.declines()
    assert len(declines) == 2
    assert {d[:2] for d in declines} == {("tag_mm", "column_parallel_mm")}
    assert {d[3] for d in declines} == {"row-parallel: its output is all-reduced"}
    assert run.notes() == ["pass off: this fixture pass never runs"]
    assert run.histogram() == {"aten.mm.default": (4, 2), "fusionpasses_fixture.tagged_mm.default": (0, 2)}
    assert run.section("graph changes") == [next(line for line in run.section("graph changes") if "tag_mm" in line)]
    assert re.match(r"graph 0\s+tag_mm\s+\+2 added, -2 removed, 2 rewired", run.section("graph changes")[0])
    assert run.section("execution")[0].startswith("compiled model ran: output bfloat16[16, 64]")
    full = {row["op"]: (row["before"], row["after"]) for row in run.summary()["op_histogram"]}
    assert full["_c10d_functional.all_reduce.default"] == (2, 2)  # after attention and after the MLP
    assert "TPTransformer(hidden=64" in run.stdout.splitlines()[0]


def test_reference_html_report(reference_run):
    page = reference_run.html()
    assert page.external_refs == [], "the report must be self-contained"
    assert "svg" in page.tags
    assert page.rows("match-table") == [["tag_mm", "column_parallel_mm", "2", "2"],
                                        ["always_off", "no candidates", "0", "0"]]
    declined_nodes = {row[2] for row in page.rows("decline-table")}
    assert {row[3] for row in page.rows("decline-table")} == {"row-parallel: its output is all-reduced"}
    assert {tuple(r[:3]) for r in page.rows("op-histogram")} == {
        ("aten.mm.default", "4", "2"), ("fusionpasses_fixture.tagged_mm.default", "0", "2")}

    (step,) = page.steps
    assert (step.graph, step.pass_name, step.counts) == (0, "tag_mm", {"added": 2, "removed": 2, "rewired": 2})
    added = [n for n in step.nodes if "added" in n.classes]
    removed = [n for n in step.nodes if "removed" in n.classes]
    declined = [n for n in step.nodes if "declined" in n.classes]
    assert sorted(n.target for n in added) == ["fusionpasses_fixture.tagged_mm.default"] * 2
    assert sorted(n.target for n in removed) == ["aten.mm.default"] * 2
    # The declined GEMMs are drawn in both pictures, unchanged, with their own highlight.
    assert {n.name for n in declined} == declined_nodes and len(declined) == 4
    assert all(n.target == "aten.mm.default" for n in declined)
    assert any("collective" in n.classes for n in step.nodes)

    config = {row[0]: row[1] for row in page.rows("config-table")}
    assert config["async_tp"] == "False" and config["symm_mem"] == "'auto'" and config["record_graphs"] == "True"


def test_reference_raw_dumps_and_summary(reference_run):
    graphs = reference_run.out / "graphs"
    assert sorted(p.name for p in graphs.iterdir()) == [
        "graph0.0.input.txt", "graph0.1.tag_mm.diff", "graph0.1.tag_mm.txt"]
    diff = (graphs / "graph0.1.tag_mm.diff").read_text()
    assert sum(line.startswith("+") and "target=torch.ops.fusionpasses_fixture.tagged_mm" in line
               for line in diff.splitlines()) == 2
    assert "tagged_mm" not in (graphs / "graph0.0.input.txt").read_text()
    summary = reference_run.summary()
    tag = next(p for p in summary["passes"] if p["name"] == "tag_mm")
    assert tag["patterns"]["column_parallel_mm"]["matched"] == 2
    assert len(tag["patterns"]["column_parallel_mm"]["declined"]) == 2
    assert summary["executed"] is True and summary["world_size"] == 2 and summary["process_group"] == "fake"
    assert (reference_run.out / "summary.txt").read_text().strip() == reference_run.stdout.strip()


# ---------------------------------------------------------------------------------------------
# A user's module with the real AsyncTP pass
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def async_tp_preview(tmp_path_factory) -> Run:
    return run_cli(tmp_path_factory.mktemp("atp"), f"{USER_MODULE}:build", "--passes", "async_tp", "--tokens", "32")


def test_user_module_async_tp_preview_fuses_both_collectives(async_tp_preview):
    run = async_tp_preview
    assert run.returncode == 0, run.stderr
    assert run.pass_rows() == {("async_tp", "all_gather+mm"): (1, 0), ("async_tp", "mm+reduce_scatter"): (1, 0)}
    assert run.declines() == []
    hist = run.histogram()
    assert hist["fusionpasses.all_gather_gemm.default"] == (0, 1)
    assert hist["fusionpasses.gemm_reduce_scatter.default"] == (0, 1)
    assert hist["_c10d_functional.all_gather_into_tensor.default"] == (1, 0)
    assert hist["_c10d_functional.reduce_scatter_tensor.default"] == (1, 0)
    assert hist["aten.mm.default"] == (2, 0)
    # The preview says what it changed and why.
    assert "symm_mem='assume': SymmetricMemory is CUDA-only" in run.stdout
    assert "async_tp_gating='always'" in run.stdout

    page = run.html()
    (step,) = page.steps
    added = {n.target for n in step.nodes if "added" in n.classes}
    assert {"fusionpasses.all_gather_gemm.default", "fusionpasses.gemm_reduce_scatter.default"} <= added
    removed = {n.target for n in step.nodes if "removed" in n.classes}
    assert {"_c10d_functional.all_gather_into_tensor.default", "_c10d_functional.reduce_scatter_tensor.default",
            "aten.mm.default"} <= removed
    config = {row[0]: row for row in page.rows("config-table")}
    assert config["symm_mem"][1] == "'assume'" and config["symm_mem"][3].startswith("CPU preview:")
    assert config["sequence_parallel"][1] == "False"


def test_user_module_without_preview_declines_with_the_reason(tmp_path):
    run = run_cli(tmp_path, f"{USER_MODULE}:build", "--passes", "async_tp", "--no-preview", "-q")
    assert run.returncode == 0, run.stderr
    assert run.pass_rows() == {("async_tp", "all_gather+gemm"): (0, 1), ("async_tp", "gemm+reduce_scatter"): (0, 1)}
    reasons = {d[3] for d in run.declines()}
    assert len(reasons) == 1 and reasons.pop().startswith("SymmetricMemory unavailable: no CUDA device")
    assert "CPU preview" not in run.stdout
    assert run.histogram() == {}
    assert run.section("op histogram")[-1].startswith("(no op count changed")
    page = run.html()
    assert {r[0] for r in page.rows("decline-table")} == {"async_tp"}
    (step,) = page.steps
    assert step.counts == {"added": 0, "removed": 0, "rewired": 0}
    assert {n.target for n in step.nodes if "declined" in n.classes} == {
        "_c10d_functional.all_gather_into_tensor.default", "_c10d_functional.reduce_scatter_tensor.default"}


def test_graphs_that_cannot_run_are_compiled_and_the_rest_still_compiles(tmp_path):
    run = run_cli(tmp_path, f"{USER_MODULE}:build_with_graph_break", "--passes", "none", "-q",
                  "--extra-pass", f"{FIXTURE_PASS}:TagWithCudaOnlyOp")
    assert run.returncode == 0, run.stderr
    changes = run.section("graph changes")
    assert [line.split()[:3] for line in changes] == [["graph", "0", "tag_mm_cuda"], ["graph", "1", "tag_mm_cuda"]]
    assert run.pass_rows() == {("tag_mm_cuda", "column_parallel_mm"): (2, 0)}
    (note,) = run.section("execution")
    assert note.startswith("compiled, not executed: graph 0 calls fusionpasses_fixture.cuda_only_mm.default (cpu)")
    assert "graph 1 calls" in note
    summary = run.summary()
    assert summary["executed"] is False
    assert [g["missing_kernels"] for g in summary["graphs"]] == [["fusionpasses_fixture.cuda_only_mm.default (cpu)"]] * 2
    assert [s.graph for s in run.html().steps] == [0, 1]


def test_compare_times_both_variants_on_a_fake_group(tmp_path):
    run = run_cli(tmp_path, f"{USER_MODULE}:build", "--passes", "async_tp", "--compare", "--iters", "3",
                  "--warmup", "1", "-q")
    assert run.returncode == 0, run.stderr
    header, row, note = run.section("timings")
    assert header.split() == ["rank", "no", "passes", "ms", "passes", "ms", "speedup", "max|diff|"]
    rank, baseline, passes, speedup, diff = row.split()
    assert rank == "0" and float(baseline) > 0 and float(passes) > 0 and speedup.endswith("x") and diff == "n/a"
    assert "compute-only" in note
    assert [r[0] for r in run.html().rows("timing-table")] == ["0"]


@pytest.mark.gloo
def test_real_process_group_compares_by_default(tmp_path):
    """Under an initialized group (torchrun's NCCL on GPUs; here a one-rank gloo group in this
    process) the command uses it, applies no preview, turns --compare on, runs the fused graph for
    real and gathers every rank's timing and output difference on rank 0. The 2-GPU test in
    tests/gpu/test_inspect_gpu.py covers more than one rank."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        out = tmp_path / "out"
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            code = main([f"{USER_MODULE}:build", "--tokens", "32", "--passes", "async_tp", "--set", "symm_mem=assume",
                         "--set", "async_tp_gating=always", "--iters", "2", "--warmup", "1", "-q", "--out", str(out)])
        assert dist.is_initialized(), "a group the caller created must stay up"
    finally:
        dist.destroy_process_group()
    assert code == 0
    run = Run(code, stdout.getvalue(), "", out)
    summary = run.summary()
    assert summary["process_group"] == "gloo" and summary["preview"] == {} and summary["executed"] is True
    (timing,) = summary["timings"]
    assert timing["rank"] == 0 and timing["baseline_ms"] > 0 and timing["passes_ms"] > 0
    assert timing["max_abs_diff"] <= 0.05  # bf16; the fused ops' CPU kernels are the unfused ops
    assert run.pass_rows() == {("async_tp", "all_gather+mm"): (1, 0), ("async_tp", "mm+reduce_scatter"): (1, 0)}
    header, row = run.section("timings")
    assert row.split()[0] == "0" and row.split()[-1] != "n/a"


# ---------------------------------------------------------------------------------------------
# Sequence parallelism + AsyncTP on the reference model (the README's command)
# ---------------------------------------------------------------------------------------------

# What the README's first command must show, checked once fusionpasses.passes.sequence_parallel exists:
# every all_reduce of the reference model becomes reduce_scatter -> norm -> all_gather, and AsyncTP
# fuses those with the GEMMs around them (CPU preview: symm_mem='assume', gating 'always').
SP_EXPECTATIONS = {
    "absent_after": ["_c10d_functional.all_reduce.default"],
    "present_after": ["fusionpasses.all_gather_gemm.default", "fusionpasses.gemm_reduce_scatter.default"],
}


@pytest.mark.skipif(not pass_available("sequence_parallel"), reason="fusionpasses.passes.sequence_parallel not written yet")
def test_readme_command_on_the_reference_model(tmp_path):
    run = run_cli(tmp_path, *SMALL_REFERENCE, "--passes", "sequence_parallel,async_tp", "-q")
    assert run.returncode == 0, run.stderr
    rows = run.pass_rows()
    assert sum(m for (p, _), (m, _) in rows.items() if p == "sequence_parallel") > 0
    assert sum(m for (p, _), (m, _) in rows.items() if p == "async_tp") > 0
    hist = run.histogram()
    for op in SP_EXPECTATIONS["absent_after"]:
        assert hist[op][1] == 0, op
    for op in SP_EXPECTATIONS["present_after"]:
        assert hist[op][1] > 0, op
    page = run.html()
    assert [s.pass_name for s in page.steps] == ["sequence_parallel", "async_tp"]
    assert all(any("added" in n.classes for n in s.nodes) for s in page.steps)


# ---------------------------------------------------------------------------------------------
# Errors: one clear line, exit status 2, no process group left behind
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["tests/fixtures/missing.py:build"], "model factory: no such file: tests/fixtures/missing.py"),
        ([f"{FIXTURES}/user_module.py"], "must be given as path/to/file.py:name"),
        ([f"{USER_MODULE}:biuld"], "has no attribute 'biuld'; callables there: SequenceParallelMLP, build,"),
        ([f"{USER_MODULE}:NOT_CALLABLE"], "int object is not callable"),
        ([f"{USER_MODULE}:wants_unknown_argument"], "the factory asks for mesh; it may take any of group, world_size"),
        ([f"{USER_MODULE}:returns_a_module_only"], "must return (model, example_inputs), got SequenceParallelMLP"),
        (["no_such_package.models:build"], "cannot import module 'no_such_package.models'"),
        (["--passes", "sp,bogus"], "unknown pass 'bogus'"),
        (["--set", "symm_mem=sometimes"], "invalid FusionConfig: symm_mem must be 'auto', 'assume' or 'off'"),
        (["--set", "nonsense=1"], "FusionConfig has no field 'nonsense'"),
        (["--set", "symm_mem"], "--set expects field=value"),
        (["--extra-pass", f"{USER_MODULE}:build"], "expected a FusionPass subclass"),
        (["--num-kv-heads", "1", "--world-size", "2"], "reference model: TPModelConfig does not fit"),
    ],
)
def test_bad_arguments_give_one_clear_error(tmp_path, args, message):
    if args[:2] == ["--passes", "sp,bogus"] and not pass_available("sequence_parallel"):
        message = "pass 'sequence_parallel' is not part of this installation"
    run = run_cli(tmp_path, *args, "-q")
    assert run.returncode == 2
    assert run.stdout == ""
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith("fusionpasses.inspect: error: ")
    assert message in line, line


def test_script_wrapper_reports_errors_and_exit_status(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "inspect_graph.py"), f"{USER_MODULE}:NOT_CALLABLE", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "fusionpasses.inspect: error:" in proc.stderr and "not callable" in proc.stderr
