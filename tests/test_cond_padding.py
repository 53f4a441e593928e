"""cond_padding pass: the rewrite on post-grad-shaped graphs, every decline, and one full compile."""

from __future__ import annotations

import operator

import pytest
import torch
import torch._dynamo.testing
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

from fusionpasses import FusionConfig, PassManager
from fusionpasses.kernels import block_fp8_gemm as bf
from fusionpasses.passes.cond_padding import CondPaddingPass
from tests.fx_utils import assert_no_raw_symints, nodes_of, op_counts, post_grad_graph
from tests.test_block_fp8_gemm import branch_checked_calls, exact_activations, exact_operands, spy_on_gemms

aten = torch.ops.aten
PATTERN = "pad->block_fp8_mm->slice"


def mm(A, A_scale_t, B, B_scale):
    return torch.ops.fusionpasses.block_fp8_mm(A, B, A_scale_t, B_scale, torch.bfloat16)


# ---- user programs: the unconditional pad in the forms the pass accepts ---------------------


def pad_mm(A, B, A_scale_t, B_scale):
    M = A.shape[0]
    pad = (-M) % 4
    return mm(F.pad(A, (0, 0, 0, pad)), F.pad(A_scale_t, (0, pad)), B, B_scale)[:M]


def round_up_mm(A, B, A_scale_t, B_scale):
    M = A.shape[0]
    pad = (M + 3) // 4 * 4 - M
    return mm(F.pad(A, (0, 0, 0, pad)), F.pad(A_scale_t, (0, pad)), B, B_scale)[:M]


def cat_zeros_mm(A, B, A_scale_t, B_scale):
    M, K = A.shape
    pad = (-M) % 4
    A_padded = torch.cat([A, A.new_zeros((pad, K))])
    A_scale_t_padded = torch.cat([A_scale_t, A_scale_t.new_zeros((A_scale_t.shape[0], pad))], dim=1)
    return mm(A_padded, A_scale_t_padded, B, B_scale)[:M]


def epilogue_mm(A, B, A_scale_t, B_scale):
    M = A.shape[0]
    pad = (-M) % 4
    y = mm(F.pad(A, (0, 0, 0, pad)), F.pad(A_scale_t, (0, pad)), B, B_scale)
    return (torch.relu(y) * 2)[:M]


def operands(M: int, N: int = 24, K: int = 256, seed: int = 0):
    A, B, A_scale_t, B_scale = exact_operands(M, N, K, seed=seed)
    return A, B, A_scale_t, B_scale


def run_pass(gm: torch.fx.GraphModule) -> CondPaddingPass:
    cond_padding = CondPaddingPass(FusionConfig(cond_padding=True))
    cond_padding(gm.graph)
    gm.recompile()
    return cond_padding


