"""Sequence-parallel pass on post-grad-shaped graphs with a fake process group (world sizes 2 and 4):
each pattern and norm spelling, op counts before and after, the gathered forms AsyncTP expects,
declines with their reasons, dynamic token counts, and the SP -> AsyncTP chain."""

from __future__ import annotations

import functools
import operator

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from fusionpasses import FusionConfig, PassManager
from fusionpasses.passes.async_tp import AsyncTPPass
from fusionpasses.passes.sequence_parallel import SequenceParallelPass
from fusionpasses.patterns.norm import match_norm_after
from tests.fx_utils import assert_no_raw_symints, nodes_of, op_counts, post_grad_graph
from tests.sequence_parallel_norms import (
    ADD_NORMS,
    NORMS,
    add_norm_fp32_sum,
    add_norm_fused_op,
    add_norm_of,
    norm_functional,
    norm_hf,
    norm_op,
    norm_plain,
)

c10d = torch.ops._c10d_functional
fp = torch.ops.fusionpasses
aten = torch.ops.aten
BF16, FP16, FP8 = torch.bfloat16, torch.float16, torch.float8_e4m3fn

AR, RS, AG = (
    "_c10d_functional.all_reduce.default",
    "_c10d_functional.reduce_scatter_tensor.default",
    "_c10d_functional.all_gather_into_tensor.default",
)
RANK_ROWS = "fusionpasses.rank_rows.default"
ALWAYS = FusionConfig(sequence_parallel=True, sp_min_tokens=0)


def all_reduce(x):
    return funcol.all_reduce(x, "sum", dist.group.WORLD)


def run_pass(gm, config=ALWAYS) -> SequenceParallelPass:
    p = SequenceParallelPass(config)
    p(gm.graph)
    gm.recompile()
    return p


def only_decline(p: SequenceParallelPass):
    (decline,) = p.stats.declined
    return decline


def gathered_from(node):
    """The shard an all_gather (plain or as bytes) of ``node`` moves, else None."""
    if node.target is aten.view.dtype:
        node = node.args[0]
    if node.target is not c10d.wait_tensor.default or node.args[0].target is not c10d.all_gather_into_tensor.default:
        return None
    source = node.args[0].args[0]
    return source.args[0] if source.target is aten.view.dtype else source


def _ids(fns):
    return [f.__name__ for f in fns]


# ---- first layer: all_reduce -> norm ----------------------------------------------------------


