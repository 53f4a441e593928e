"""The reference model: config checks, sharding, sharded == unsharded on gloo, and the compiled graph."""

from __future__ import annotations

import collections

import pytest
import torch

from fusionpasses.inspection import target_name
from fusionpasses.models import (
    TPMLP,
    TPModelConfig,
    TPTransformer,
    example_input,
    reference_forward,
)
from tests.conftest import fake_process_group
from tests.distributed_utils import run_gloo


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(linear="int8"), "linear must be one of"),
        (dict(hidden_size=250), "divisible by num_heads"),
        (dict(num_kv_heads=3), "divisible by num_kv_heads"),
        (dict(num_layers=0), "num_layers must be >= 1"),
        (dict(linear="bmm_fp8", dtype=torch.float32), "cannot produce dtype"),
        (dict(fp8_activation_amax=0.0), "fp8_activation_amax must be positive"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TPModelConfig(**kwargs)


def test_config_rejects_world_sizes_that_do_not_split_evenly():
    with pytest.raises(ValueError, match="num_kv_heads \\(4\\) is not divisible by the world size 8"):
        TPModelConfig().check_world_size(8)
    # 4 heads of 24 over 2 ranks: 48 columns per rank is fine for bf16 but not for cuBLASLt FP8 tiles.
    cfg = TPModelConfig(hidden_size=72, num_heads=3, num_kv_heads=3, intermediate_size=72, linear="scaled_mm")
    with pytest.raises(ValueError, match="multiple of 16 for FP8 linears"):
        cfg.check_world_size(1)
    TPModelConfig(hidden_size=72, num_heads=3, num_kv_heads=3, intermediate_size=72).check_world_size(3)


def test_rank_shards_reassemble_the_unsharded_weights():
    cfg = TPModelConfig(num_layers=1, dtype=torch.float32)
    full = TPTransformer(cfg, tensor_parallel=False)
    shards = []
    for rank in range(2):
        with fake_process_group(2, rank=rank):
            shards.append(TPTransformer(cfg))
    layer = [m.layers[0] for m in shards]
    ref = full.layers[0]
    d, h, kv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads

    def qkv_parts(w: torch.Tensor, heads: int, kv_heads: int) -> list[torch.Tensor]:
        return list(w.split([heads * d, kv_heads * d, kv_heads * d]))

    full_parts = qkv_parts(ref.attn.qkv.weight, h, kv)
    rank_parts = [qkv_parts(lay.attn.qkv.weight, h // 2, kv // 2) for lay in layer]
    for i in range(3):
        torch.testing.assert_close(torch.cat([p[i] for p in rank_parts]), full_parts[i], rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([lay.attn.o.weight for lay in layer], 1), ref.attn.o.weight, rtol=0, atol=0)
    gate_up = [lay.mlp.gate_up.weight.chunk(2) for lay in layer]
    full_gate, full_up = ref.mlp.gate_up.weight.chunk(2)
    torch.testing.assert_close(torch.cat([g for g, _ in gate_up]), full_gate, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([u for _, u in gate_up]), full_up, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([lay.mlp.down.weight for lay in layer], 1), ref.mlp.down.weight, rtol=0, atol=0)
    torch.testing.assert_close(layer[1].input_norm, ref.input_norm, rtol=0, atol=0)


def test_fp8_scales_come_from_the_full_weight():
    cfg = TPModelConfig(num_layers=1, linear="scaled_mm")
    full = TPTransformer(cfg, tensor_parallel=False).layers[0].mlp.down
    with fake_process_group(2, rank=1):
        shard = TPTransformer(cfg).layers[0].mlp.down
    assert shard.weight.dtype == torch.float8_e4m3fn and shard.weight.is_contiguous()
    assert shard.weight_scale.shape == (1,) and shard.input_scale.shape == (1,)
    torch.testing.assert_close(shard.weight_scale, full.weight_scale, rtol=0, atol=0)
    torch.testing.assert_close(shard.input_scale, torch.tensor([16.0 / 448.0]))
    expected = full.weight.view(torch.uint8).chunk(2, dim=1)[1]
    assert torch.equal(shard.weight.view(torch.uint8), expected)


def _sharded_matches_unsharded(rank: int, world_size: int) -> None:
    def check(cfg: TPModelConfig, atol: float, rtol: float) -> None:
        x = example_input(cfg, 13)
        with torch.no_grad():
            out = TPTransformer(cfg)(x)
        torch.testing.assert_close(out, reference_forward(cfg, x), atol=atol, rtol=rtol, msg=lambda m: f"{cfg}: {m}")

    # fp32 activations: sharding errors show up, reduction-order rounding does not.
    check(TPModelConfig(dtype=torch.float32), atol=1e-5, rtol=1e-5)
    check(TPModelConfig(dtype=torch.float32, linear="scaled_mm"), atol=1e-5, rtol=1e-5)
    # bf16: the partial sums are rounded to bf16 before the all_reduce.
    check(TPModelConfig(), atol=4e-2, rtol=4e-2)
    # One FP8 MLP: the quantized inputs are identical, only the bf16 partial sums differ.
    for linear in ("scaled_mm", "bmm_fp8"):
        cfg = TPModelConfig(linear=linear)
        x = example_input(cfg, 13)
        with torch.no_grad():
            out = TPMLP(cfg)(x).wait()
            ref = TPMLP(cfg, tensor_parallel=False)(x)
        torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    # Whole FP8 model: a bf16 rounding difference can flip an FP8 rounding of the next layer's input
    # (1/8 relative), so agreement is looser; a sharding bug is off by O(1).
    check(TPModelConfig(linear="bmm_fp8"), atol=0.25, rtol=0.1)


@pytest.mark.gloo
def test_sharded_model_matches_unsharded_on_gloo():
    run_gloo(_sharded_matches_unsharded, world_size=2)


# bf16 (aten.mm) is compiled by tests/test_inspect.py's reference run; these are the FP8 GEMM forms.
@pytest.mark.parametrize("linear, gemm", [("scaled_mm", "aten._scaled_mm.default"), ("bmm_fp8", "fusionpasses.bmm_fp8.default")])
def test_compiled_fp8_graph_on_fake_process_group(linear, gemm):
    cfg = TPModelConfig(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, num_layers=1, linear=linear)
    graphs: list[collections.Counter[str]] = []

    def record(graph: torch.fx.Graph) -> None:
        graphs.append(collections.Counter(target_name(n.target) for n in graph.nodes if n.op == "call_function"))

    with fake_process_group(2):
        model = TPTransformer(cfg)
        x = example_input(cfg, 8)
        with torch.no_grad(), torch._inductor.config.patch(
            fx_graph_cache=False, compile_threads=1, post_grad_custom_post_pass=record
        ):
            out = torch.compile(model, fullgraph=True)(x)
    assert out.shape == (8, 64) and out.dtype == torch.bfloat16
    (ops,) = graphs
    assert ops["_c10d_functional.all_reduce.default"] == 2 * cfg.num_layers
    assert ops["_c10d_functional.wait_tensor.default"] == 2 * cfg.num_layers
    assert ops[gemm] == 4 * cfg.num_layers  # qkv, o, gate_up, down
