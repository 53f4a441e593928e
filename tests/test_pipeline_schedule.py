"""Which pipeline schedule the fused collective ops run (kernels/_symm_mem_pipeline.py), on CPU."""

from __future__ import annotations

import pytest

from fusionpasses.kernels import _symm_mem_pipeline as pipeline

GFLOP = 1e9


@pytest.mark.parametrize("kind", ["mm", "scaled_mm"])
def test_small_all_gather_chunks_run_on_two_streams(kind):
    # 1024 x 4096 x 4096 at TP2: 512-row chunks of 17 GFLOP; the same GEMM at TP4: 256-row chunks.
    assert pipeline.schedule_for(kind, "ag", 2, chunk_flops=17 * GFLOP) == "two_streams"
    assert pipeline.schedule_for(kind, "ag", 2, chunk_flops=34 * GFLOP) == "one_compute_stream"
    assert pipeline.schedule_for(kind, "ag", 4, chunk_flops=69 * GFLOP) == "two_streams"
    assert pipeline.schedule_for(kind, "ag", 4, chunk_flops=137 * GFLOP) == "one_compute_stream"
    # 8 ranks have no measurement of their own: 4's limit; 3 ranks take 2's.
    assert pipeline.schedule_for(kind, "ag", 8, chunk_flops=69 * GFLOP) == "two_streams"
    assert pipeline.schedule_for(kind, "ag", 3, chunk_flops=34 * GFLOP) == "one_compute_stream"
    # Unknown size (the default) keeps the kind's schedule.
    assert pipeline.schedule_for(kind, "ag", 4) == pipeline.SCHEDULE_BY_GEMM[kind, "ag"]


def test_the_reduce_scatter_keeps_its_kinds_schedule_and_forcing_wins():
    for kind in ("mm", "scaled_mm"):
        assert pipeline.schedule_for(kind, "rs", 4, chunk_flops=GFLOP) == pipeline.SCHEDULE_BY_GEMM[kind, "rs"]
    with pipeline.force_schedule("one_compute_stream"):
        assert pipeline.schedule_for("mm", "ag", 4, chunk_flops=GFLOP) == "one_compute_stream"
