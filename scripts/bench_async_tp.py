"""AsyncTP benchmark: unfused (NCCL collective + GEMM) vs fusionpasses' fused ops vs torch's symm_mem ops.

    torchrun --nproc-per-node 2 scripts/bench_async_tp.py [--quick] [--kinds bmm_fp8,scaled_mm,mm] [--sides ag,rs]
        [--ms 4096,8192] [--out DIR]

For every GEMM kind (FlashInfer bmm_fp8, torch._scaled_mm tensor-wise, bf16 mm), (K, N) and global M,
both sides (all_gather -> GEMM, GEMM -> reduce_scatter) are timed in one run: the GEMM alone, the
collective alone, unfused, ours (the pipeline schedule SCHEDULE_BY_GEMM picks for the kind and side), ours with
another schedule ("other": one stream where ours is "sum_in_gemm" or two streams, else two streams),
ours with FlashInfer's public API (bmm_fp8), torch's fused op where one exists. Reported per shape:
ms, speedup vs unfused, overlap efficiency max(gemm, comm) / fused, the cost model's decision and the
speedup with that gating. Times are GPU time with the calls queued ahead (see ``timed``); the JSON
also has the host time per call of unfused and ours. Prints a table, writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from typing import NamedTuple

import torch
import torch.distributed as dist

import fusionpasses.kernels  # noqa: F401
from fusionpasses import FusionConfig
from fusionpasses.cost_model import estimate, profile_for
from fusionpasses.kernels import bmm_fp8 as bmm_fp8_module
from fusionpasses.kernels._symm_mem_pipeline import SCHEDULE_BY_GEMM, SCHEDULES, force_schedule
from fusionpasses.symm_mem import setup_symm_mem

FP8 = torch.float8_e4m3fn
BF16 = torch.bfloat16
c10d = torch.ops._c10d_functional
HOLD_CYCLES_PER_S = 2.0e9  # spin-kernel cycles per second at H100/H200 clocks; slower clocks only hold longer


class Timing(NamedTuple):
    device_ms: float
    """Median GPU time per call, the slowest rank's."""
    host_ms: float
    """Median CPU time to enqueue one call, the slowest rank's."""


