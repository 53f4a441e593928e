"""Batch-invariant FP8 GEMM benchmark: ours vs cuBLAS ``torch._scaled_mm`` vs the dequantize path.

    python scripts/bench_batch_invariant.py [--quick] [--out DIR] [--scales rowwise tensorwise] [--fast-accum]
    python scripts/bench_batch_invariant.py --sweep [--fast-accum]

For each (K, N) and M, three ways to compute an FP8 linear layer's GEMM, side by side:

- ours:    ``fusionpasses.batch_invariant_fp8_gemm`` (one tile config per (N, K), batch-invariant);
- cuBLAS:  ``torch._scaled_mm`` with the same scales (not batch-invariant: tiles and split-K follow M);
- dequant: what seed 000 replaced, the weight dequantized to bf16 on every call, then a bf16 GEMM.

Scales: "rowwise" is per-token activations x per-channel weights, "tensorwise" one scale each.
Accumulation: both sides promote to fp32 (``use_fast_accum=False``, torch's default) unless
``--fast-accum`` is given, which runs both with fast accumulation.
Times are GPU time per call: the calls are captured in a CUDA graph, each call reading another copy
of the inputs (copies rotate through more than twice the L2), and the median over replays is kept,
so host launch overhead is excluded (it is reported separately, for eager callers).
Targets (issue 9): ours >= 0.9x cuBLAS throughput at M >= 256 and >= 0.75x below, >= 2x dequant.

``--sweep`` instead times candidate tile configurations per (K, N) against cuBLAS (rowwise scales)
and ranks them by how well they meet the targets over all M (~3 min): tile shapes, pipeline depths
and the structural variants of ``TileConfig`` (persistent, warp-specialized, TMA-store epilogue,
epilogue subtiles). A fixed config per (N, K) is what batch invariance allows, so this is how
``TILE_RULES`` in kernels/batch_invariant_fp8_gemm.py is set; a candidate the compiler rejects on
this GPU is reported and skipped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

import fusionpasses.kernels  # noqa: F401
from fusionpasses.kernels.batch_invariant_fp8_gemm import TileConfig, batch_invariant_fp8_gemm_triton, tile_config

FP8 = torch.float8_e4m3fn
BF16 = torch.bfloat16
FP8_MAX = 448.0

M_VALUES = (1, 16, 64, 256, 1024, 4096, 16384)
KN_SHAPES = ((4096, 4096), (4096, 14336), (7168, 2048))
QUICK_M = (1, 256, 4096)


def target_vs_cublas(M: int) -> float:
    return 0.9 if M >= 256 else 0.75


TARGET_VS_DEQUANT = 2.0


# ---- timing ------------------------------------------------------------------------------------


def gpu_ms_per_call(calls: list[Callable[[], object]], budget_ms: float, replays: int) -> float:
    """Median GPU ms per call of ``calls`` (one per input copy), captured together in a CUDA graph."""
    for call in calls:  # compiles, autotunes cuBLAS heuristics, allocates
        call()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        for call in calls:
            call()
    end.record()
    end.synchronize()
    estimate = start.elapsed_time(end) / (3 * len(calls))
    per_graph = max(len(calls), min(2000, int(budget_ms / max(estimate, 1e-4))))
    per_graph -= per_graph % len(calls)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(per_graph):
            calls[i % len(calls)]()
    graph.replay()
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / per_graph)
    del graph
    return statistics.median(times)


def host_us_per_call(call: Callable[[], object], calls: int = 200) -> float:
    """Wall time per eager call with the GPU kept ahead: the launch overhead an eager caller pays."""
    call()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        call()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    return host / calls * 1e6


# ---- inputs ------------------------------------------------------------------------------------


@dataclass
class Weights:
    fp8: list[torch.Tensor]  # (N, K) copies
    channel_scale: torch.Tensor  # (1, N)
    tensor_scale: torch.Tensor  # ()


def make_weights(N: int, K: int, copies: int) -> Weights:
    w = torch.randn(N, K, device="cuda") / K**0.5
    channel = w.abs().amax(-1).float().unsqueeze(0) / FP8_MAX
    fp8 = (w / channel.t()).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return Weights([fp8.clone() for _ in range(copies)], channel, channel.max().reshape(()))


@dataclass
class Activations:
    bf16: list[torch.Tensor]
    fp8: list[torch.Tensor]
    token_scale: list[torch.Tensor]  # (M, 1)
    tensor_scale: torch.Tensor  # ()


def make_activations(M: int, K: int, copies: int) -> Activations:
    bf16, fp8, scales = [], [], []
    for _ in range(copies):
        x = torch.randn(M, K, device="cuda", dtype=BF16)
        s = x.abs().amax(-1, keepdim=True).float() / FP8_MAX
        bf16.append(x)
        fp8.append((x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8))
        scales.append(s)
    return Activations(bf16, fp8, scales, torch.tensor(4.0 / FP8_MAX, device="cuda"))


def rotation(M: int, K: int, N: int, l2_bytes: int) -> int:
    """Input copies so that one pass over them streams more than twice the L2 (at most 8)."""
    set_bytes = M * K + N * K + 2 * M * N
    return max(1, min(8, math.ceil(2 * l2_bytes / set_bytes)))


# ---- variants ----------------------------------------------------------------------------------


def variant_calls(
    name: str, scales: str, acts: Activations, weights: Weights, fast_accum: bool, config: TileConfig | None = None
) -> list[Callable[[], object]]:
    copies = len(acts.fp8)
    calls: list[Callable[[], object]] = []
    for i in range(copies):
        a, x = acts.fp8[i], acts.bf16[i]
        w = weights.fp8[i % len(weights.fp8)]
        if scales == "rowwise":
            sa, sb = acts.token_scale[i], weights.channel_scale
        else:
            sa, sb = acts.tensor_scale, weights.tensor_scale
        if name == "ours":
            calls.append(lambda a=a, w=w, sa=sa, sb=sb: batch_invariant_fp8_gemm_triton(
                a, w.t(), sa, sb, None, BF16, use_fast_accum=fast_accum, config=config))
        elif name == "cublas":
            calls.append(lambda a=a, w=w, sa=sa, sb=sb: torch._scaled_mm(
                a, w.t(), sa, sb, out_dtype=BF16, use_fast_accum=fast_accum))
        else:  # dequant: the weight back to bf16 on every call, then a bf16 GEMM
            calls.append(lambda x=x, w=w: torch.nn.functional.linear(x, w.to(BF16) * weights.channel_scale.t().to(BF16)))
    return calls


# ---- main --------------------------------------------------------------------------------------


def header(fast_accum: bool = False) -> str:
    import triton

    props = torch.cuda.get_device_properties(0)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"{props.name} ({props.multi_processor_count} SMs, L2 {props.L2_cache_size >> 20} MiB), "
            f"torch {torch.__version__}, triton {triton.__version__}, {date}, "
            f"{'fast accumulation' if fast_accum else 'fp32-promoted accumulation'}")


def run_table(args: argparse.Namespace, l2: int) -> list[dict]:
    rows: list[dict] = []
    m_values = QUICK_M if args.quick else M_VALUES
    shapes = KN_SHAPES[:1] if args.quick else KN_SHAPES
    budget, replays = (5.0, 5) if args.quick else (20.0, 15)
    print(f"{'scales':<10} {'K':>5} {'N':>6} {'M':>6} | {'ours ms':>9} {'cuBLAS ms':>9} {'dequant ms':>10} | "
          f"{'ours TF/s':>9} {'vs cuBLAS':>9} {'vs dequant':>10} | target")
    for K, N in shapes:
        weights = make_weights(N, K, rotation(1, K, N, l2))
        cfg = tile_config(N, K)
        for M in m_values:
            acts = make_activations(M, K, rotation(M, K, N, l2))
            dequant_ms = gpu_ms_per_call(variant_calls("dequant", "rowwise", acts, weights, args.fast_accum), budget, replays)
            for scales in args.scales:
                ours_ms = gpu_ms_per_call(variant_calls("ours", scales, acts, weights, args.fast_accum), budget, replays)
                cublas_ms = gpu_ms_per_call(variant_calls("cublas", scales, acts, weights, args.fast_accum), budget, replays)
                vs_cublas, vs_dequant = cublas_ms / ours_ms, dequant_ms / ours_ms
                ok = vs_cublas >= target_vs_cublas(M) and vs_dequant >= TARGET_VS_DEQUANT
                rows.append({"scales": scales, "K": K, "N": N, "M": M, "ours_ms": ours_ms, "cublas_ms": cublas_ms,
                                 "dequant_ms": dequant_ms, "ours_tflops": 2 * M * N * K / ours_ms / 1e9,
                                 "cublas_tflops": 2 * M * N * K / cublas_ms / 1e9,
                                 "dequant_tflops": 2 * M * N * K / dequant_ms / 1e9, "vs_cublas": vs_cublas,
                                 "vs_dequant": vs_dequant, "target_vs_cublas": target_vs_cublas(M), "meets_targets": ok,
                                 "tile_config": asdict(cfg)})
                print(f"{scales:<10} {K:>5} {N:>6} {M:>6} | {ours_ms:>9.4f} {cublas_ms:>9.4f} {dequant_ms:>10.4f} | "
                      f"{rows[-1]['ours_tflops']:>9.1f} {vs_cublas:>8.2f}x {vs_dequant:>9.2f}x | "
                      f"{'ok' if ok else 'MISS'} (>= {target_vs_cublas(M)}x, >= {TARGET_VS_DEQUANT}x)")
            del acts
        del weights
        torch.cuda.empty_cache()
    return rows


def host_overhead() -> dict:
    weights = make_weights(4096, 4096, 1)
    acts = make_activations(1, 4096, 1)
    ours = variant_calls("ours", "rowwise", acts, weights, fast_accum=False)[0]
    cublas = variant_calls("cublas", "rowwise", acts, weights, fast_accum=False)[0]
    return {"ours_us": host_us_per_call(ours), "cublas_us": host_us_per_call(cublas)}


def _variants(bm: int, bn: int, warps: int, stages: int, *flags: str) -> list[TileConfig]:
    """One tile shape with each of the structural variants named in ``flags``:
    "plain", "ws" (on the K loop), "p" (persistent), "p+ws", "p+tma", "p+ws+tma", "p+tma/2", "tma"."""
    configs = []
    for flag in flags:
        parts = set(flag.replace("/2", "").split("+")) - {"plain"}
        configs.append(TileConfig(bm, bn, 128, group_m=8, num_warps=warps, num_stages=stages,
                                  persistent="p" in parts, warp_specialize="ws" in parts, tma_store="tma" in parts,
                                  epilogue_subtiles=2 if flag.endswith("/2") else 1))
    return configs


def sweep_candidates(N: int, K: int) -> list[TileConfig]:
    """Candidates for one weight, trimmed to what can win there (~7 per shape, each ~1 s to compile).

    256-wide tiles hold 128 fp32 accumulator registers per thread, twice with the per-K-tile fp32
    promotion: ptxas spills them (sm90, Triton 3.9), so they are tried on wide layers only, and
    really only compete with --fast-accum. Warp specialization shows up on 4-warp kernels; with 8
    warps Triton 3.9 compiles it without a producer warp (no setmaxnreg), kept as one candidate.
    """
    if N >= 8192:
        return [*_variants(128, 128, 8, 4, "p+tma", "p+ws+tma", "p+tma/2"),
                *_variants(128, 128, 8, 5, "p+tma"),
                *_variants(64, 128, 4, 4, "p+ws"),
                *_variants(128, 256, 8, 3, "p+tma/2")]
    if N >= 3072:
        return [*_variants(64, 128, 4, 4, "ws", "p+ws", "p+ws+tma", "p+tma/2"),
                *_variants(128, 128, 8, 4, "plain", "p+tma")]
    return [*_variants(64, 64, 4, 6, "p", "p+ws+tma"),
            *_variants(64, 128, 4, 4, "plain", "p+ws"),
            *_variants(128, 128, 8, 4, "p+tma"),
            *_variants(128, 64, 8, 6, "p+tma")]


def describe(cfg: TileConfig) -> str:
    flags = [name for name, on in (("persistent", cfg.persistent), ("ws", cfg.warp_specialize),
                                   ("tma-store", cfg.tma_store)) if on]
    if cfg.epilogue_subtiles > 1:
        flags.append(f"subtiles={cfg.epilogue_subtiles}")
    return f"{cfg.block_m}x{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages} " + ("+".join(flags) or "plain")


def run_sweep(args: argparse.Namespace, l2: int) -> list[dict]:
    """Per (K, N): each candidate config's worst ratio to its target over M; the best one wins."""
    results = []
    m_values = QUICK_M if args.quick else M_VALUES
    for K, N in KN_SHAPES[:1] if args.quick else KN_SHAPES:
        weights = make_weights(N, K, rotation(1, K, N, l2))
        cublas = {}
        acts_by_m = {M: make_activations(M, K, rotation(M, K, N, l2)) for M in m_values}
        for M, acts in acts_by_m.items():
            cublas[M] = gpu_ms_per_call(variant_calls("cublas", "rowwise", acts, weights, args.fast_accum), 5.0, 5)
        current = tile_config(N, K)
        candidates = sweep_candidates(N, K)
        candidates += [current] if current not in candidates else []
        scored = []
        started = time.perf_counter()
        for cfg in candidates:
            try:
                ratios = {M: cublas[M] / gpu_ms_per_call(variant_calls("ours", "rowwise", acts, weights, args.fast_accum, cfg), 5.0, 5)
                          for M, acts in acts_by_m.items()}
            except Exception as error:  # noqa: BLE001  the compiler may reject a combination, or run out of resources
                print(f"  skipped {describe(cfg)}: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}")
                results.append({"K": K, "N": N, "config": asdict(cfg), "error": f"{type(error).__name__}: {error}"[:2000]})
                continue
            score = min(r / target_vs_cublas(M) for M, r in ratios.items())
            scored.append((score, cfg, ratios))
        scored.sort(key=lambda item: -item[0])
        print(f"\nK={K} N={N} ({len(candidates)} candidates, {time.perf_counter() - started:.0f} s): "
              "score = min over M of (ours/cuBLAS) / target; >= 1 meets every target")
        for score, cfg, ratios in scored:
            mark = "  <- tile_config" if cfg == current else ""
            print(f"  {score:5.2f}  {describe(cfg):<42} " + " ".join(f"M{M}:{r:.2f}" for M, r in ratios.items()) + mark)
            results.append({"K": K, "N": N, "config": asdict(cfg), "score": score, "ratios": ratios, "current": cfg == current})
        if scored:
            print(f"  best: TileConfig({', '.join(f'{k}={v}' for k, v in asdict(scored[0][1]).items())})")
        del acts_by_m, weights
        torch.cuda.empty_cache()
    return results


