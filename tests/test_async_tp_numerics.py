"""AsyncTP numerics: 2 gloo processes, torch.compile with the pass vs eager, every pattern, every rank.

On CPU the fused ops run their reference implementation (the same collective and the same GEMM as
the unfused graph), so every rank's result must be bitwise equal to eager. This is what catches a
fused reduce-scatter that averages instead of summing, or rows that come back in the wrong order.
"""

from __future__ import annotations

import pytest
import torch

import fusionpasses
from fusionpasses import FusionConfig
from tests.distributed_utils import run_gloo

BF16 = torch.bfloat16


def _cases(rank: int, ws: int):
    from tests.test_async_tp import all_gather, all_gather_fp8, bmm_fp8, reduce_scatter

    g = torch.Generator().manual_seed(1234)  # weights: the same on every rank
    mine = torch.Generator().manual_seed(100 + rank)  # activations: this rank's shard

    def w(*shape, dtype=BF16):
        return (torch.randn(*shape, generator=g) / shape[0] ** 0.5).to(dtype)

    def x(*shape):
        return torch.randn(*shape, generator=mine).to(BF16)

    def fp8(*shape):
        return (torch.randn(*shape, generator=mine) * 4).to(torch.float8_e4m3fn)

    def w8(n, k):
        return (torch.randn(n, k, generator=g) * 4).to(torch.float8_e4m3fn).t()

    def mlp(x, w1, w2):
        return reduce_scatter(torch.relu(all_gather(x) @ w1) @ w2)

    def mlp_seq(x, w1, w2):
        b, s, h = x.shape
        hidden = torch.relu(all_gather(x, dim=1).reshape(-1, h) @ w1)
        return reduce_scatter((hidden @ w2).reshape(b, s * ws, -1), dim=1)

    def scaled(a, wa, s, b, wb, sb_rows, sb_cols):
        up = torch._scaled_mm(all_gather_fp8(a), wa, s, s, out_dtype=BF16)
        return up, reduce_scatter(torch._scaled_mm(b, wb, sb_rows, sb_cols, out_dtype=BF16))

    def flashinfer(a, wa, s, b, wb):
        return bmm_fp8(all_gather_fp8(a), wa, s, s), reduce_scatter(bmm_fp8(b, wb, s, s), op="avg")

    def residual(x, w1):
        # Another reader of the gathered tensor (an add would become addmm, which is not fused).
        gathered = all_gather(x)
        return gathered @ w1, gathered * 2

    one = torch.tensor([0.25])
    return {
        "mlp": (mlp, (x(16, 64), w(64, 128), w(128, 64)), {"all_gather+mm": 1, "mm+reduce_scatter": 1}),
        "mlp_seq_b2": (mlp_seq, (x(2, 8, 64), w(64, 96), w(96, 64)), {"all_gather+mm": 1, "mm+reduce_scatter": 1}),
        "scaled_mm": (
            scaled,
            (fp8(16, 64), w8(32, 64), one, fp8(16 * ws, 64), w8(48, 64),
             torch.rand(16 * ws, 1, generator=g) + 0.5, torch.rand(1, 48, generator=g) + 0.5),
            {"all_gather+scaled_mm(tensor-wise)": 1, "scaled_mm(row-wise)+reduce_scatter": 1},
        ),
        "bmm_fp8_avg": (
            flashinfer,
            (fp8(16, 64), w8(32, 64), one, fp8(16 * ws, 64), w8(48, 64)),
            {"all_gather+bmm_fp8": 1, "bmm_fp8+reduce_scatter": 1},
        ),
        "residual": (residual, (x(8, 32), w(32, 32)), {"all_gather+mm": 1}),
    }


def _compiled_equals_eager(rank: int, world_size: int, names: tuple[str, ...]) -> None:
    cases = _cases(rank, world_size)
    for name in names:
        fn, args, expected = cases[name]
        pm = fusionpasses.PassManager(FusionConfig(async_tp=True, symm_mem="assume", async_tp_gating="always"))
        torch._dynamo.reset()
        with torch._inductor.config.patch(fx_graph_cache=False):
            compiled = torch.compile(fn, options={"post_grad_custom_post_pass": pm}, fullgraph=True, dynamic=False)
            got = compiled(*args)
        want = fn(*args)
        stats = pm.pass_by_name("async_tp").stats
        matched = {p: s.matched for p, s in stats.patterns.items() if s.matched}
        assert matched == expected, f"{name}: matched {matched}, declined {stats.declined}"
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m: f"rank {rank}, {name}: {m}")
        for t in want if isinstance(want, tuple) else (want,):
            # A vacuous comparison (all zeros, NaN) would pass the equality above.
            assert torch.isfinite(t.float()).all() and t.float().abs().sum() > 0, f"{name}: degenerate result"


@pytest.mark.gloo
@pytest.mark.parametrize("names", [("mlp", "mlp_seq_b2", "residual"), ("scaled_mm", "bmm_fp8_avg")], ids=["bf16", "fp8"])
def test_compiled_with_async_tp_equals_eager_on_every_rank(names):
    run_gloo(_compiled_equals_eager, names, world_size=2)


@pytest.mark.gloo
def test_tp4_compiled_mlp_equals_eager_on_every_rank():
    run_gloo(_compiled_equals_eager, ("mlp", "mlp_seq_b2"), world_size=4)