def timed(fn, iters: int, reps: int = 5) -> Timing:
    """Times ``iters`` back-to-back calls, ``reps`` times. A spin kernel holds the GPU until every call
    is queued, so the device time excludes the host's launch latency, as under CUDA graphs: with a
    few calls per run, a fused op's ~0.4 ms of Python per call would otherwise be counted as GPU
    time. The host time per call is measured on the side (eager users pay it when it exceeds the
    device time)."""
    for _ in range(3):  # warm-up: JIT compilation, workspaces
        fn()
    torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(2):
        fn()
    warm_host = torch.tensor([(time.perf_counter() - began) / 2], device="cuda")
    # One hold for all ranks: a rank whose GPU started later would make its peers wait in the first
    # collective, and that wait would be timed.
    dist.all_reduce(warm_host, op=dist.ReduceOp.MAX)
    hold_s = min(0.2, 0.001 + 1.5 * iters * float(warm_host.item()))
    hold_cycles = int(hold_s * HOLD_CYCLES_PER_S)
    device, host = [], []
    for _ in range(reps):
        dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(hold_cycles)
        start.record()
        began = time.perf_counter()
        for _ in range(iters):
            fn()
        host.append((time.perf_counter() - began) / iters)
        end.record()
        torch.cuda.synchronize()
        device.append(start.elapsed_time(end) / iters)
    t = torch.tensor([statistics.median(device), statistics.median(host) * 1e3], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return Timing(*t.tolist())


def make_inputs(kind: str, rows: int, k: int, n: int, copies: int):
    g = torch.Generator(device="cuda").manual_seed(dist.get_rank())
    if kind == "mm":
        a = [torch.randn(rows, k, device="cuda", dtype=BF16, generator=g) for _ in range(copies)]
        b = torch.randn(k, n, device="cuda", dtype=BF16, generator=g) / k**0.5
        return a, b, None, None, None
    a = [(torch.randn(rows, k, device="cuda", generator=g) * 2).to(FP8) for _ in range(copies)]
    b = (torch.randn(n, k, device="cuda", generator=g) * 2).to(FP8).t()
    s = torch.tensor([1.0 / k], device="cuda")
    return a, b, s, torch.tensor([1.0], device="cuda"), BF16


def gemm_fn(kind: str):
    if kind == "mm":
        return lambda a, b, sa, sb, dt: a @ b
    if kind == "scaled_mm":
        return lambda a, b, sa, sb, dt: torch._scaled_mm(a, b, sa, sb, out_dtype=dt)
    return lambda a, b, sa, sb, dt: torch.ops.fusionpasses.bmm_fp8(a.unsqueeze(0), b.unsqueeze(0), sa, sb, dt, "cublas").squeeze(0)


def all_gather(x, ws, group):
    erased = x.view(torch.uint8) if x.dtype == FP8 else x
    return c10d.wait_tensor(c10d.all_gather_into_tensor(erased, ws, group)).view(x.dtype)


def reduce_scatter(x, ws, group):
    return c10d.wait_tensor(c10d.reduce_scatter_tensor(x, "sum", ws, group))


def torch_fused(kind: str, side: str, group: str):
    sm = torch.ops.symm_mem
    if kind == "bmm_fp8":
        return None
    if side == "ag":
        if kind == "mm":
            return lambda a, b, sa, sb, dt: sm.fused_all_gather_matmul(a, [b], 0, group, return_A=False)
        return lambda a, b, sa, sb, dt: sm.fused_all_gather_scaled_matmul(a, [b], sa, [sb], 0, group, [None], [None], [dt], [False])
    if kind == "mm":
        return lambda a, b, sa, sb, dt: sm.fused_matmul_reduce_scatter(a, b, "sum", 0, group)
    return lambda a, b, sa, sb, dt: sm.fused_scaled_matmul_reduce_scatter(
        a, b, sa, sb, "sum", 0, 0, group, [a.shape[0], b.shape[1]], None, None, dt, False
    )


def run_case(kind, side, m, k, n, ws, group, profile):
    rows = m // ws if side == "ag" else m
    elem = 1 if kind != "mm" else 2
    copies = max(1, min(4, (256 << 20) // max(1, rows * k * elem)))  # rotate inputs past the 60 MB L2
    a_list, b, sa, sb, dt = make_inputs(kind, rows, k, n, copies)
    gemm = gemm_fn(kind)
    it = [0]

    def a():
        it[0] = (it[0] + 1) % len(a_list)
        return a_list[it[0]]

    flops = 2.0 * m * k * n
    iters = max(8, min(50, int(4e12 / flops) + 3))
    if side == "ag":
        full = [all_gather(x, ws, group) for x in a_list]
        t_gemm = timed(lambda: gemm(full[it[0] % len(full)], b, sa, sb, dt), iters).device_ms
        t_comm = timed(lambda: all_gather(a(), ws, group), iters).device_ms
        unfused = timed(lambda: gemm(all_gather(a(), ws, group), b, sa, sb, dt), iters)
        ours = lambda: torch.ops.fusionpasses.all_gather_gemm(a(), b, sa, sb, kind, dt, ws, group)  # noqa: E731
        comm_bytes = m * k * elem
    else:
        partial = gemm(a_list[0], b, sa, sb, dt)
        t_gemm = timed(lambda: gemm(a(), b, sa, sb, dt), iters).device_ms
        t_comm = timed(lambda: reduce_scatter(partial, ws, group), iters).device_ms
        unfused = timed(lambda: reduce_scatter(gemm(a(), b, sa, sb, dt), ws, group), iters)
        ours = lambda: torch.ops.fusionpasses.gemm_reduce_scatter(a(), b, sa, sb, kind, dt, "sum", ws, group)  # noqa: E731
        comm_bytes = m * n * 2
    fused = timed(ours, iters)
    t_unfused, t_ours = unfused.device_ms, fused.device_ms
    schedule = SCHEDULE_BY_GEMM[kind, side]
    other_schedule = next(s for s in SCHEDULES if s != schedule)
    with force_schedule(other_schedule):
        t_other = timed(ours, iters).device_ms
    t_public = None
    if kind == "bmm_fp8":
        bmm_fp8_module.USE_FAST_PATH = False
        t_public = timed(ours, iters).device_ms
        bmm_fp8_module.USE_FAST_PATH = True
    tf = torch_fused(kind, side, group)
    t_torch = timed(lambda: tf(a(), b, sa, sb, dt), iters).device_ms if tf is not None else None
    est = estimate(profile, kind, m, k, n, ws, comm_bytes, reduce=side == "rs")
    fuse = est.speedup >= FusionConfig().async_tp_min_speedup  # what the pass decides by default
    return dict(
        kind=kind, side=side, M=m, K=k, N=n, world_size=ws,
        gemm_ms=t_gemm, comm_ms=t_comm, unfused_ms=t_unfused, ours_ms=t_ours,
        unfused_host_ms=unfused.host_ms, ours_host_ms=fused.host_ms, schedule=schedule,
        other_schedule=other_schedule, ours_other_schedule_ms=t_other,
        ours_public_api_ms=t_public,
        torch_ms=t_torch,
        speedup=t_unfused / t_ours,
        torch_speedup=(t_unfused / t_torch) if t_torch else None,
        overlap_efficiency=max(t_gemm, t_comm) / t_ours,
        predicted_speedup=est.speedup, fused_by_cost_model=fuse,
        gated_speedup=(t_unfused / t_ours) if fuse else 1.0,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 30-second smoke run")
    parser.add_argument("--kinds", default="bmm_fp8,scaled_mm,mm")
    parser.add_argument("--sides", default="ag,rs", help="ag (all_gather + GEMM), rs (GEMM + reduce_scatter)")
    parser.add_argument("--ms", default="", help="comma-separated global M values (default: the full grid)")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = parser.parse_args()

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    group = setup_symm_mem(dist.group.WORLD)
    ws = dist.get_world_size()
    rank0 = dist.get_rank() == 0
    profile = profile_for(torch.cuda.get_device_capability(), FusionConfig())

    kinds = args.kinds.split(",")
    if "bmm_fp8" in kinds:
        try:
            import flashinfer  # noqa: F401
        except ImportError:
            kinds.remove("bmm_fp8")
            if rank0:
                print("FlashInfer is not installed: skipping bmm_fp8")
    ms = (4096, 16384) if args.quick else (1024, 2048, 4096, 8192, 16384)
    if args.ms:
        ms = tuple(int(m) for m in args.ms.split(","))
    shapes = [(8192, 8192)] if args.quick else [(4096, 4096), (8192, 8192), (8192, 28672 // ws)]
    results = []
    for kind in kinds:
        for k, n in shapes:
            for m in ms:
                for side in args.sides.split(","):
                    r = run_case(kind, side, m, k, n, ws, group, profile)
                    results.append(r)
                    if rank0:
                        print(
                            f"{kind:>9} {side} M={m:>5} K={k:>5} N={n:>5}  unfused {r['unfused_ms']:.3f}  "
                            f"ours {r['ours_ms']:.3f} ({r['speedup']:.2f}x)  "
                            f"{r['other_schedule']} {r['ours_other_schedule_ms']:.3f}  "
                            + (f"torch {r['torch_ms']:.3f} ({r['torch_speedup']:.2f}x)  " if r["torch_ms"] else "")
                            + (f"public-api {r['ours_public_api_ms']:.3f}  " if r["ours_public_api_ms"] else "")
                            + f"overlap {r['overlap_efficiency']:.2f}  predicted {r['predicted_speedup']:.2f}x  "
                            + f"host/call unfused {r['unfused_host_ms']:.3f} ours {r['ours_host_ms']:.3f}",
                            flush=True,
                        )
    if rank0:
        report(results, args.out, ws)
    dist.destroy_process_group()


def report(results, out_dir, ws):
    os.makedirs(out_dir, exist_ok=True)
    meta = dict(
        device=torch.cuda.get_device_name(), world_size=ws, torch=torch.__version__,
        date=datetime.date.today().isoformat(),
    )
    header = (
        f"AsyncTP on {ws}x {meta['device']}, torch {meta['torch']}, {meta['date']} (ms; speedup = unfused / fused)\n"
        f"{'gemm':>9} {'side':>4} {'M':>6} {'K':>5} {'N':>6} | {'gemm':>6} {'comm':>6} {'unfused':>7} | "
        f"{'ours':>6} {'x':>5} {'other':>6} {'x':>5} {'torch':>6} {'x':>5} | {'overlap':>7} {'pred':>5} {'gated x':>7}"
    )
    lines = [header, "-" * len(header.splitlines()[-1])]
    for r in results:
        torch_cols = f"{r['torch_ms']:6.3f} {r['torch_speedup']:5.2f}" if r["torch_ms"] else f"{'-':>6} {'-':>5}"
        lines.append(
            f"{r['kind']:>9} {r['side']:>4} {r['M']:>6} {r['K']:>5} {r['N']:>6} | {r['gemm_ms']:6.3f} {r['comm_ms']:6.3f} "
            f"{r['unfused_ms']:7.3f} | {r['ours_ms']:6.3f} {r['speedup']:5.2f} "
            f"{r['ours_other_schedule_ms']:6.3f} {r['unfused_ms'] / r['ours_other_schedule_ms']:5.2f} {torch_cols} | "
            f"{r['overlap_efficiency']:7.2f} {r['predicted_speedup']:5.2f} {r['gated_speedup']:7.2f}"
        )
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(out_dir, "bench_async_tp.json"), "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1)
    with open(os.path.join(out_dir, "bench_async_tp.txt"), "w") as f:
        f.write(table + "\n")
    plot(results, os.path.join(out_dir, "bench_async_tp.png"), meta)


def plot(results, path, meta):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({r["kind"] for r in results})
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for side in sorted({r["side"] for r in results}):
            for k, n in sorted({(r["K"], r["N"]) for r in results}):
                rows = [r for r in results if r["kind"] == kind and r["side"] == side and (r["K"], r["N"]) == (k, n)]
                ax.plot([r["M"] for r in rows], [r["speedup"] for r in rows], marker="o", label=f"{side} K={k} N={n}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(kind)
        ax.set_xlabel("global M")
        ax.set_ylabel("speedup vs unfused")
        ax.legend(fontsize=6)
    fig.suptitle(f"AsyncTP fused ops, {meta['world_size']}x {meta['device']}, {meta['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    main()
