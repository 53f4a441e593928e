"""Sequence parallelism numerics on 2 CPU processes with gloo: TP blocks compiled with the pass
against eager, every rank's output and residual.

Each block takes a replicated residual into the graph, so the first layer cuts it per rank
(``rank_rows``): a rank reading another rank's rows would fail here on that rank. The two ranks
share one Inductor cache directory, which is what a graph holding a rank constant would get wrong.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

import fusionpasses
from fusionpasses import FusionConfig
from tests.distributed_utils import run_gloo
from tests.sequence_parallel_norms import add_norm_fp32_sum

pytestmark = pytest.mark.gloo

fp = torch.ops.fusionpasses
BF16, FP8 = torch.bfloat16, torch.float8_e4m3fn
HIDDEN, INTER, LAYERS = 32, 64, 3


def _replicated(*shape, seed, dtype=BF16):
    """The same values on every rank."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _compiled(fn, **config):
    cfg = FusionConfig(sequence_parallel=True, sp_min_tokens=0, record_graphs=True, **config)
    options = fusionpasses.compile_options(cfg, compile_threads=1)
    return torch.compile(fn, options=options), options["post_grad_custom_post_pass"].pass_by_name("sequence_parallel")


def _ops_after(sp, run=-1):
    return sp.stats.runs[run].after.op_histogram()


def _assert_matches(actual, expected, what, rank, rtol=2e-2, atol=2e-2):
    assert actual.shape == expected.shape, f"rank {rank} {what}: shape {actual.shape} vs {expected.shape}"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"rank {rank} {what}: {m}")


# ---- bf16 block: decomposed norms, dynamic token counts ------------------------------------------


def _bf16_block(rank, world_size):
    group = dist.group.WORLD
    cols, rows = INTER // world_size, slice(rank * INTER // world_size, (rank + 1) * INTER // world_size)
    # Scaled like trained weights, so activations stay O(1) and bf16 steps stay small.
    w_col = [(_replicated(INTER, HIDDEN, seed=10 + i) / HIDDEN**0.5)[rows].contiguous() for i in range(LAYERS)]
    w_row = [(_replicated(HIDDEN, INTER, seed=20 + i) / INTER**0.5)[:, rows].contiguous() for i in range(LAYERS)]
    norm_w = [1 + 0.1 * _replicated(HIDDEN, seed=30 + i) for i in range(LAYERS)]
    assert all(w.shape == (cols, HIDDEN) for w in w_col)

    def block(x, residual):
        for i in range(LAYERS):
            partial = F.silu(x @ w_col[i].t()) @ w_row[i].t()
            x, residual = add_norm_fp32_sum(funcol.all_reduce(partial, "sum", group), residual, norm_w[i], 1e-5)
        return x, residual

    return block


def _bf16_body(rank, world_size):
    block = _bf16_block(rank, world_size)

    # rank_rows on its own: this rank's rows of a replicated tensor.
    x = _replicated(4 * world_size, 3, seed=1)
    assert torch.equal(fp.rank_rows(x, world_size, dist.group.WORLD.group_name), x.chunk(world_size)[rank])

    # A dynamic token count: one graph for multiples of the world size, a recompile without SP otherwise.
    compiled, sp = _compiled(block)
    for tokens, sp_graphs, plain_graphs in ((8, 1, 0), (6, 1, 0), (5, 1, 1)):
        x, residual = _replicated(tokens, HIDDEN, seed=tokens), _replicated(tokens, HIDDEN, seed=tokens + 100)
        torch._dynamo.mark_dynamic(x, 0)
        torch._dynamo.mark_dynamic(residual, 0)
        out, new_residual = compiled(x, residual)
        expected_out, expected_residual = block(x, residual)
        _assert_matches(out, expected_out, f"output ({tokens} tokens)", rank)
        _assert_matches(new_residual, expected_residual, f"residual ({tokens} tokens)", rank)
        graphs = [run.after.op_histogram() for run in sp.stats.runs]
        scattered = [g["_c10d_functional.reduce_scatter_tensor.default"] for g in graphs]
        assert (scattered.count(LAYERS), scattered.count(0)) == (sp_graphs, plain_graphs), (tokens, scattered)
    sp_graph = graphs[0]
    assert sp_graph["_c10d_functional.all_reduce.default"] == 0
    assert sp_graph["fusionpasses.rank_rows.default"] == 1  # the residual entering the graph, once
    assert sp.stats.matched_count("all_reduce+add+rms_norm") == LAYERS
    assert any("not divisible by world size" in d.reason for d in sp.stats.declined)