@pytest.mark.parametrize("eps", [1e-6, 0.1])
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=str)
@pytest.mark.parametrize("norm", NORMS, ids=_ids(NORMS))
def test_first_layer(fake_pg, norm, dtype, eps):
    ws = dist.get_world_size()
    m, h = 8 * ws, 32
    partial, w, w_col = torch.randn(m, h, dtype=dtype), torch.randn(h, dtype=dtype), torch.randn(h, 16, dtype=dtype)

    def layer(partial, w, w_col):
        reduced = all_reduce(partial)
        return norm(reduced, w, eps) @ w_col, reduced

    gm = post_grad_graph(layer, partial, w, w_col)
    assert op_counts(gm)[AR] == 1
    p = run_pass(gm)
    counts = op_counts(gm)
    assert (counts[AR], counts[RS], counts[AG], counts[RANK_ROWS]) == (0, 1, 2, 0)
    assert p.stats.matched_count("all_reduce+rms_norm") == 1 and not p.stats.declined
    (rs,) = nodes_of(gm, c10d.reduce_scatter_tensor.default)
    assert rs.args[1:] == ("sum", ws, dist.group.WORLD.group_name)
    (mm,) = nodes_of(gm, aten.mm.default)
    normed_shard = gathered_from(mm.args[0])
    assert normed_shard is not None and tuple(normed_shard.meta["val"].shape) == (m // ws, h)
    out, residual = gm(partial, w, w_col)
    assert out.shape == (m, 16) and residual.shape == (m, h)


def _norm_after_all_reduce(x, w, *, norm, eps):
    return norm(all_reduce(x), w, eps)


def test_eps_and_form_are_read_from_each_spelling(fake_pg):
    for norm, form in [(norm_op, "fusionpasses.rms_norm"), (norm_hf, "decomposed"), (norm_functional, "decomposed")]:
        for eps in (1e-5, 1e-6, 0.25):
            layer = functools.partial(_norm_after_all_reduce, norm=norm, eps=eps)
            gm = post_grad_graph(layer, torch.randn(4, 8), torch.randn(8))
            (wait,) = nodes_of(gm, c10d.wait_tensor.default)
            match = match_norm_after(wait)
            assert match.form == form
            assert match.eps == pytest.approx(eps, rel=1e-6)  # F.rms_norm passes eps as float32


# ---- middle layers: all_reduce -> residual add -> norm ------------------------------------------


@pytest.mark.parametrize("dtype", [BF16, FP16], ids=str)
@pytest.mark.parametrize("add_norm", ADD_NORMS, ids=_ids(ADD_NORMS))
def test_middle_layer_residual_from_graph_input_is_cut_per_rank(fake_pg, add_norm, dtype):
    ws = dist.get_world_size()
    m, h = 4 * ws, 32
    args = (torch.randn(m, h, dtype=dtype), torch.randn(m, h, dtype=dtype), torch.randn(h, dtype=dtype))

    def layer(partial, residual, w):
        normed, new_residual = add_norm(all_reduce(partial), residual, w, 1e-5)
        return normed, new_residual

    gm = post_grad_graph(layer, *args)
    p = run_pass(gm)
    counts = op_counts(gm)
    assert (counts[AR], counts[RS], counts[AG], counts[RANK_ROWS]) == (0, 1, 2, 1)
    assert p.stats.matched_count("all_reduce+add+rms_norm") == 1
    (cut,) = nodes_of(gm, fp.rank_rows.default)
    assert cut.args[1:] == (ws, dist.group.WORLD.group_name)
    assert cut.args[0].op == "placeholder"  # the residual itself, cut before any upcast
    # The new residual is gathered in the dtype the model keeps it in, not in the fp32 of the sum.
    outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert all(gathered_from(o) is not None for o in outputs)
    assert outputs[1].meta["val"].dtype == dtype
    normed, new_residual = gm(*args)
    assert normed.shape == (m, h) and new_residual.shape == (m, h)


def three_layers(add_norm, first_norm):
    def block(partial0, partial1, partial2, w, w_col):
        reduced = all_reduce(partial0)
        h, residual = first_norm(reduced, w, 1e-5), reduced
        outs = []
        for partial in (partial1, partial2):
            h, residual = add_norm(all_reduce(h @ w_col + partial), residual, w, 1e-5)
            outs.append(h)
        return outs[-1] @ w_col, residual

    return block


@pytest.mark.parametrize(
    "add_norm",
    [add_norm_fused_op, add_norm_fp32_sum, add_norm_of(norm_functional)],
    ids=["fused_op", "fp32_sum", "functional"],
)
def test_three_layer_chain_keeps_the_residual_sharded(fake_pg, add_norm):
    ws = dist.get_world_size()
    m, h = 4 * ws, 16
    partials = [torch.randn(m, h, dtype=BF16) for _ in range(3)]
    args = [*partials, torch.randn(h, dtype=BF16), torch.randn(h, h, dtype=BF16)]
    gm = post_grad_graph(three_layers(add_norm, norm_hf), *args)
    assert op_counts(gm)[AR] == 3
    p = run_pass(gm)
    counts = op_counts(gm)
    # One gather per normed output feeding a GEMM, one for the residual the graph returns; the
    # residual never goes back to full size between layers, and nothing needs a rank cut.
    assert (counts[AR], counts[RS], counts[AG], counts[RANK_ROWS]) == (0, 3, 4, 0)
    assert p.stats.matched_count("all_reduce+rms_norm") == 1
    assert p.stats.matched_count("all_reduce+add+rms_norm") == 2
    for mm in nodes_of(gm, aten.mm.default):
        assert gathered_from(mm.args[0]) is not None
    for add in [*nodes_of(gm, aten.add.Tensor), *nodes_of(gm, fp.fused_add_rms_norm.default)]:
        assert all(gathered_from(a) is None for a in add.all_input_nodes)
    out, residual = gm(*args)
    assert out.shape == (m, h) and residual.shape == (m, h)


def test_pass_is_idempotent(fake_pg):
    ws = dist.get_world_size()
    args = [torch.randn(4 * ws, 16) for _ in range(3)] + [torch.randn(16), torch.randn(16, 16)]
    gm = post_grad_graph(three_layers(add_norm_fused_op, norm_op), *args)
    run_pass(gm)
    text = str(gm.graph)
    again = run_pass(gm)
    assert str(gm.graph) == text and again.stats.matched == 0 and not again.stats.declined


# ---- quantized variants -------------------------------------------------------------------------


def quant_op(y, scale):
    return fp.quant_fp8_static(y, scale)


def quant_traced(y, scale):
    return (y.float() / scale).clamp(-448.0, 448.0).to(FP8)


@pytest.mark.parametrize("quant", [quant_op, quant_traced], ids=_ids([quant_op, quant_traced]))
@pytest.mark.parametrize("add_norm", [add_norm_fused_op, add_norm_fp32_sum], ids=["fused_op", "fp32_sum"])
def test_fp8_quant_after_norm_gathers_fp8_as_bytes(fake_pg, add_norm, quant):
    ws = dist.get_world_size()
    m, h, n = 4 * ws, 32, 16
    args = (
        torch.randn(m, h, dtype=BF16),
        torch.randn(m, h, dtype=BF16),
        torch.randn(h, dtype=BF16),
        torch.tensor([0.05]),
        (torch.randn(n, h) * 4).to(FP8),
    )

    def layer(partial, residual, w, scale, w_fp8):
        normed, new_residual = add_norm(all_reduce(partial), residual, w, 1e-6)
        q = quant(normed, scale)
        return torch._scaled_mm(q, w_fp8.t(), scale, scale, out_dtype=BF16), new_residual

    gm = post_grad_graph(layer, *args)
    p = run_pass(gm)
    assert p.stats.matched_count("all_reduce+add+rms_norm+fp8_quant") == 1
    (mm,) = nodes_of(gm, aten._scaled_mm.default)
    # view(uint8) -> all_gather -> wait -> view(fp8): the form gloo can move and AsyncTP recognizes.
    a = mm.args[0]
    assert a.target is aten.view.dtype and a.args[1] == FP8
    gather = a.args[0].args[0]
    assert gather.target is c10d.all_gather_into_tensor.default and gather.args[1:] == (ws, dist.group.WORLD.group_name)
    assert gather.args[0].target is aten.view.dtype and gather.args[0].args[1] == torch.uint8
    q_shard = gather.args[0].args[0]
    assert q_shard.meta["val"].dtype == FP8 and tuple(q_shard.meta["val"].shape) == (m // ws, h)
    assert op_counts(gm)[AG] == 2  # fp8 activations, bf16 residual
    out, new_residual = gm(*args)
    assert out.shape == (m, n) and new_residual.shape == (m, h)


def test_nvfp4_quant_gathers_packed_values_and_block_scales(fake_pg):
    ws = dist.get_world_size()
    m, h = 4 * ws, 64
    args = (torch.randn(m, h, dtype=BF16), torch.randn(h, dtype=BF16), torch.tensor([100.0]))

    def layer(partial, w, global_scale):
        packed, scales = fp.nvfp4_quant(fp.rms_norm(all_reduce(partial), w, 1e-6), global_scale, None, "linear")
        return packed, scales

    gm = post_grad_graph(layer, *args)
    p = run_pass(gm)
    assert p.stats.matched_count("all_reduce+rms_norm+nvfp4_quant") == 1
    assert op_counts(gm)[AG] == 2
    outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    packed_shard, scales_shard = (gathered_from(o) for o in outputs)
    assert packed_shard.target is operator.getitem and packed_shard.meta["val"].dtype == torch.uint8
    assert scales_shard.meta["val"].dtype == FP8 and outputs[1].target is aten.view.dtype
    assert tuple(packed_shard.meta["val"].shape) == (m // ws, h // 2)
    packed, scales = gm(*args)
    assert packed.shape == (m, h // 2) and scales.shape == (m, h // 16)


def test_nvfp4_swizzled_scales_decline(fake_pg):
    ws = dist.get_world_size()
    args = (torch.randn(128 * ws, 64, dtype=BF16), torch.randn(64, dtype=BF16), torch.tensor([100.0]))
    def layer(x, w, global_scale):
        return fp.nvfp4_quant(fp.rms_norm(all_reduce(x), w, 1e-6), global_scale, None, "swizzled")

    gm = post_grad_graph(layer, *args)
    p = run_pass(gm)
    assert op_counts(gm)[AR] == 1 and op_counts(gm)[RS] == 0
    assert "128-row tiles" in only_decline(p).reason


# ---- declines --------------------------------------------------------------------------------


def _norm_layer(m, h, dtype=BF16):
    """all_reduce -> norm on an (m, h) activation, traced on fake tensors (nothing of that size is allocated)."""
    args = (torch.empty(m, h, dtype=dtype, device="meta"), torch.empty(h, dtype=dtype, device="meta"))
    gm, _ = dynamic_graph(lambda x, w: norm_hf(all_reduce(x), w, 1e-5), *args)
    return gm


@pytest.mark.parametrize("capability,per_gpu_mib", [((9, 0), 8), ((10, 0), 32)], ids=["hopper", "blackwell"])
def test_threshold_decides_on_the_token_count(fake_pg, capability, per_gpu_mib):
    ws = dist.get_world_size()
    hidden = 8192
    needed = per_gpu_mib * 2**20 * ws // (hidden * 2)
    config = FusionConfig(sequence_parallel=True, device_capability=capability)
    below = run_pass(_norm_layer(needed - ws, hidden), config)
    assert below.stats.matched == 0
    assert f"{needed - ws} tokens < min_tokens {needed}" in only_decline(below).reason
    at = run_pass(_norm_layer(needed, hidden), config)
    assert at.stats.matched == 1 and not at.stats.declined


def test_small_hidden_declines_on_hopper(fake_pg):
    p = run_pass(_norm_layer(4096, 4096), FusionConfig(sequence_parallel=True, device_capability=(9, 0)))
    assert "hidden size 4096 < 8192" in only_decline(p).reason


def test_no_gpu_declines_without_min_tokens(fake_pg):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: device_capability falls back to it")
    p = run_pass(_norm_layer(64, 32), FusionConfig(sequence_parallel=True))
    assert "no GPU" in only_decline(p).reason


def test_token_count_not_divisible_declines(fake_pg):
    ws = dist.get_world_size()
    gm = _norm_layer(4 * ws + 1, 32)
    p = run_pass(gm)
    assert f"{4 * ws + 1} tokens are not divisible by world size {ws}" in only_decline(p).reason
    assert op_counts(gm)[AR] == 1 and op_counts(gm)[AG] == 0


@pytest.mark.parametrize(
    "after",
    [
        lambda r, w: F.layer_norm(r, (r.shape[-1],), w),
        lambda r, w: r @ torch.ones(r.shape[-1], 8, dtype=r.dtype),
        # A mean over the tokens mixes rows: not an RMSNorm, and wrong on a shard.
        lambda r, w: r * torch.rsqrt(r.pow(2).mean(0, keepdim=True) + 1e-5) * w,
        # A bias added after the all_reduce is not a residual stream.
        lambda r, w: norm_plain(r + w, w, 1e-5),
    ],
    ids=["layer_norm", "gemm", "mean_over_tokens", "bias_add"],
)
def test_unknown_norm_declines(fake_pg, after):
    gm = post_grad_graph(lambda x, w: after(all_reduce(x), w), torch.randn(8, 32), torch.randn(32))
    p = run_pass(gm)
    assert only_decline(p).reason.startswith("unknown norm: the all_reduce result feeds")
    assert op_counts(gm)[AR] == 1 and op_counts(gm)[RS] == 0


def test_three_d_activation_declines(fake_pg):
    gm = post_grad_graph(lambda x, w: norm_plain(all_reduce(x), w, 1e-5), torch.randn(2, 8, 32), torch.randn(32))
    assert "2-D (tokens, hidden)" in only_decline(run_pass(gm)).reason


def test_group_outside_config_group_names_declines(fake_pg):
    p = run_pass(_norm_layer(8, 32), ALWAYS.replace(group_names=("some_other_group",)))
    assert "not in config.group_names" in only_decline(p).reason


def test_batch_invariant_turns_the_pass_off(fake_pg):
    pm = PassManager(FusionConfig(sequence_parallel=True, batch_invariant=True, sp_min_tokens=0))
    sp = pm.pass_by_name("sequence_parallel")
    assert "batch_invariant is on" in sp.disabled_reason()
    assert any("pass off: batch_invariant" in note for note in sp.stats.notes)
    gm = _norm_layer(8, 32)
    pm(gm.graph)
    assert op_counts(gm)[AR] == 1 and sp.stats.runs == []


# ---- dynamic token counts ---------------------------------------------------------------------


def dynamic_graph(fn, *tensors, dynamic_tokens=()):
    """make_fx over fake tensors whose dim 0 is symbolic for the arguments in ``dynamic_tokens``."""
    shape_env = ShapeEnv()
    mode = FakeTensorMode(shape_env=shape_env)
    fakes = []
    for i, t in enumerate(tensors):
        dims = [DimDynamic.DYNAMIC if (d == 0 and i in dynamic_tokens) else DimDynamic.STATIC for d in range(t.dim())]
        fakes.append(mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dims)))
    from torch._inductor.decomposition import select_decomp_table

    with mode:
        gm = make_fx(fn, decomposition_table=select_decomp_table())(*fakes)
    return gm, shape_env


def _dynamic_middle_layer(m):
    args = (torch.randn(m, 32, dtype=BF16), torch.randn(m, 32, dtype=BF16), torch.randn(32, dtype=BF16))
    return dynamic_graph(lambda x, r, w: add_norm_fp32_sum(all_reduce(x), r, w, 1e-5), *args, dynamic_tokens=(0, 1))


def test_dynamic_tokens_guard_divisibility_and_decide_on_the_hint(fake_pg):
    ws = dist.get_world_size()
    gm, shape_env = _dynamic_middle_layer(8 * ws)
    p = run_pass(gm, FusionConfig(sequence_parallel=True, sp_min_tokens=4 * ws))
    assert p.stats.matched == 1
    assert any(f"% {ws} == 0" in note for note in p.stats.notes)
    # The compiled graph is now only valid for multiples of ws: Dynamo checks the guard.
    assert any("Mod" in str(g.expr) for g in shape_env.guards)
    assert_no_raw_symints(gm)
    (cut,) = nodes_of(gm, fp.rank_rows.default)
    rows = cut.meta["val"].shape[0]
    assert isinstance(rows, torch.SymInt) and rows.node.hint == 8


def test_dynamic_tokens_below_the_hint_threshold_decline_without_guards(fake_pg):
    ws = dist.get_world_size()
    gm, shape_env = _dynamic_middle_layer(8 * ws)
    p = run_pass(gm, FusionConfig(sequence_parallel=True, sp_min_tokens=16 * ws))
    reason = only_decline(p).reason
    assert f"size hint {8 * ws} < min_tokens {16 * ws}" in reason and "no token_range" in reason
    assert not any("Mod" in str(g.expr) for g in shape_env.guards)


def test_dynamic_tokens_use_the_declared_range(fake_pg):
    ws = dist.get_world_size()
    config = FusionConfig(sequence_parallel=True, sp_min_tokens=64, token_range=(32, 4096))
    gm, _ = _dynamic_middle_layer(128 * ws)
    assert "token_range (32, 4096) reaches below min_tokens 64" in only_decline(run_pass(gm, config)).reason
    gm, _ = _dynamic_middle_layer(8 * ws)  # the hint is below, the declared range is not
    assert run_pass(gm, config.replace(token_range=(64, 4096))).stats.matched == 1


def test_dynamic_tokens_three_layer_chain_rewrites_every_layer(fake_pg):
    """The residual a layer reads is the previous layer's gathered sum: its fake shape is ws * (M // ws)
    by the collective's shape rule, which must still compare equal to M."""
    ws = dist.get_world_size()
    partials = [torch.randn(8 * ws, 16, dtype=BF16) for _ in range(3)]
    args = (*partials, torch.randn(16, dtype=BF16), torch.randn(16, 16, dtype=BF16))
    gm, _ = dynamic_graph(three_layers(add_norm_of(norm_plain), norm_plain), *args, dynamic_tokens=(0, 1, 2))
    p = run_pass(gm)
    counts = op_counts(gm)
    assert (counts[AR], counts[RS], counts[AG], counts[RANK_ROWS]) == (0, 3, 4, 0), p.stats.declined
    assert_no_raw_symints(gm)


def test_dynamic_tokens_with_an_odd_hint_decline(fake_pg):
    ws = dist.get_world_size()
    gm, shape_env = _dynamic_middle_layer(8 * ws + 1)
    reason = only_decline(run_pass(gm)).reason
    assert f"(size hint {8 * ws + 1}) is not divisible by world size {ws}" in reason


# ---- SP -> AsyncTP --------------------------------------------------------------------------


def test_sp_then_async_tp_fuses_the_new_collectives_with_fp8_gemms(fake_pg):
    """The contract with AsyncTP: every reduce_scatter/all_gather SP emits in an FP8 TP block sits next
    to a GEMM that AsyncTP fuses it with."""
    ws = dist.get_world_size()
    m, h, inter = 4 * ws, 32, 64
    s = torch.tensor([0.05])

    def fp8_weight(n, k):
        return (torch.randn(n, k) * 4).to(FP8)

    args = (torch.randn(m, h, dtype=BF16), torch.randn(h, dtype=BF16), s, fp8_weight(inter, h), fp8_weight(h, inter))

    def block(x, w, s, w_col, w_row):
        residual, h = x, x
        for _ in range(2):
            up = torch._scaled_mm(fp.quant_fp8_static(h, s), w_col.t(), s, s, out_dtype=BF16)
            down = torch._scaled_mm(fp.quant_fp8_static(F.silu(up), s), w_row.t(), s, s, out_dtype=BF16)
            h, residual = fp.fused_add_rms_norm(all_reduce(down), residual, w, 1e-6)
        return h, residual

    gm = post_grad_graph(block, *args)
    sp = run_pass(gm)
    assert sp.stats.matched_count("all_reduce+add+rms_norm+fp8_quant") == 1
    assert sp.stats.matched_count("all_reduce+add+rms_norm") == 1
    async_tp = AsyncTPPass(FusionConfig(async_tp=True, symm_mem="assume", async_tp_gating="always"))
    async_tp(gm.graph)
    gm.recompile()
    counts = op_counts(gm)
    assert counts[RS] == 0 and counts["fusionpasses.gemm_reduce_scatter.default"] == 2
    # The fp8 activation gathered between the layers is fused into the next up-projection; the last
    # layer's outputs are gathered for the graph's outputs and have no GEMM to fuse with.
    assert counts["fusionpasses.all_gather_gemm.default"] == 1 and counts[AG] == 2
