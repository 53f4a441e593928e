"""The inspection command on GPUs.

    torchrun --nproc-per-node 2 -m pytest -q tests/gpu/test_inspect_gpu.py   # NCCL, 2 GPUs
    python -m pytest -q tests/gpu/test_inspect_gpu.py                        # 1 GPU, fake group

Under torchrun the command uses the NCCL group: the passes run with their real decisions (no CPU
preview), the fused graph runs over SymmetricMemory, and every rank times the compiled model with
and without the passes and compares the outputs.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch.distributed as dist

from fusionpasses.inspect import main

USER_MODULE = str(Path(__file__).resolve().parent.parent / "fixtures" / "user_module.py")


def _inspect(out: Path, *args: str) -> tuple[int, str, dict | None]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main([*args, "-q", "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else None
    return code, stdout.getvalue(), summary


def _matched(summary: dict, pass_name: str) -> int:
    stats = next(p for p in summary["passes"] if p["name"] == pass_name)
    return sum(p["matched"] for p in stats["patterns"].values())


def _op_after(summary: dict, op: str) -> int:
    return next((row["after"] for row in summary["op_histogram"] if row["op"] == op), 0)


@pytest.mark.multi_gpu(2, exact=False)
def test_user_module_fused_over_nccl_with_per_rank_timings(nccl_group, tmp_path):
    code, stdout, summary = _inspect(
        tmp_path, f"{USER_MODULE}:build", "--tokens", "512", "--passes", "async_tp",
        "--set", "async_tp_gating=always", "--iters", "10",
    )
    assert code == 0
    if dist.get_rank() != 0:
        assert summary is None and stdout == ""  # rank 0 alone prints and writes
        return
    assert summary["process_group"] == "nccl" and summary["device"].startswith("cuda")
    assert summary["preview"] == {} and summary["executed"] is True
    assert _matched(summary, "async_tp") == 2
    assert _op_after(summary, "fusionpasses.all_gather_gemm.default") == 1
    assert _op_after(summary, "fusionpasses.gemm_reduce_scatter.default") == 1
    timings = summary["timings"]
    assert [t["rank"] for t in timings] == list(range(dist.get_world_size()))
    for t in timings:
        assert t["baseline_ms"] > 0 and t["passes_ms"] > 0
        assert t["max_abs_diff"] is not None and t["max_abs_diff"] <= 0.1  # bf16 layer-norm outputs
    assert "== timings ==" in stdout and "max|diff|" in stdout


@pytest.mark.multi_gpu(2, exact=False)
@pytest.mark.parametrize("linear, tolerance", [("bf16", 0.1), ("scaled_mm", 0.3)])
def test_reference_model_sp_and_async_tp_over_nccl(nccl_group, tmp_path, linear, tolerance):
    # FP8: a bf16 rounding difference can flip one FP8 rounding of the next layer's input (1/8 relative).
    code, stdout, summary = _inspect(
        tmp_path, "--linear", linear, "--tokens", "512", "--passes", "sequence_parallel,async_tp",
        "--set", "async_tp_gating=always", "--set", "sp_min_tokens=0", "--iters", "10",
    )
    assert code == 0
    if dist.get_rank() != 0:
        return
    assert _matched(summary, "sequence_parallel") == 4  # 2 layers x (after attention, after MLP)
    assert _matched(summary, "async_tp") >= 7
    assert _op_after(summary, "_c10d_functional.all_reduce.default") == 0
    assert summary["executed"] is True
    for t in summary["timings"]:
        assert t["passes_ms"] > 0 and t["max_abs_diff"] <= tolerance, t
    assert (tmp_path / "report.html").stat().st_size > 10_000


@pytest.mark.gpu
def test_fake_group_on_one_gpu_compiles_for_cuda_without_running(tmp_path):
    if dist.is_initialized():
        pytest.skip("runs without torchrun: it creates its own fake process group")
    code, stdout, summary = _inspect(tmp_path, "--device", "cuda", "--passes", "sequence_parallel,async_tp")
    assert code == 0
    assert summary["process_group"] == "fake" and summary["device"].startswith("cuda")
    assert summary["executed"] is False
    assert "fake process group on CUDA" in summary["execution_note"]
    assert _matched(summary, "sequence_parallel") == 4 and _matched(summary, "async_tp") >= 7
    assert not dist.is_initialized()