def test_bf16_tp_block_matches_eager_on_every_rank():
    run_gloo(_bf16_body)


# ---- FP8 block on the backend's ops, first-layer pattern, NVFP4 ------------------------------------


def _fp8_body(rank, world_size):
    group = dist.group.WORLD
    rows = slice(rank * INTER // world_size, (rank + 1) * INTER // world_size)
    scale = torch.tensor([0.02])
    w_scale = torch.tensor([0.01])

    def fp8_weight(seed, n, k, cut):
        full = _replicated(n, k, seed=seed, dtype=torch.float32)
        return (full / w_scale).clamp(-448, 448).to(FP8)[cut].contiguous()

    w_col = [fp8_weight(40 + i, INTER, HIDDEN, (rows,)) for i in range(2)]
    w_row = [fp8_weight(50 + i, HIDDEN, INTER, (slice(None), rows)) for i in range(2)]
    norm_w = [1 + 0.1 * _replicated(HIDDEN, seed=60 + i) for i in range(3)]

    def block(partial):
        # First layer: the all_reduce result is the residual stream.
        residual = funcol.all_reduce(partial, "sum", group)
        h = fp.rms_norm(residual, norm_w[0], 1e-6)
        for i in range(2):
            up = torch._scaled_mm(fp.quant_fp8_static(h, scale), w_col[i].t(), scale, w_scale, out_dtype=BF16)
            q = fp.quant_fp8_static(F.silu(up), scale)
            down = torch._scaled_mm(q, w_row[i].t(), scale, w_scale, out_dtype=BF16)
            h, residual = fp.fused_add_rms_norm(funcol.all_reduce(down, "sum", group), residual, norm_w[i + 1], 1e-6)
        return h, residual

    nvfp4_norm_w = 1 + 0.1 * _replicated(64, seed=63)

    def nvfp4_layer(partial, global_scale):
        normed = fp.rms_norm(funcol.all_reduce(partial, "sum", group), nvfp4_norm_w, 1e-6)
        return fp.nvfp4_quant(normed, global_scale, None, "linear")

    def program(partial, partial64, global_scale):
        return (*block(partial), *nvfp4_layer(partial64, global_scale))

    compiled, sp = _compiled(program)
    # Partial sums differ per rank.
    args = (_replicated(8, HIDDEN, seed=70 + rank), _replicated(8, 64, seed=80 + rank), torch.tensor([300.0]))
    out, residual, packed, scales = compiled(*args)
    expected_out, expected_residual, expected_packed, expected_scales = program(*args)
    _assert_matches(out, expected_out, "fp8 output", rank, rtol=5e-2, atol=5e-2)
    _assert_matches(residual, expected_residual, "fp8 residual", rank, rtol=5e-2, atol=5e-2)
    # Custom ops run their CPU references either way and a 2-rank sum has one order: bit for bit.
    assert torch.equal(packed, expected_packed), f"rank {rank}: nvfp4 packed values"
    assert torch.equal(scales.view(torch.uint8), expected_scales.view(torch.uint8)), f"rank {rank}: nvfp4 scales"

    assert sp.stats.matched_count("all_reduce+rms_norm+fp8_quant") == 1, sp.stats
    assert sp.stats.matched_count("all_reduce+add+rms_norm+fp8_quant") == 1
    assert sp.stats.matched_count("all_reduce+add+rms_norm") == 1
    assert sp.stats.matched_count("all_reduce+rms_norm+nvfp4_quant") == 1
    ops = _ops_after(sp)
    assert ops["_c10d_functional.all_reduce.default"] == 0 and ops["fusionpasses.rank_rows.default"] == 0
    # fp8 into each up-projection, the last output and residual, nvfp4 values and scales.
    assert ops["_c10d_functional.all_gather_into_tensor.default"] == 6


def test_fp8_and_nvfp4_blocks_match_eager_on_every_rank():
    run_gloo(_fp8_body)
