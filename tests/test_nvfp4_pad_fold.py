"""NVFP4PadFoldPass: pad(nvfp4_quant(x)) along K folds into nvfp4_quant(x, padded_n); unsafe pads are declined."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from fusionpasses import FusionConfig, PassManager
from fusionpasses.passes.nvfp4_pad_fold import PATTERN, NVFP4PadFoldPass
from tests.fx_utils import post_grad_graph as trace

quant = torch.ops.fusionpasses.nvfp4_quant
QUANT = quant.default
PAD = torch.ops.aten.constant_pad_nd.default
CONFIG = FusionConfig(nvfp4_pad_fold=True)


def run_pass(gm: fx.GraphModule) -> NVFP4PadFoldPass:
    fold = NVFP4PadFoldPass(CONFIG)
    fold(gm.graph)
    gm.recompile()
    return fold


def count(gm: fx.GraphModule, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.target == target)


def quant_args(gm: fx.GraphModule) -> list[tuple]:
    return [n.args[2:] for n in gm.graph.nodes if n.target == QUANT]


def assert_same_outputs(expected, actual) -> None:
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual):
        assert e.shape == a.shape and e.dtype == a.dtype
        assert torch.equal(e.view(torch.uint8), a.view(torch.uint8))


def inputs(m: int = 5, n: int = 48, dtype=torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(m, n).to(dtype)
    return x, (448.0 * 6.0 / x.float().abs().amax()).reshape(1)


def scales_pad(scales: torch.Tensor, blocks: int) -> torch.Tensor:
    # F.pad works on the scales' bytes: constant_pad_nd has no float8 kernel everywhere.
    return F.pad(scales.view(torch.uint8), (0, blocks)).view(torch.float8_e4m3fn)


def fold_and_check(fn: Callable, *args: torch.Tensor, folds: int = 1) -> fx.GraphModule:
    gm = trace(fn, *args)
    fold = run_pass(gm)
    assert fold.stats.pattern(PATTERN).matched == folds, fold.stats.declined
    assert not fold.stats.declined
    assert count(gm, PAD) == 0 and count(gm, QUANT) == 1
    assert_same_outputs(fn(*args), gm(*args))
    return gm


# ---------------------------------------------------------------------------------------------
# folds
# ---------------------------------------------------------------------------------------------


def test_values_and_linear_scales_padded_together_fold():
    def fn(x, gs):
        packed, scales = quant(x, gs)
        return F.pad(packed, (0, 8)), scales_pad(scales, 1)

    gm = fold_and_check(fn, *inputs(5, 48))
    assert quant_args(gm) == [(64, "linear")]


@pytest.mark.parametrize("m,n", [(128, 48), (150, 80), (64, 7152)])
def test_swizzled_values_pad_to_a_multiple_of_32_folds_and_keeps_the_scales(m, n):
    padded_n = (n + 31) // 32 * 32

    def fn(x, gs):
        packed, scales = quant(x, gs, None, "swizzled")
        return F.pad(packed, (0, (padded_n - n) // 2)), scales

    gm = fold_and_check(fn, *inputs(m, n))
    assert quant_args(gm) == [(padded_n, "swizzled")]


def test_pad_of_pad_and_of_an_already_padded_quant_fold_into_one_op():
    def fn(x, gs):
        packed, scales = quant(x, gs, 64, "linear")
        packed = F.pad(F.pad(packed, (0, 8)), (0, 16))
        return packed, scales_pad(scales_pad(scales, 1), 2)

    gm = fold_and_check(fn, *inputs(3, 48), folds=2)
    assert quant_args(gm) == [(112, "linear")]


def test_pad_through_a_byte_dtype_view_folds():
    def fn(x, gs):
        packed, scales = quant(x, gs, None, "swizzled")
        return F.pad(packed.view(torch.int8), (0, 8)), scales

    gm = fold_and_check(fn, *inputs(4, 48, torch.float16))
    assert count(gm, torch.ops.aten.view.dtype) == 1


def test_unused_scales_do_not_block_the_fold():
    def fn(x, gs):
        return F.pad(quant(x, gs)[0], (0, 8))

    fold_and_check(fn, *inputs(2, 16))


def test_pass_is_idempotent():
    def fn(x, gs):
        packed, scales = quant(x, gs)
        return F.pad(packed, (0, 8)), scales_pad(scales, 1)

    gm = trace(fn, *inputs())
    run_pass(gm)
    before = str(gm.graph)
    again = run_pass(gm)
    assert str(gm.graph) == before
    assert again.stats.pattern(PATTERN).matched == 0 and not again.stats.declined


# ---------------------------------------------------------------------------------------------
# declines: the graph is left as it was, with the reason recorded
# ---------------------------------------------------------------------------------------------


def swizzled_values_padded(*pad_args, **pad_kwargs) -> Callable:
    def fn(x, gs):
        packed, scales = quant(x, gs, None, "swizzled")
        return F.pad(packed, *pad_args, **pad_kwargs), scales

    return fn


def with_outputs(layout: str, outputs: Callable) -> Callable:
    def fn(x, gs):
        return outputs(*quant(x, gs, None, layout))

    return fn


DECLINED = {
    "rows padded": (swizzled_values_padded((0, 8, 0, 1)), "other than the last"),
    "pad before K": (swizzled_values_padded((8, 0)), "before the first column"),
    "non-zero value": (swizzled_values_padded((0, 8), value=3.0), "pad value is 3.0"),
    # -0.0 in the bytes of float8 scales would be 0x80, not 0: declined like any non-zero value.
    "negative zero value": (swizzled_values_padded((0, 8), value=-0.0), "pad value is -0.0"),
    "K not whole blocks": (swizzled_values_padded((0, 4)), "not a multiple of 16"),
    "values have other users": (
        with_outputs("swizzled", lambda p, s: (F.pad(p, (0, 8)), p.sum(dtype=torch.int32), s)),
        "other users",
    ),
    "linear scales left unpadded": (
        with_outputs("linear", lambda p, s: (F.pad(p, (0, 8)), s)),
        "must be padded by 1 blocks",
    ),
    "linear scales padded by the wrong amount": (
        with_outputs("linear", lambda p, s: (F.pad(p, (0, 8)), scales_pad(s, 2))),
        "but the scales by 2 blocks",
    ),
    "swizzled scales padded as 2-D": (
        with_outputs("swizzled", lambda p, s: (F.pad(p, (0, 8)), scales_pad(s, 4))),
        "128x4-tile layout",
    ),
    "swizzled scales would grow": (
        with_outputs("swizzled", lambda p, s: (F.pad(p, (0, 40)), s)),
        "needs 8 swizzled scale columns",
    ),
    "only the scales padded": (
        with_outputs("linear", lambda p, s: (p, scales_pad(s, 1))),
        "only the scales are padded",
    ),
}


@pytest.mark.parametrize("case", list(DECLINED))
def test_unsafe_pads_are_declined_with_a_reason(case):
    fn, reason = DECLINED[case]
    args = inputs(5, 48)
    gm = trace(fn, *args)
    before = str(gm.graph)
    fold = run_pass(gm)
    assert fold.stats.pattern(PATTERN).matched == 0
    reasons = [d.reason for d in fold.stats.declined]
    assert any(reason in r for r in reasons), reasons
    assert str(gm.graph) == before


# ---------------------------------------------------------------------------------------------
# end to end through torch.compile and the pass manager
# ---------------------------------------------------------------------------------------------


def test_torch_compile_folds_and_matches_eager():
    def fn(x, gs):
        packed, scales = quant(x, gs)
        return F.pad(packed, (0, 8)), scales_pad(scales, 1)

    manager = PassManager(CONFIG)
    # No FX graph cache: a cache hit would skip the passes whose stats this test reads.
    options = {"post_grad_custom_post_pass": manager, "fx_graph_cache": False}
    compiled = torch.compile(fn, options=options, fullgraph=True)
    x, gs = inputs(6, 48)
    assert_same_outputs(fn(x, gs), compiled(x, gs))
    assert manager.pass_by_name("nvfp4_pad_fold").stats.pattern(PATTERN).matched == 1
