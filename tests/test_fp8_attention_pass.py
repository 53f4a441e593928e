"""FP8AttentionQuantPass on CPU: which traced quantize(+pad) chains it fuses or declines, bit-exact
numerics of the rewritten graphs, and the pass inside torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import fusionpasses
from fusionpasses.config import FusionConfig
from fusionpasses.passes.fp8_attention_quant import FP8AttentionQuantPass
from fusionpasses.patterns.fp8_attention_quant import NotRewritable, QuantForAttentionMatch
from tests.fx_utils import assert_no_raw_symints, post_grad_graph

FP8 = torch.float8_e4m3fn
QUANT = torch.ops.fusionpasses.qkv_fp8_quant.default


def quant(x: torch.Tensor, scale) -> torch.Tensor:
    return (x.float() / scale).clamp(-448.0, 448.0).to(FP8)


def quant_pad(x: torch.Tensor, scale, pad: int) -> torch.Tensor:
    return F.pad(quant(x, scale), (0, pad))


def trace(fn, *args, mode: str = "fake") -> fx.GraphModule:
    """The post-grad form Inductor hands its custom passes: decomposed aten with fake values."""
    return post_grad_graph(fn, *args, tracing_mode=mode)


def run_pass(gm: fx.GraphModule, config: FusionConfig | None = None) -> FP8AttentionQuantPass:
    p = FP8AttentionQuantPass(config or FusionConfig(fp8_attention_quant=True))
    p(gm.graph)
    gm.recompile()
    return p


def targets(gm: fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def fp8_bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == FP8 else t


def assert_outputs_bitwise_equal(gm: fx.GraphModule, fn, *args) -> None:
    got, expected = gm(*args), fn(*args)
    got, expected = (got, expected) if isinstance(got, (tuple, list)) else ((got,), (expected,))
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape
        assert torch.equal(fp8_bits(g), fp8_bits(e))


def qkv_input(seq=9, heads=2, head_dim=72, batch=None, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (seq, 3, heads, head_dim) if batch is None else (batch, seq, 3, heads, head_dim)
    return (torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g) * 2)).to(torch.bfloat16)


SCALE = torch.tensor([0.02])


# ---------------------------------------------------------------------------------------------
# fused forms
# ---------------------------------------------------------------------------------------------


def vit_qkv_quant(qkv, scale):
    """Q, K, V of a fused projection, quantized then padded 72 -> 80."""
    return tuple(quant_pad(qkv[:, i], scale, 8) for i in range(3))


@pytest.mark.parametrize("mode", ["fake", "symbolic"])
def test_quant_then_pad_of_strided_qkv_views(mode):
    qkv = qkv_input()
    gm = trace(vit_qkv_quant, qkv, SCALE, mode=mode)
    p = run_pass(gm)
    assert p.stats.pattern("quant_then_pad").matched == 3 and not p.stats.declined
    ops = targets(gm)
    assert ops.count(QUANT) == 3
    assert not {
        torch.ops.aten.constant_pad_nd.default,
        torch.ops.aten.div.Tensor,
        torch.ops.aten.clamp_min.default,
    } & set(ops)
    fused = [n for n in gm.graph.nodes if n.target == QUANT]
    assert all(n.args[0].target == torch.ops.aten.select.int for n in fused), "the fused op reads the views"
    assert [n.args[2] for n in fused] == [8, 8, 8]
    assert all(n.meta["val"].shape[-1] == 80 and n.meta["val"].dtype == FP8 for n in fused)
    assert_no_raw_symints(gm)
    assert_outputs_bitwise_equal(gm, vit_qkv_quant, qkv, SCALE)
    assert_outputs_bitwise_equal(gm, vit_qkv_quant, qkv_input(seq=4, seed=1), torch.tensor([0.5]))


def test_pad_then_quant():
    def fn(qkv, scale):
        return quant(F.pad(qkv[:, 1], (0, 8)), scale)

    qkv = qkv_input()
    gm = trace(fn, qkv, SCALE)
    p = run_pass(gm)
    assert p.stats.pattern("pad_then_quant").matched == 1 and targets(gm).count(QUANT) == 1
    assert torch.ops.aten.constant_pad_nd.default not in targets(gm)
    assert_outputs_bitwise_equal(gm, fn, qkv, SCALE)


def test_4d_batch_views_and_bf16_divided_by_a_float32_tensor():
    def fn(qkv, scale):
        # no explicit .float(): bf16 / float32 (1,) tensor already divides in fp32
        return F.pad((qkv[:, :, 2] / scale).clamp(-448, 448).to(FP8), (0, 8))

    qkv = qkv_input(batch=2, seq=5)
    gm = trace(fn, qkv, SCALE)
    p = run_pass(gm)
    assert p.stats.matched == 1 and targets(gm).count(QUANT) == 1
    assert_outputs_bitwise_equal(gm, fn, qkv, SCALE)


def test_python_number_scale_becomes_a_tensor():
    def fn(qkv):
        return quant_pad(qkv[:, 0], 0.037, 8)

    qkv = qkv_input()
    gm = trace(fn, qkv)
    p = run_pass(gm)
    assert p.stats.matched == 1 and torch.ops.aten.full.default in targets(gm)
    assert_outputs_bitwise_equal(gm, fn, qkv)


def test_clamp_written_as_one_op_in_either_bound_order():
    def fn(qkv, scale):
        y = torch.ops.aten.clamp.default(qkv[:, 0].float() / scale, -448.0, 448.0)
        z = torch.clamp_min(torch.clamp_max(qkv[:, 1].float() / scale, 448.0), -448.0)
        return F.pad(y.to(FP8), (0, 8)), F.pad(z.to(FP8), (0, 8))

    qkv = qkv_input()
    gm = make_fx(fn, tracing_mode="fake")(qkv, SCALE)  # no decompositions: aten.clamp stays
    p = run_pass(gm)
    assert p.stats.matched == 2
    assert_outputs_bitwise_equal(gm, fn, qkv, SCALE)


def attention_on_aligned_heads(q, k, v, qs, ks, vs, cu):
    q8, k8, v8 = quant(q, qs), quant(k, ks), quant(v, vs)
    return torch.ops.fusionpasses.fp8_attention(q8, k8, v8, qs, ks, vs, cu, 6, 64, torch.bfloat16)


def test_aligned_quant_feeding_fp8_attention():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(10, 2, 64, generator=g).to(torch.bfloat16) for _ in range(3))
    scales = [(t.float().abs().amax() / 448).reshape(1) for t in (q, k, v)]
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    gm = trace(attention_on_aligned_heads, q, k, v, *scales, cu)
    p = run_pass(gm)
    assert p.stats.pattern("quant_for_fp8_attention").matched == 3
    assert [n.args[2] for n in gm.graph.nodes if n.target == QUANT] == [0, 0, 0]
    assert_outputs_bitwise_equal(gm, attention_on_aligned_heads, q, k, v, *scales, cu)


def test_plain_fp8_casts_are_not_candidates():
    def fn(x, scale):  # e.g. an FP8 GEMM activation: aligned, no pad, returned
        return quant(x, scale)

    gm = trace(fn, torch.randn(4, 2, 64), SCALE)
    p = run_pass(gm)
    assert p.stats.matched == 0 and not p.stats.declined
    assert QUANT not in targets(gm)


def test_idempotent():
    qkv = qkv_input()
    gm = trace(vit_qkv_quant, qkv, SCALE)
    run_pass(gm)
    before = str(gm.graph)
    p = run_pass(gm)
    assert str(gm.graph) == before and p.stats.matched == 0 and not p.stats.declined


# ---------------------------------------------------------------------------------------------
# declines
# ---------------------------------------------------------------------------------------------


def _bf16_division(qkv, scale):
    return F.pad((qkv[:, 0] / scale.reshape(())).clamp(-448, 448).to(FP8), (0, 8))


def _other_bounds(qkv, scale):
    return F.pad((qkv[:, 0].float() / scale).clamp(-240, 240).to(FP8), (0, 8))


def _no_clamp(qkv, scale):
    return F.pad((qkv[:, 0].float() / scale).to(FP8), (0, 8))


def _shared_division(qkv, scale):
    y = qkv[:, 0].float() / scale
    return F.pad(y.clamp(-448, 448).to(FP8), (0, 8)), y


def _unpadded_also_used(qkv, scale):
    q8 = quant(qkv[:, 0], scale)
    return F.pad(q8, (0, 8)), q8


def _broadcasting_scale(qkv, scale):
    return F.pad(quant(qkv[:, 0], scale.reshape(1, 1, 1, 1)), (0, 8))


def _per_head_scale(qkv, scale):
    return F.pad(quant(qkv[:, 0], scale.expand(2).reshape(2, 1).contiguous()), (0, 8))


def _pad_other_dim(qkv, scale):
    return F.pad(quant(qkv[:, 0], scale), (0, 0, 0, 2))


def _pad_value(qkv, scale):
    return F.pad(quant(qkv[:, 0], scale), (0, 8), value=1.0)


def _cast_of_an_input(qkv, scale):
    return F.pad(qkv.to(FP8), (0, 8))


def _clamp_without_division(qkv, scale):
    return F.pad(qkv[:, 0].float().clamp(-448, 448).to(FP8), (0, 8))


def _flat_2d(qkv, scale):
    return F.pad(quant(qkv[:, 0].reshape(qkv.shape[0], -1), scale), (0, 16))


@pytest.mark.parametrize(
    "fn,reason",
    [
        (_bf16_division, "rounded to torch.bfloat16 before the FP8 cast"),
        (_other_bounds, "one clamp to [-448, 448]"),
        (_no_clamp, "one clamp to [-448, 448]"),
        (_shared_division, "has other users"),
        (_unpadded_also_used, "has other users"),
        (_broadcasting_scale, "broadcasts"),
        (_per_head_scale, "not one per tensor"),
        (_pad_other_dim, "not a right pad of the last dim"),
        (_pad_value, "not zero"),
        (_flat_2d, "2-D"),
        (_cast_of_an_input, "one clamp to [-448, 448]"),
        (_clamp_without_division, "not a true division"),
    ],
)
def test_declines_with_reason(fn, reason):
    qkv = qkv_input()
    gm = trace(fn, qkv, SCALE)
    before = str(gm.graph)
    p = run_pass(gm)
    assert p.stats.matched == 0
    reasons = [d.reason for d in p.stats.declined]
    assert len(reasons) == 1 and reason in reasons[0], reasons
    assert str(gm.graph) == before, "a declined candidate must be left untouched"


def test_cuda_tensors_need_a_known_sm89_capability():
    """The device gate, on a match whose source is a fake CUDA tensor (no GPU needed)."""
    graph = fx.Graph()
    source = graph.placeholder("q")
    with FakeTensorMode():
        source.meta["val"] = torch.empty(4, 2, 72, dtype=torch.bfloat16, device="cuda")
    match = QuantForAttentionMatch(source=source, scale=1.0, pad=0, nodes=[source])

    def reason(capability):
        p = FP8AttentionQuantPass(FusionConfig(fp8_attention_quant=True, device_capability=capability))
        try:
            p._check_device(match)
        except NotRewritable as e:
            return str(e)
        return None

    assert reason((9, 0)) is None and reason((8, 9)) is None and reason((10, 0)) is None
    assert "needs sm89" in reason((8, 0))
    if not torch.cuda.is_available():
        assert "no GPU capability known" in reason(None)


# ---------------------------------------------------------------------------------------------
# inside torch.compile
# ---------------------------------------------------------------------------------------------


def vit_attention_block(qkv, q_scale, k_scale, v_scale, cu_seqlens):
    """What a ViT block traces to: fused QKV views, per-tensor quantize + pad to 80, FP8 attention."""
    q, k, v = (quant_pad(qkv[:, i], s, 8) for i, s in enumerate((q_scale, k_scale, v_scale)))
    return torch.ops.fusionpasses.fp8_attention(q, k, v, q_scale, k_scale, v_scale, cu_seqlens, 16, 72, torch.bfloat16)


@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_block_is_fused_and_bit_exact(dynamic):
    cfg = FusionConfig(fp8_attention_quant=True)
    manager = fusionpasses.PassManager(cfg)
    compiled = torch.compile(
        vit_attention_block, options={"post_grad_custom_post_pass": manager, "fx_graph_cache": False}, dynamic=dynamic
    )
    torch._dynamo.reset()
    for seq, lengths in ((16, [10, 6]), (12, [12])):
        qkv = qkv_input(seq=seq, seed=seq)
        scales = [(qkv[:, i].float().abs().amax() / 448).reshape(1) for i in range(3)]
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        out = compiled(qkv, *scales, cu)
        expected = vit_attention_block(qkv, *scales, cu)
        assert torch.equal(out, expected)
    stats = manager.pass_by_name("fp8_attention_quant").stats
    assert stats.pattern("quant_then_pad").matched >= 3 and not stats.declined
    torch._dynamo.reset()
