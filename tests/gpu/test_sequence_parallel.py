"""Sequence parallelism on 2 or more GPUs, alone and chained into AsyncTP:

    source scripts/gpu_setup.sh
    torchrun --nproc-per-node 2 -m pytest -q tests/gpu/test_sequence_parallel.py   (or 4)

Every rank compares its own output and residual with eager; the chained test also counts that the
reduce_scatters and all_gathers SP introduced end up fused with the FP8 GEMMs next to them.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

import fusionpasses
from fusionpasses import FusionConfig
from tests.sequence_parallel_norms import add_norm_fp32_sum

pytestmark = pytest.mark.multi_gpu(2, exact=False)

fp = torch.ops.fusionpasses
BF16, FP8 = torch.bfloat16, torch.float8_e4m3fn
AR = "_c10d_functional.all_reduce.default"
RS = "_c10d_functional.reduce_scatter_tensor.default"
AG = "_c10d_functional.all_gather_into_tensor.default"


def _replicated(*shape, seed, dtype=BF16, scale=1.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(*shape, device="cuda", generator=g) * scale).to(dtype)


def _compile(fn, config: FusionConfig, dynamic: bool | None = None):
    # No FX graph cache: a cache hit (a second run on one machine) skips the passes, and so their stats.
    options = {**fusionpasses.compile_options(config.replace(record_graphs=True)), "fx_graph_cache": False}
    torch._dynamo.reset()
    return torch.compile(fn, options=options, dynamic=dynamic), options["post_grad_custom_post_pass"]


def _assert_close(actual, expected, what, rtol=2e-2, atol=2e-2):
    rank = dist.get_rank()
    assert actual.shape == expected.shape, f"rank {rank} {what}: {actual.shape} vs {expected.shape}"
    assert torch.isfinite(actual.float()).all(), f"rank {rank} {what}: non-finite values"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"rank {rank} {what}: {m}")


def bf16_block(hidden: int, inter: int, layers: int, norm: str):
    """Column-parallel -> SiLU -> row-parallel -> all_reduce -> residual add + RMSNorm, ``layers`` times."""
    ws, rank = dist.get_world_size(), dist.get_rank()
    rows = slice(rank * inter // ws, (rank + 1) * inter // ws)
    w_col = [(_replicated(inter, hidden, seed=10 + i) / hidden**0.5)[rows].contiguous() for i in range(layers)]
    w_row = [(_replicated(hidden, inter, seed=20 + i) / inter**0.5)[:, rows].contiguous() for i in range(layers)]
    norm_w = [1 + 0.1 * _replicated(hidden, seed=30 + i) for i in range(layers)]
    group = dist.group.WORLD

    def block(x, residual):
        for i in range(layers):
            reduced = funcol.all_reduce(F.silu(x @ w_col[i].t()) @ w_row[i].t(), "sum", group)
            if norm == "ops":
                x, residual = fp.fused_add_rms_norm(reduced, residual, norm_w[i], 1e-6)
            else:
                x, residual = add_norm_fp32_sum(reduced, residual, norm_w[i], 1e-6)
        return x, residual

    return block


@pytest.mark.parametrize("norm", ["ops", "decomposed"])
@pytest.mark.parametrize("tokens_per_rank", [4, 2049])
def test_sp_block_matches_eager(nccl_group, norm, tokens_per_rank):
    tokens = tokens_per_rank * dist.get_world_size()
    block = bf16_block(hidden=1024, inter=2048, layers=3, norm=norm)
    compiled, pm = _compile(block, FusionConfig(sequence_parallel=True, sp_min_tokens=0))
    x, residual = _replicated(tokens, 1024, seed=1), _replicated(tokens, 1024, seed=2)
    out, new_residual = compiled(x, residual)
    expected_out, expected_residual = block(x, residual)
    # NCCL rounds each of the ws - 1 bf16 additions of its sums, in an order the all_reduce and SP's
    # reduce_scatter do not share: 1-2 ulps apart where partials cancel, from four ranks on.
    _assert_close(out, expected_out, "output", atol=2e-2 * (dist.get_world_size() - 1))
    # One bf16 ulp at |x| ~ 4 is 0.03: the compiled add rounds once where eager rounds per layer.
    _assert_close(new_residual, expected_residual, "residual", atol=6e-2)
    sp = pm.pass_by_name("sequence_parallel")
    assert sp.stats.matched_count("all_reduce+add+rms_norm") == 3, pm.report()
    ops = sp.stats.runs[-1].after.op_histogram()
    assert (ops[AR], ops[RS], ops["fusionpasses.rank_rows.default"]) == (0, 3, 1)


def test_sp_dynamic_tokens_recompile_when_not_divisible(nccl_group):
    block = bf16_block(hidden=512, inter=1024, layers=2, norm="ops")
    compiled, pm = _compile(block, FusionConfig(sequence_parallel=True, sp_min_tokens=0))
    sp = pm.pass_by_name("sequence_parallel")
    for tokens in (64, 100, 37):
        x, residual = _replicated(tokens, 512, seed=tokens), _replicated(tokens, 512, seed=tokens + 1)
        torch._dynamo.mark_dynamic(x, 0)
        torch._dynamo.mark_dynamic(residual, 0)
        out, new_residual = compiled(x, residual)
        expected_out, expected_residual = block(x, residual)
        _assert_close(out, expected_out, f"output ({tokens} tokens)")
        _assert_close(new_residual, expected_residual, f"residual ({tokens} tokens)", atol=6e-2)
    scattered = [run.after.op_histogram()[RS] for run in sp.stats.runs]
    assert scattered == [2, 0], scattered  # one SP graph for even counts, one plain graph for 37


def test_sp_stays_off_below_the_hopper_threshold(nccl_group):
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("checks the Hopper row of the threshold table")
    block = bf16_block(hidden=8192, inter=1024, layers=1, norm="ops")
    compiled, pm = _compile(block, FusionConfig(sequence_parallel=True), dynamic=False)
    # 8 MiB per GPU at hidden 8192 in bf16: 1024 tokens at TP2, 2048 at TP4.
    min_tokens = 512 * dist.get_world_size()
    for tokens, applies in ((min_tokens // 2, False), (min_tokens, True)):
        x, residual = _replicated(tokens, 8192, seed=3), _replicated(tokens, 8192, seed=4)
        compiled(x, residual)
        ops = pm.pass_by_name("sequence_parallel").stats.runs[-1].after.op_histogram()
        assert (ops[RS] == 1) == applies, (tokens, ops)


class FP8Block(torch.nn.Module):
    """Llama-style FP8 MLP layers: quant -> up (column-parallel) -> SiLU -> quant -> down (row-parallel)
    -> all_reduce -> fused residual add + RMSNorm. ``gemm`` is "scaled_mm" or "bmm_fp8"."""

    def __init__(self, hidden: int, inter: int, layers: int, gemm: str) -> None:
        super().__init__()
        ws, rank = dist.get_world_size(), dist.get_rank()
        rows = slice(rank * inter // ws, (rank + 1) * inter // ws)
        self.gemm, self.layers = gemm, layers
        self.act_scale = torch.tensor([4.0 / 448], device="cuda")
        self.w_scale = torch.tensor([1.0 / 448], device="cuda")

        def fp8(seed, n, k, cut):
            full = _replicated(n, k, seed=seed, dtype=torch.float32, scale=448 / 4 / k**0.5)
            return full.clamp(-448, 448).to(FP8)[cut].contiguous()

        self.w_up = [fp8(40 + i, inter, hidden, (rows,)) for i in range(layers)]
        self.w_down = [fp8(50 + i, hidden, inter, (slice(None), rows)) for i in range(layers)]
        self.norm_w = [1 + 0.1 * _replicated(hidden, seed=60 + i) for i in range(layers)]

    def _mm(self, q, w):
        if self.gemm == "scaled_mm":
            return torch._scaled_mm(q, w.t(), self.act_scale, self.w_scale, out_dtype=BF16)
        out = fp.bmm_fp8(q.unsqueeze(0), w.t().unsqueeze(0), self.act_scale, self.w_scale, BF16, "cublas")
        return out.squeeze(0)

    def forward(self, x, residual):
        for i in range(self.layers):
            up = self._mm(fp.quant_fp8_static(x, self.act_scale), self.w_up[i])
            down = self._mm(fp.quant_fp8_static(F.silu(up), self.act_scale), self.w_down[i])
            reduced = funcol.all_reduce(down, "sum", dist.group.WORLD)
            x, residual = fp.fused_add_rms_norm(reduced, residual, self.norm_w[i], 1e-6)
        return x, residual


def _has_flashinfer() -> bool:
    import importlib.util

    return importlib.util.find_spec("flashinfer") is not None


needs_flashinfer = pytest.mark.skipif(not _has_flashinfer(), reason="FlashInfer is not installed")


@pytest.mark.parametrize("gemm", ["scaled_mm", pytest.param("bmm_fp8", marks=needs_flashinfer)])
def test_sp_then_async_tp_on_an_fp8_block(nccl_group, gemm):
    layers, tokens = 3, 2048
    block = FP8Block(hidden=2048, inter=4096, layers=layers, gemm=gemm)
    config = FusionConfig(sequence_parallel=True, async_tp=True, sp_min_tokens=0, async_tp_gating="always")
    compiled, pm = _compile(block, config)
    x, residual = _replicated(tokens, 2048, seed=5), _replicated(tokens, 2048, seed=6)
    out, new_residual = compiled(x, residual)
    expected_out, expected_residual = block(x, residual)
    _assert_close(out, expected_out, "output", rtol=5e-2, atol=5e-2)
    _assert_close(new_residual, expected_residual, "residual", rtol=5e-2, atol=5e-2)

    sp, async_tp = pm.pass_by_name("sequence_parallel"), pm.pass_by_name("async_tp")
    assert sp.stats.matched_count("all_reduce+add+rms_norm+fp8_quant") == layers - 1, pm.report()
    assert sp.stats.matched_count("all_reduce+add+rms_norm") == 1, pm.report()
    ops = async_tp.stats.runs[-1].after.op_histogram()
    # Every reduce_scatter is fused into its down-projection; every fp8 all_gather between layers into
    # the next up-projection. Left: the last layer's output and residual, gathered for the caller.
    assert ops[AR] == 0 and ops[RS] == 0, pm.report()
    assert ops["fusionpasses.gemm_reduce_scatter.default"] == layers, pm.report()
    assert ops["fusionpasses.all_gather_gemm.default"] == layers - 1, pm.report()
    assert ops[AG] == 2, pm.report()
