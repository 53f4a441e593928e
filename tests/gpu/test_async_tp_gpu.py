"""AsyncTP on 2 or more GPUs: `torchrun --nproc-per-node 2 -m pytest tests/gpu/test_async_tp_gpu.py` (or 4).

The fused ops run their SymmetricMemory pipelines over NVLink; every pattern is compared with the
unfused graph (NCCL collective + the same GEMM), eager and compiled, static and dynamic M.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.distributed as dist

import fusionpasses
from fusionpasses import FusionConfig
from fusionpasses.symm_mem import unavailable_reason

pytestmark = pytest.mark.multi_gpu(2, exact=False)

BF16 = torch.bfloat16
FP8 = torch.float8_e4m3fn
HAS_FLASHINFER = importlib.util.find_spec("flashinfer") is not None
needs_flashinfer = pytest.mark.skipif(not HAS_FLASHINFER, reason="FlashInfer is not installed")
FUSE = FusionConfig(async_tp=True, async_tp_gating="always")


def _reduce_atol() -> float:
    # NCCL's bf16 reduce_scatter rounds each of its ws - 1 additions; the fused op sums the ws partials in
    # fp32 and rounds once. From four ranks on, the two differ by up to ~1.5 ulps where partials cancel.
    return 2e-2 * (dist.get_world_size() - 1)


def _rank_gen(nccl_group, shared: bool) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(7 if shared else 100 + dist.get_rank())


def _inputs(kind: str, m_local: int, k: int, n: int, nccl_group, scatter: bool):
    g_w = _rank_gen(nccl_group, shared=True)
    g_x = _rank_gen(nccl_group, shared=False)
    ws = dist.get_world_size()
    rows = m_local * ws if scatter else m_local
    if kind == "mm":
        return dict(A=torch.randn(rows, k, device="cuda", dtype=BF16, generator=g_x),
                    B=torch.randn(k, n, device="cuda", dtype=BF16, generator=g_w) / k**0.5,
                    A_scale=None, B_scale=None, out_dtype=None)
    a = (torch.randn(rows, k, device="cuda", generator=g_x) * 2).to(FP8)
    b = (torch.randn(n, k, device="cuda", generator=g_w) * 2).to(FP8).t()
    if kind == "scaled_mm_rowwise":
        full_rows = m_local * ws
        sa = torch.rand(full_rows, 1, device="cuda", generator=g_w) / k + 1e-3
        sb = torch.rand(1, n, device="cuda", generator=g_w) + 0.5
    else:
        sa = torch.tensor([0.5 / k**0.5], device="cuda")
        sb = torch.tensor([0.25], device="cuda")
    return dict(A=a, B=b, A_scale=sa, B_scale=sb, out_dtype=BF16)


GEMMS = [
    pytest.param("mm", "mm", id="bf16-mm"),
    pytest.param("scaled_mm", "scaled_mm", id="scaled_mm-tensorwise"),
    pytest.param("scaled_mm_rowwise", "scaled_mm", id="scaled_mm-rowwise"),
    pytest.param("bmm_fp8", "bmm_fp8", id="bmm_fp8", marks=needs_flashinfer),
]


def test_symmetric_memory_is_usable(nccl_group):
    assert unavailable_reason(nccl_group.group_name, FusionConfig()) is None


@pytest.mark.parametrize("case,gemm", GEMMS)
@pytest.mark.parametrize("m_local", [1, 256, 1000])
def test_fused_ops_match_unfused(nccl_group, case, gemm, m_local):
    from fusionpasses.kernels.all_gather_gemm import reference_all_gather_gemm
    from fusionpasses.kernels.gemm_reduce_scatter import reference_gemm_reduce_scatter

    ws, group = dist.get_world_size(), nccl_group.group_name
    k, n = 512, 384
    x = _inputs(case, m_local, k, n, nccl_group, scatter=False)
    args = (x["A"], x["B"], x["A_scale"], x["B_scale"], gemm, x["out_dtype"], ws, group)
    # Every collective runs on every rank before the first assertion: a rank that failed early would
    # leave its peers waiting in the next collective.
    gathered, out = torch.ops.fusionpasses.all_gather_gemm(*args)
    ref_gathered, ref_out = reference_all_gather_gemm(*args)
    # Without the gathered copy the chunks are multiplied in the SymmetricMemory slots: same bits.
    nothing, out_in_place = torch.ops.fusionpasses.all_gather_gemm(*args, False, False)
    y = _inputs(case, m_local, k, n, nccl_group, scatter=True)
    scattered = []
    for reduce_op in ("sum", "avg"):
        y_args = (y["A"], y["B"], y["A_scale"], y["B_scale"], gemm, y["out_dtype"], reduce_op, ws, group)
        scattered.append((torch.ops.fusionpasses.gemm_reduce_scatter(*y_args), reference_gemm_reduce_scatter(*y_args)))

    assert torch.equal(gathered.view(torch.uint8), ref_gathered.view(torch.uint8))
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=2e-2, atol=2e-2)
    assert torch.isfinite(out.float()).all()
    assert nothing.shape == (0, k) and torch.equal(out_in_place, out)
    for got, want in scattered:
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=_reduce_atol())
        assert got.float().abs().mean() > 0


def _mlp(kind: str, k: int, hidden: int, group):
    """Column-parallel up (after all_gather), row-parallel down (before reduce_scatter)."""
    import torch.distributed._functional_collectives as funcol

    ws = dist.get_world_size()
    g = torch.Generator(device="cuda").manual_seed(11)
    w_up = torch.randn(hidden // ws, k, device="cuda", generator=g) / k**0.5
    w_down = torch.randn(k, hidden // ws, device="cuda", generator=g) / hidden**0.5
    if kind == "mm":
        up, down = w_up.to(BF16).t(), w_down.to(BF16).t()

        def f(x):
            h = funcol.all_gather_tensor(x, 0, group) @ up
            return funcol.reduce_scatter_tensor(torch.relu(h) @ down, "sum", 0, group)

        return f
    s_x = torch.tensor([0.05], device="cuda")
    s_w = torch.tensor([0.01], device="cuda")
    up8 = (w_up / s_w).to(FP8).t()
    down8 = (w_down / s_w).to(FP8).t()

    def quant(t):
        return (t.float() / s_x).clamp(-448, 448).to(FP8)

    def gemm(a, w):
        if kind == "bmm_fp8":
            return torch.ops.fusionpasses.bmm_fp8(a.unsqueeze(0), w.unsqueeze(0), s_x, s_w, BF16, "cublas").squeeze(0)
        return torch._scaled_mm(a, w, s_x, s_w, out_dtype=BF16)

    def f(x):
        gathered = funcol.all_gather_tensor(quant(x).view(torch.uint8), 0, group).view(FP8)
        h = torch.relu(gemm(gathered, up8))
        return funcol.reduce_scatter_tensor(gemm(quant(h), down8), "sum", 0, group)

    return f


@pytest.mark.parametrize("kind", ["mm", "scaled_mm", pytest.param("bmm_fp8", marks=needs_flashinfer)])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compiled_mlp_fuses_both_ends_and_matches_eager(nccl_group, kind, dynamic):
    k, hidden = 1024, 2048
    f = _mlp(kind, k, hidden, nccl_group)
    pm = fusionpasses.PassManager(FUSE)
    torch._dynamo.reset()
    # No FX graph cache: a cache hit (a second run on one machine) skips the passes, and so their stats.
    options = {"post_grad_custom_post_pass": pm, "fx_graph_cache": False}
    compiled = torch.compile(f, options=options, fullgraph=True, dynamic=dynamic)
    g = torch.Generator(device="cuda").manual_seed(100 + dist.get_rank())
    for m_local in (64, 200, 512) if dynamic else (256,):
        x = torch.randn(m_local, k, device="cuda", dtype=BF16, generator=g)
        got, want = compiled(x), f(x)
        assert got.shape == want.shape == (m_local, k)
        torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2)
        assert torch.isfinite(got.float()).all()
    stats = pm.pass_by_name("async_tp").stats
    assert stats.matched == 2, stats.declined
    label = {"mm": "mm", "scaled_mm": "scaled_mm(tensor-wise)", "bmm_fp8": "bmm_fp8"}[kind]
    assert stats.matched_count(f"all_gather+{label}") == 1 and stats.matched_count(f"{label}+reduce_scatter") == 1


@pytest.mark.parametrize("kind", ["scaled_mm", pytest.param("bmm_fp8", marks=needs_flashinfer)])
def test_compiled_mlp_replays_as_cuda_graph(nccl_group, kind):
    """Inductor's CUDA graph trees capture the fused ops: warm-up, capture and replays match eager.
    The shard is larger than any earlier test's, so the warm-up grows the SymmetricMemory workspace
    (which once put its rendezvous tables into the graph pool and failed the warm-up check)."""
    k, hidden = 1024, 4096
    f = _mlp(kind, k, hidden, nccl_group)
    pm = fusionpasses.PassManager(FUSE)
    torch._dynamo.reset()
    options = {"post_grad_custom_post_pass": pm, "triton.cudagraphs": True, "fx_graph_cache": False}
    compiled = torch.compile(f, options=options, fullgraph=True, dynamic=False)
    g = torch.Generator(device="cuda").manual_seed(300 + dist.get_rank())
    xs = [torch.randn(4096, k, device="cuda", dtype=BF16, generator=g) for _ in range(4)]
    for x in xs:
        got = compiled(x).clone()
        torch.testing.assert_close(got.float(), f(x).float(), rtol=3e-2, atol=3e-2)
    assert pm.pass_by_name("async_tp").stats.matched == 2


def test_cuda_graphs_captured_before_a_workspace_growth_still_replay(nccl_group):
    """A graph captured at a small shape keeps its workspace addresses after a larger shape grew the
    workspace: the replaced workspace must stay alive, and replays must still match eager."""
    from fusionpasses.kernels import _symm_mem_pipeline as pipeline

    k, hidden = 1024, 4096
    f = _mlp("scaled_mm", k, hidden, nccl_group)
    torch._dynamo.reset()
    options = {"post_grad_custom_post_pass": fusionpasses.PassManager(FUSE), "triton.cudagraphs": True, "fx_graph_cache": False}
    compiled = torch.compile(f, options=options, fullgraph=True, dynamic=False)
    g = torch.Generator(device="cuda").manual_seed(400 + dist.get_rank())
    small, large = 1024, 16384
    sizes_seen = []
    for m_local in [small] * 3 + [large] * 3 + [small] * 3:
        x = torch.randn(m_local, k, device="cuda", dtype=BF16, generator=g)
        got = compiled(x).clone()
        torch.testing.assert_close(got.float(), f(x).float(), rtol=3e-2, atol=3e-2)
        sizes_seen.append(pipeline._workspace_bytes[nccl_group.group_name])
    assert sizes_seen[-1] > sizes_seen[2], "the large shape should have grown the workspace"
    assert pipeline._replaced_workspaces, "the workspace the small graph captured must be kept"


def test_sequence_dim_gather_and_scatter_match_eager(nccl_group):
    # The split/cat form DTensor's Shard(1) redistribution produces (funcol.all_gather_tensor with
    # gather_dim=1 graph-breaks under Dynamo on torch 2.11, so the collectives are spelled out).
    c10d = torch.ops._c10d_functional
    ws, group = dist.get_world_size(), nccl_group.group_name
    g = torch.Generator(device="cuda").manual_seed(5)
    w1 = torch.randn(256, 512, device="cuda", dtype=BF16, generator=g) / 16
    w2 = torch.randn(512, 256, device="cuda", dtype=BF16, generator=g) / 23

    def f(x):  # x: (B, S/ws, H)
        b, s, h = x.shape
        gathered = c10d.wait_tensor(c10d.all_gather_into_tensor(x, ws, group))
        full = torch.cat(torch.split(gathered, b, dim=0), dim=1)
        y = (torch.relu(full.reshape(-1, h) @ w1) @ w2).reshape(b, s * ws, h)
        stacked = torch.cat(torch.split(y, s, dim=1), dim=0)
        return c10d.wait_tensor(c10d.reduce_scatter_tensor(stacked, "sum", ws, group))

    pm = fusionpasses.PassManager(FUSE)
    torch._dynamo.reset()
    x = torch.randn(2, 128, 256, device="cuda", dtype=BF16, generator=torch.Generator(device="cuda").manual_seed(dist.get_rank()))
    got = torch.compile(f, options={"post_grad_custom_post_pass": pm, "fx_graph_cache": False}, fullgraph=True)(x)
    want = f(x)
    assert got.shape == want.shape == (2, 128, 256)  # each rank keeps S / ws = 128 of the 256 tokens
    torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2)
    assert pm.pass_by_name("async_tp").stats.matched == 2


@pytest.mark.parametrize("schedule", ["one_compute_stream", "two_streams", "sum_in_gemm"])
@pytest.mark.parametrize("case,gemm", GEMMS)
def test_pipeline_schedules_back_to_back(nccl_group, schedule, case, gemm, monkeypatch):
    """Every schedule, several fused calls queued without a host sync: each call refills the
    SymmetricMemory workspace that peers of the previous call may still be reading. The large shape
    makes cuBLASLt use its workspace, which GEMMs on two streams must not share. "sum_in_gemm" adds
    the peer's partial in this rank's GEMM at two ranks (bf16 mm, tensor-wise _scaled_mm) and falls
    back to one stream elsewhere (test_fused_ops_match_unfused's single row per rank falls back too).
    Its row minimum is lifted here so that every shape takes it."""
    from fusionpasses.kernels import _symm_mem_pipeline, gemm_kinds
    from fusionpasses.kernels._symm_mem_pipeline import force_schedule
    from fusionpasses.kernels.all_gather_gemm import reference_all_gather_gemm
    from fusionpasses.kernels.gemm_reduce_scatter import reference_gemm_reduce_scatter

    ws, group = dist.get_world_size(), nccl_group.group_name
    monkeypatch.setattr(_symm_mem_pipeline, "MIN_ROWS_ADDED_IN_THE_GEMM", 1)
    _symm_mem_pipeline.schedules_run.clear()
    calls = []
    with force_schedule(schedule):
        for m_local, k, n in ((256, 512, 384), (96, 256, 640), (2048, 8192, 7168), (512, 512, 128)):
            x = _inputs(case, m_local, k, n, nccl_group, scatter=False)
            y = _inputs(case, m_local, k, n, nccl_group, scatter=True)
            x_args = (x["A"], x["B"], x["A_scale"], x["B_scale"], gemm, x["out_dtype"], ws, group)
            y_args = (y["A"], y["B"], y["A_scale"], y["B_scale"], gemm, y["out_dtype"], "sum", ws, group)
            ag = torch.ops.fusionpasses.all_gather_gemm(*x_args)
            rs = torch.ops.fusionpasses.gemm_reduce_scatter(*y_args)
            calls.append((x_args, ag, y_args, rs))
    ran = schedule
    if schedule == "sum_in_gemm" and not (ws == 2 and case in ("mm", "scaled_mm")):
        ran = "one_compute_stream"
    elif schedule == "two_streams" and gemm == "bmm_fp8" and not gemm_kinds.safe_on_concurrent_streams(gemm):
        ran = "one_compute_stream"
    assert _symm_mem_pipeline.schedules_run[gemm, "rs", ran] == len(calls)
    # All references (collectives) first, then the assertions: see test_fused_ops_match_unfused.
    checks = [
        (ag, reference_all_gather_gemm(*x_args), rs, reference_gemm_reduce_scatter(*y_args))
        for x_args, ag, y_args, rs in calls
    ]
    for (gathered, out), (ref_gathered, ref_out), rs, want in checks:
        assert torch.equal(gathered.view(torch.uint8), ref_gathered.view(torch.uint8))
        torch.testing.assert_close(out.float(), ref_out.float(), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(rs.float(), want.float(), rtol=2e-2, atol=_reduce_atol())


@pytest.mark.parametrize("return_gathered", [True, False], ids=["gathered", "in-place"])
@pytest.mark.parametrize("late_rank", [0, 1])
def test_all_gather_handshake_holds_when_one_rank_runs_late(nccl_group, late_rank, return_gathered):
    """The all_gather hands over through flags, not barriers: a rank must not overwrite a peer's slot
    before the peer is done with it, nor read a slot before it is filled. One rank's GPU is held back
    before every other call, so its peer runs ahead into the next call; every call's gathered rows
    must still be the ones gathered, and the flags must end cleared for the next op. Values stay
    below 256, where bf16 holds every integer, so a stale row cannot pass for a fresh one."""
    from fusionpasses.kernels._symm_mem_pipeline import _handshake_words, force_schedule, workspace

    ws, rank, group = dist.get_world_size(), dist.get_rank(), nccl_group.group_name
    b = torch.eye(64, device="cuda", dtype=BF16)
    # Shard sizes change from call to call: a sender's slot must not move onto another sender's slot
    # that the receiver has not read yet (from three ranks on, where a receiver has several senders).
    rows = [32 if call % 3 else 48 for call in range(24)]
    shards = [torch.full((rows[call], 64), 4 * call + rank, device="cuda", dtype=BF16) for call in range(24)]
    results = []
    with force_schedule("one_compute_stream"):
        for call, shard in enumerate(shards):
            if rank == late_rank and call % 2 == 0:
                torch.cuda._sleep(2_000_000)  # about 1 ms of GPU time
            results.append(
                torch.ops.fusionpasses.all_gather_gemm(shard, b, None, None, "mm", None, ws, group, False, return_gathered)
            )
    torch.cuda.synchronize()
    dist.barrier()
    torch.cuda.synchronize()
    symm = workspace(group, ws * 48 * 64 * 2)
    ready, in_use = _handshake_words(symm, ws)
    pad = symm.get_signal_pad(rank, (symm.signal_pad_size // 4,), torch.int32)
    words = [ready(r) for r in range(ws)] + [in_use(r) for r in range(ws)]
    assert pad[words].tolist() == [0] * (2 * ws)
    for call, (gathered, out) in enumerate(results):
        want = torch.cat([torch.full((rows[call], 64), 4 * call + r, device="cuda", dtype=BF16) for r in range(ws)])
        assert torch.equal(gathered, want if return_gathered else want[:0]), f"call {call}"
        assert torch.equal(out, want), f"call {call}"
