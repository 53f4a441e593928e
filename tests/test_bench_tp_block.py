"""scripts/bench_tp_block.py's per-layer steady state, on the runs recorded in docs/bench (2x H200)."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture
def bench(monkeypatch):
    # The script keeps NVLink multicast off through os.environ at import: give it a copy to write to.
    monkeypatch.setattr(os, "environ", dict(os.environ))
    spec = importlib.util.spec_from_file_location("bench_tp_block", ROOT / "scripts" / "bench_tp_block.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_tp_block", module)  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def _recorded(layers: int) -> dict:
    return json.loads((ROOT / "docs" / "bench" / f"bench_tp_block_scaled_mm_cudagraphs_16384_layers{layers}.json").read_text())


def test_one_more_layer_is_the_difference_of_two_depths(bench):
    short, long = _recorded(2), _recorded(4)
    steady = bench.per_layer(short, long)
    (row,) = steady["rows"]
    assert steady["layers"] == [2, 4] and row["tokens"] == 16384
    for name in bench.VARIANTS:
        want = (long["rows"][0][f"{name}_ms"] - short["rows"][0][f"{name}_ms"]) / 2
        assert row[f"{name}_ms"] == pytest.approx(want)
    # docs/benchmarks.md: 14.60 ms per layer unfused, 12.90 ms with SP + AsyncTP.
    assert row["baseline_ms"] == pytest.approx(14.600, abs=1e-3)
    assert row["sp+async_tp_ms"] == pytest.approx(12.904, abs=1e-3)
    assert row["sp+async_tp_speedup"] == pytest.approx(14.600 / 12.904, rel=1e-3)
    assert "one more layer" in bench.per_layer_table(steady)


def test_depths_must_cover_the_same_token_counts(bench):
    short, long = _recorded(2), _recorded(4)
    long = {**long, "rows": long["rows"] * 2}
    with pytest.raises(ValueError):
        bench.per_layer(short, long)


def test_the_table_says_which_schedules_the_fused_ops_ran(bench):
    result = _recorded(2)
    assert "schedules" not in bench.table(result)  # recorded before the ops counted them
    row = {**result["rows"][0], "sp+async_tp_schedules": {"scaled_mm rs sum_in_gemm": 6, "scaled_mm ag one_compute_stream": 9}}
    text = bench.table({**result, "rows": [row]})
    assert "16384 tokens, fused ops' schedules (calls): scaled_mm rs sum_in_gemm x6, scaled_mm ag one_compute_stream x9" in text
