"""The batch-invariant pass on CPU: FP8 GEMM nodes rewritten onto the batch-invariant op (graph and
values), declines with reasons, idempotence, the collective-passes note, and a real torch.compile."""

from __future__ import annotations

import pytest
import torch

import fusionpasses
from fusionpasses import FusionConfig, PassManager
from fusionpasses.passes.batch_invariant import COLLECTIVES_OFF_REASON, BatchInvariantPass
from tests.fx_utils import nodes_of, op_counts, post_grad_graph

FP8 = torch.float8_e4m3fn
BI_OP = "fusionpasses.batch_invariant_fp8_gemm.default"
bi_gemm = torch.ops.fusionpasses.batch_invariant_fp8_gemm.default
scaled_mm = torch.ops.aten._scaled_mm.default


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token FP8 quantization: (fp8 rows, (M, 1) float32 dequantization scales)."""
    scale = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-6) / 448.0
    return (x.float() / scale).clamp(-448.0, 448.0).to(FP8), scale


def fp8_mlp(x, w_up, w_down, up_scale, down_scale, bias):
    """Per-tensor scales on the first GEMM, per-token x per-channel scales and a bias on the second."""
    q = (x.float() / 0.05).clamp(-448.0, 448.0).to(FP8)
    h = torch._scaled_mm(q, w_up.t(), torch.tensor(0.05), up_scale, out_dtype=torch.bfloat16)
    q, q_scale = quantize_rows(torch.nn.functional.silu(h))
    return torch._scaled_mm(q, w_down.t(), q_scale, down_scale, bias=bias, out_dtype=torch.bfloat16)


def mlp_inputs(M: int = 5, H: int = 32, I: int = 64, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(M, H, generator=g).to(torch.bfloat16),
        torch.randn(I, H, generator=g).to(FP8),
        torch.randn(H, I, generator=g).to(FP8),
        torch.tensor(0.02),
        torch.rand(1, H, generator=g) * 0.02 + 0.01,
        torch.randn(H, generator=g).to(torch.bfloat16),
    )


def run_pass(gm: torch.fx.GraphModule, config: FusionConfig | None = None) -> BatchInvariantPass:
    manager = PassManager(config or FusionConfig(batch_invariant=True))
    manager(gm.graph)
    gm.recompile()
    return manager.pass_by_name("batch_invariant")


def test_rewrites_every_scaled_mm_and_keeps_the_values():
    args = mlp_inputs()
    gm = post_grad_graph(fp8_mlp, *args)
    before = [(n.args[:4], n.args[4] if len(n.args) > 4 else None, n.meta["val"]) for n in nodes_of(gm, scaled_mm)]
    p = run_pass(gm)

    counts = op_counts(gm)
    assert counts["aten._scaled_mm.default"] == 0
    assert counts[BI_OP] == 2
    assert p.stats.matched_count("scaled_mm") == 2 and not p.stats.declined
    # Same operands, scales and bias, in the op's order, and the output dtype carried over.
    after = nodes_of(gm, bi_gemm)
    for (operands, bias, old_val), node in zip(before, after):
        assert node.args[:4] == operands and node.args[4] == bias and node.args[5:] == (torch.bfloat16, False)
        new_val = node.meta["val"]
        assert (new_val.shape, new_val.dtype, new_val.stride()) == (old_val.shape, old_val.dtype, old_val.stride())
    torch.testing.assert_close(gm(*args), fp8_mlp(*args), rtol=2**-7, atol=1e-3)


def test_keeps_the_accumulation_mode():
    def fast(a, w, sa, sb):
        return torch._scaled_mm(a, w.t(), sa, sb, out_dtype=torch.float16, use_fast_accum=True)

    g = torch.Generator().manual_seed(4)
    args = (torch.randn(8, 32, generator=g).to(FP8), torch.randn(16, 32, generator=g).to(FP8), torch.tensor(1.0), torch.tensor(0.5))
    gm = post_grad_graph(fast, *args)
    run_pass(gm)
    [node] = nodes_of(gm, bi_gemm)
    assert node.args[5:] == (torch.float16, True)


def test_rewrites_bmm_fp8_batched():
    g = torch.Generator().manual_seed(1)

    def heads(a, w, sa, sb):
        return torch.ops.fusionpasses.bmm_fp8(a, w.transpose(1, 2), sa, sb, torch.float16)

    args = (
        torch.randn(3, 7, 32, generator=g).to(FP8),
        torch.randn(3, 16, 32, generator=g).to(FP8),
        torch.tensor([0.5]),
        torch.tensor([0.25]),
    )
    gm = post_grad_graph(heads, *args)
    p = run_pass(gm)
    assert op_counts(gm)[BI_OP] == 1 and op_counts(gm)["fusionpasses.bmm_fp8.default"] == 0
    assert p.stats.matched_count("bmm_fp8") == 1
    # Both CPU kernels are the fp32 product times the scale product: equal bit for bit.
    torch.testing.assert_close(gm(*args), heads(*args), rtol=0, atol=0)


DECLINED = {
    "fp32 out": (
        lambda a, w, sa, sb: torch._scaled_mm(a, w.t(), sa, sb, out_dtype=torch.float32),
        "scaled_mm",
        "out_dtype torch.float32 is not bfloat16 or float16",
    ),
    "fp8 out": (
        lambda a, w, sa, sb: torch._scaled_mm(a, w.t(), sa, sb, scale_result=torch.tensor(2.0), out_dtype=torch.bfloat16),
        "scaled_mm",
        "scale_result",
    ),
    "e5m2 activations": (
        lambda a, w, sa, sb: torch._scaled_mm(a.to(torch.float8_e5m2), w.t(), sa, sb, out_dtype=torch.bfloat16),
        "scaled_mm",
        "float8_e4m3fn only",
    ),
    "column-major A": (
        lambda a, w, sa, sb: torch._scaled_mm(a.t().contiguous().t(), w.t(), sa, sb, out_dtype=torch.bfloat16),
        "scaled_mm",
        "A must be row-major",
    ),
    "bf16 GEMM": (
        lambda a, w, sa, sb: torch.mm(a.to(torch.bfloat16), w.t().to(torch.bfloat16)),
        "not_rewritten_gemm",
        "stays on cuBLAS",
    ),
}
if hasattr(torch.nn.functional, "scaled_mm"):
    from torch.nn.functional import ScalingType

    DECLINED["F.scaled_mm"] = (
        lambda a, w, sa, sb: torch.nn.functional.scaled_mm(
            a, w.t(), sa, ScalingType.TensorWise, sb, ScalingType.TensorWise, output_dtype=torch.bfloat16
        ),
        "not_rewritten_gemm",
        "_scaled_mm_v2",
    )


@pytest.mark.parametrize("case", sorted(DECLINED))
def test_declines_with_a_reason_and_leaves_the_node(case):
    fn, pattern, reason = DECLINED[case]
    g = torch.Generator().manual_seed(2)
    args = (torch.randn(8, 32, generator=g).to(FP8), torch.randn(16, 32, generator=g).to(FP8), torch.tensor(1.0), torch.tensor(0.5))
    gm = post_grad_graph(fn, *args)
    graph_before = str(gm.graph)
    p = run_pass(gm)
    assert str(gm.graph) == graph_before
    assert p.stats.matched == 0
    [decline] = p.stats.declined
    assert decline.pattern == pattern and reason in decline.reason, decline


def test_is_idempotent():
    args = mlp_inputs()
    gm = post_grad_graph(fp8_mlp, *args)
    p = run_pass(gm)
    once = str(gm.graph)
    p(gm.graph)
    assert str(gm.graph) == once
    assert p.stats.matched_count("scaled_mm") == 2


@pytest.mark.parametrize("requested", [(), ("sequence_parallel", "async_tp")])
def test_note_says_the_collective_passes_are_off(requested):
    config = FusionConfig(batch_invariant=True, **{name: True for name in requested})
    p = BatchInvariantPass(config)
    [note] = p.stats.notes
    assert note.startswith("collective passes off: sequence_parallel, async_tp")
    assert COLLECTIVES_OFF_REASON in note
    assert ("not requested" in note) == (not requested)
    p.stats.reset()
    p(post_grad_graph(fp8_mlp, *mlp_inputs()).graph)
    assert p.stats.notes == [note]


class FP8MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        _, w_up, w_down, _, down_scale, bias = mlp_inputs()
        self.w_up = torch.nn.Parameter(w_up, requires_grad=False)
        self.w_down = torch.nn.Parameter(w_down, requires_grad=False)
        self.register_buffer("up_scale", torch.full((1, w_up.shape[0]), 0.02))
        self.register_buffer("down_scale", down_scale)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, q_scale = quantize_rows(x)
        h = torch._scaled_mm(q, self.w_up.t(), q_scale, self.up_scale, out_dtype=torch.bfloat16)
        q, q_scale = quantize_rows(torch.nn.functional.silu(h))
        return torch._scaled_mm(q, self.w_down.t(), q_scale, self.down_scale, bias=self.bias, out_dtype=torch.bfloat16)


def test_torch_compile_with_a_dynamic_batch():
    """Through Inductor: the pass runs as the post-grad custom pass on a graph with a symbolic M."""
    model = FP8MLP()
    options = fusionpasses.compile_options(FusionConfig(batch_invariant=True))
    manager: PassManager = options["post_grad_custom_post_pass"]
    compiled = torch.compile(model, options=options)
    g = torch.Generator().manual_seed(3)
    # A cached graph would skip the pass: compile fresh, in this scope only.
    with torch._inductor.config.patch(fx_graph_cache=False):
        for M in (5, 9, 33):
            x = torch.randn(M, 32, generator=g).to(torch.bfloat16)
            if M == 5:
                torch._dynamo.mark_dynamic(x, 0)
            torch.testing.assert_close(compiled(x), model(x), rtol=2**-7, atol=1e-3)
    stats = manager.pass_by_name("batch_invariant").stats
    assert stats.matched_count("scaled_mm") == 2, manager.report()
    assert len(stats.runs) == 1, "one graph for every M: the batch dimension stayed symbolic"


def test_never_raises_on_nodes_it_cannot_read():
    """Hand-built nodes: one without fake-tensor metadata, one missing arguments. Both are declined."""
    graph = torch.fx.Graph()
    a, w, sa, sb = (graph.placeholder(name) for name in ("a", "w", "sa", "sb"))
    no_meta = graph.call_function(scaled_mm, (a, w, sa, sb, None, None, torch.bfloat16))
    truncated = graph.call_function(scaled_mm, (a,), {"out_dtype": torch.bfloat16})
    graph.output((no_meta, truncated))
    p = BatchInvariantPass(FusionConfig(batch_invariant=True))
    p(graph)
    reasons = {d.node: d.reason for d in p.stats.declined}
    assert "no fake tensor metadata" in reasons[no_meta.name]
    assert "could not analyze" in reasons[truncated.name]
    assert len(nodes_of(torch.fx.GraphModule(torch.nn.Module(), graph), scaled_mm)) == 2


@pytest.mark.parametrize("linear", ["scaled_mm", "bmm_fp8"])
def test_tensor_parallel_model_keeps_its_collectives_and_loses_cublas(fake_pg2, linear):
    """The compile mode on the reference TP model: every FP8 GEMM on the batch-invariant op, the
    all_reduces untouched because SP and AsyncTP are off (they would rewrite them otherwise)."""
    from torch.func import functional_call

    from fusionpasses.models import TPModelConfig, TPTransformer, example_input

    cfg = TPModelConfig(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, num_layers=1, linear=linear)
    model = TPTransformer(cfg)
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}

    def forward(x, *values):
        return functional_call(model, dict(zip(tensors, values)), (x,))

    args = (example_input(cfg, 16), *tensors.values())
    collectives = FusionConfig(sequence_parallel=True, async_tp=True, symm_mem="assume", sp_min_tokens=0,
                               async_tp_gating="always", device_capability=(9, 0))
    gm = post_grad_graph(forward, *args)
    manager = PassManager(collectives.replace(batch_invariant=True))
    manager(gm.graph)
    counts = op_counts(gm)
    assert counts[BI_OP] == 4  # qkv, o, gate_up, down
    assert counts["aten._scaled_mm.default"] == counts["fusionpasses.bmm_fp8.default"] == 0
    assert counts["_c10d_functional.all_reduce.default"] == 2
    assert not [op for op in counts if "reduce_scatter" in op or "all_gather" in op or "symm_mem" in op]
    for name in ("sequence_parallel", "async_tp"):
        assert manager.pass_by_name(name).disabled_reason() is not None
    # Attention's bf16 bmms are listed as what still runs on cuBLAS.
    declined = manager.pass_by_name("batch_invariant").stats.declined
    assert declined and all(d.pattern == "not_rewritten_gemm" for d in declined)

    control = post_grad_graph(forward, *args)
    PassManager(collectives)(control.graph)
    assert op_counts(control)["_c10d_functional.all_reduce.default"] < 2, "the collective passes rewrite this graph"