def plot(rows: list[dict], path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    shapes = sorted({(r["K"], r["N"]) for r in rows})
    scale_modes = sorted({r["scales"] for r in rows})
    fig, axes = plt.subplots(2, len(shapes), figsize=(5 * len(shapes), 8), squeeze=False)
    for col, (K, N) in enumerate(shapes):
        top, bottom = axes[0][col], axes[1][col]
        for scales in scale_modes:
            sel = [r for r in rows if (r["K"], r["N"], r["scales"]) == (K, N, scales)]
            ms = [r["M"] for r in sel]
            top.plot(ms, [r["ours_tflops"] for r in sel], "o-", label=f"ours ({scales})")
            top.plot(ms, [r["cublas_tflops"] for r in sel], "s--", label=f"cuBLAS _scaled_mm ({scales})")
            bottom.plot(ms, [r["vs_cublas"] for r in sel], "o-", label=f"ours / cuBLAS ({scales})")
        sel = [r for r in rows if (r["K"], r["N"], r["scales"]) == (K, N, scale_modes[0])]
        top.plot([r["M"] for r in sel], [r["dequant_tflops"] for r in sel], "^:", label="dequant + bf16 GEMM")
        bottom.step([1, 256, 16384], [0.75, 0.9, 0.9], where="post", color="gray", label="target")
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
        top.set_yscale("log")
        top.set_title(f"K={K}, N={N}")
        top.set_ylabel("TFLOP/s")
        bottom.set_ylabel("throughput vs cuBLAS")
        bottom.set_xlabel("M (tokens)")
        top.legend(fontsize=7)
        bottom.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one shape, three M values (~20 s smoke run)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "bench_out", help="directory for JSON and PNG")
    parser.add_argument("--scales", nargs="+", choices=("rowwise", "tensorwise"), default=["rowwise", "tensorwise"])
    parser.add_argument("--sweep", action="store_true", help="rank candidate tile configs per (K, N) instead")
    parser.add_argument("--fast-accum", action="store_true",
                        help="use_fast_accum=True on both ours and cuBLAS (default: both promote to fp32)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_batch_invariant.py needs a CUDA GPU")
    os.makedirs(args.out, exist_ok=True)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    print(header(args.fast_accum))
    stem = os.path.join(args.out, "bench_batch_invariant" + ("_fast_accum" if args.fast_accum else ""))
    if args.sweep:
        sweep = run_sweep(args, l2)
        with open(f"{stem}_sweep.json", "w") as f:
            json.dump({"header": header(args.fast_accum), "sweep": sweep}, f, indent=1)
        print(f"json: {stem}_sweep.json")
        return
    rows = run_table(args, l2)
    overhead = host_overhead()
    misses = [r for r in rows if not r["meets_targets"]]
    print(f"\nhost time per eager call at M=1 (N=K=4096): ours {overhead['ours_us']:.1f} us, "
          f"cuBLAS {overhead['cublas_us']:.1f} us (CUDA graphs remove it)")
    print(f"targets met at {len(rows) - len(misses)}/{len(rows)} points"
          + "".join(f"\n  MISS {r['scales']} K={r['K']} N={r['N']} M={r['M']}: {r['vs_cublas']:.2f}x cuBLAS, "
                    f"{r['vs_dequant']:.2f}x dequant" for r in misses))
    with open(f"{stem}.json", "w") as f:
        json.dump({"header": header(args.fast_accum), "fast_accum": args.fast_accum, "rows": rows,
                   "host_overhead_us": overhead}, f, indent=1)
    print(f"json: {stem}.json")
    plot(rows, f"{stem}.png", header(args.fast_accum))


if __name__ == "__main__":
    main()
