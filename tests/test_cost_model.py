"""The AsyncTP cost model against the benchmark grids it was fitted on (docs/bench/, measured on H200)."""

from __future__ import annotations

import json
import pathlib

import pytest

from fusionpasses import FusionConfig
from fusionpasses.cost_model import HOPPER, estimate_benchmark_row

GRIDS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "bench"


@pytest.mark.parametrize("grid", ["bench_async_tp.json", "bench_async_tp_ws4_grid.json"])
def test_the_gate_fuses_no_measured_slowdown(grid):
    results = json.loads((GRIDS / grid).read_text())["results"]
    margin = FusionConfig().async_tp_min_speedup
    fused = []
    for r in results:
        if estimate_benchmark_row(HOPPER, r).speedup >= margin:
            fused.append((r["speedup"], r["kind"], r["side"], r["M"], r["K"], r["N"]))
    assert len(fused) >= len(results) // 3, "the gate should still fuse the large shapes"
    assert min(fused)[0] >= 1.0, f"fused a shape that ran slower than unfused: {min(fused)}"