def branches(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    (cond,) = nodes_of(gm, torch.ops.higher_order.cond)
    return getattr(gm, cond.args[1].target), getattr(gm, cond.args[2].target)


# ---- the rewrite -------------------------------------------------------------------------------


@pytest.mark.parametrize("program", [pad_mm, round_up_mm, cat_zeros_mm, epilogue_mm], ids=lambda f: f.__name__)
def test_unconditional_pad_becomes_cond(program):
    # M = 5 traces the pad as a symbolic size; duck sizing keeps it distinct from K, N and K/128.
    gm = post_grad_graph(program, *operands(5), tracing_mode="symbolic")
    cond_padding = run_pass(gm)
    assert cond_padding.stats.matched_count(PATTERN) == 1 and not cond_padding.stats.declined

    outer = op_counts(gm)
    assert outer["higher_order.cond"] == 1
    assert outer["aten.constant_pad_nd.default"] == outer["aten.cat.default"] == 0
    assert outer["fusionpasses.block_fp8_mm.default"] == 0
    (cond,) = nodes_of(gm, torch.ops.higher_order.cond)
    predicate = cond.args[0]
    assert predicate.target is operator.ne and predicate.args[1] == 0
    assert predicate.args[0].target is operator.mod and predicate.args[0].args[1] == 4
    assert predicate.args[0].args[0].target is aten.sym_size.int

    padded, direct = branches(gm)
    padded_ops, direct_ops = op_counts(padded), op_counts(direct)
    assert padded_ops["aten.constant_pad_nd.default"] + padded_ops["aten.cat.default"] == 2
    assert padded_ops["fusionpasses.block_fp8_mm.default"] == direct_ops["fusionpasses.block_fp8_mm.default"] == 1
    assert not {"aten.constant_pad_nd.default", "aten.cat.default", "aten.full.default"} & set(direct_ops)
    (direct_mm,) = nodes_of(direct, torch.ops.fusionpasses.block_fp8_mm.default)
    assert all(arg.op == "placeholder" for arg in direct_mm.args[:4])
    for graph_module in (gm, padded, direct):
        assert_no_raw_symints(graph_module)

    for M in (1, 4, 7, 8):
        args = operands(M, seed=M)
        assert torch.equal(gm(*args), program(*args)), f"M={M}"


def test_rewritten_graph_matches_the_reference():
    gm = post_grad_graph(pad_mm, *operands(5), tracing_mode="symbolic")
    run_pass(gm)
    for M in (2, 12):
        A, B, A_scale_t, B_scale = operands(M, seed=M)
        expected = bf.reference_block_fp8_mm(A, B, A_scale_t, B_scale, torch.bfloat16)
        assert torch.equal(gm(A, B, A_scale_t, B_scale), expected)


def test_pass_is_idempotent():
    gm = post_grad_graph(pad_mm, *operands(5), tracing_mode="symbolic")
    cond_padding = run_pass(gm)
    text = str(gm.graph)
    cond_padding(gm.graph)
    assert str(gm.graph) == text
    assert cond_padding.stats.matched_count(PATTERN) == 1


def test_plain_calls_are_no_candidates():
    gm = post_grad_graph(lambda A, B, s, t: mm(A, s, B, t), *operands(8), tracing_mode="symbolic")
    cond_padding = run_pass(gm)
    assert not cond_padding.stats.patterns
    assert op_counts(gm)["higher_order.cond"] == 0


# ---- declines ------------------------------------------------------------------------------------


def pad_k_too(A, B, A_scale_t, B_scale):
    M = A.shape[0]
    pad = (-M) % 4
    # K padded by one group as well: the direct branch would still need it.
    return mm(F.pad(A, (0, 128, 0, pad)), F.pad(A_scale_t, (0, pad, 0, 1)), B, B_scale)[:M]


def k_padded_operands():
    """Activations with K = 256 for a weight whose K was padded to 384."""
    A, _, A_scale_t, _ = operands(5, K=256)
    _, B, _, B_scale = operands(5, K=384)
    return A, B, A_scale_t, B_scale


def pad_to_eight(A, B, A_scale_t, B_scale):
    M = A.shape[0]
    pad = (-M) % 8
    return mm(F.pad(A, (0, 0, 0, pad)), F.pad(A_scale_t, (0, pad)), B, B_scale)[:M]


def pad_only_activations(A, B, A_scale_t_padded, B_scale):
    M = A.shape[0]
    return mm(F.pad(A, (0, 0, 0, (-M) % 4)), A_scale_t_padded, B, B_scale)[:M]


def prepadded_scale_operands():
    """Scales a quantizer already wrote with M padded to 8 columns, for 5 rows of activations."""
    A, B, _, B_scale = operands(5)
    return A, B, operands(8)[2], B_scale


def padded_result_escapes(A, B, A_scale_t, B_scale):
    M = A.shape[0]
    pad = (-M) % 4
    y = mm(F.pad(A, (0, 0, 0, pad)), F.pad(A_scale_t, (0, pad)), B, B_scale)
    return y[:M], y.sum()


def all_reduce_before_slice(A, B, A_scale_t, B_scale):
    M = A.shape[0]
    pad = (-M) % 4
    y = mm(F.pad(A, (0, 0, 0, pad)), F.pad(A_scale_t, (0, pad)), B, B_scale)
    return funcol.all_reduce(y, "sum", torch.distributed.group.WORLD)[:M]


def _decline_reasons(program, args, tracing_mode="symbolic") -> list[str]:
    gm = post_grad_graph(program, *args, tracing_mode=tracing_mode)
    before = str(gm.graph)
    cond_padding = run_pass(gm)
    assert str(gm.graph) == before, "a declined candidate must be left exactly as it was"
    assert cond_padding.stats.matched_count(PATTERN) == 0
    return [d.reason for d in cond_padding.stats.declined]


@pytest.mark.parametrize(
    "program,args,reason",
    [
        pytest.param(
            pad_k_too,
            k_padded_operands(),
            "pad not on the aligned dim: A is padded on dims [0, 1], the aligned dim is 0",
            id="pad-not-on-aligned-dim",
        ),
        pytest.param(pad_to_eight, operands(5), "is not the round-up of the symbolic size", id="amount-not-round-up"),
        pytest.param(pad_only_activations, prepadded_scale_operands(), "A_scale_t is not padded", id="scales-not-padded"),
        pytest.param(padded_result_escapes, operands(5), "the padded result escapes", id="padded-result-escapes"),
    ],
)
def test_declines_with_reason(program, args, reason):
    (declined,) = _decline_reasons(program, args)
    assert reason in declined


def test_declines_static_m():
    (declined,) = _decline_reasons(pad_mm, operands(5), tracing_mode="fake")
    assert "M is static (5)" in declined


def test_declines_a_collective_in_the_branch(fake_pg2):
    (declined,) = _decline_reasons(all_reduce_before_slice, operands(5))
    assert "branch would contain a collective (_c10d_functional.all_reduce.default)" in declined


# ---- one full compile: Inductor runs the pass, one graph serves every M --------------------------


def pad_mm_unbacked(A, B, A_scale_t, B_scale):
    # Two unbacked sizes are unrelated symbols to the compiler; a model that quantizes in the graph
    # gets one symbol for both. Here the user states it.
    torch._check(A_scale_t.shape[1] == A.shape[0])
    return pad_mm(A, B, A_scale_t, B_scale)


def test_compiled_rewrite_serves_every_m_from_one_graph():
    manager = PassManager(FusionConfig(cond_padding=True))
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    B, B_scale = operands(4, N=40, K=128)[1::2]
    patch, calls, caller_ptr = spy_on_gemms()
    # No FX graph cache: a cache hit would skip the pass, whose stats the test reads.
    with torch._inductor.config.patch(post_grad_custom_post_pass=manager, fx_graph_cache=False), patch:
        compiled = torch.compile(pad_mm_unbacked, backend=counter, fullgraph=True)
        for M, A, A_scale_t, out in branch_checked_calls(compiled, B, B_scale, exact_activations, calls, caller_ptr):
            assert torch.equal(out, pad_mm(A, B, A_scale_t, B_scale)), f"M={M}"
            assert torch.equal(out, bf.reference_block_fp8_mm(A, B, A_scale_t, B_scale, torch.bfloat16)), f"M={M}"
    assert counter.frame_count == 1
    assert manager.pass_by_name("cond_padding").stats.matched_count(PATTERN) == 1


def test_compiled_rewrite_installs_no_alignment_guard():
    """Backed dynamic sizes (``dynamic=True``): a guard on M % 4 anywhere in the rewritten graph would
    recompile at the first M of the other alignment."""
    manager = PassManager(FusionConfig(cond_padding=True))
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    # K = 256: two K groups, so A_scale_t's row stride M is a significant stride.
    B, B_scale = operands(4, N=40, K=256)[1::2]
    with torch._inductor.config.patch(post_grad_custom_post_pass=manager, fx_graph_cache=False):
        compiled = torch.compile(pad_mm, backend=counter, dynamic=True, fullgraph=True)
        for M in (8, 7, 13, 12):
            A, _, A_scale_t, _ = exact_operands(M, 40, 256, seed=M)
            out = compiled(A, B, A_scale_t, B_scale)
            assert torch.equal(out, bf.reference_block_fp8_mm(A, B, A_scale_t, B_scale, torch.bfloat16)), f"M={M}"
    assert counter.frame_count == 1
    assert manager.pass_by_name("cond_padding").stats.matched_count(PATTERN) == 1
