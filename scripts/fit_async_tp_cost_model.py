"""Fit AsyncTP's cost model (fusionpasses/cost_model.py) to a scripts/bench_async_tp.py run.

    python scripts/fit_async_tp_cost_model.py bench_out/bench_async_tp.json

Per (GEMM kind, side): a least-squares line through fused time against GEMM-alone time over the shapes
whose GEMM takes >= 0.15 ms, with the intercept raised to the 90th percentile of the residuals, so
that shapes where chunked cuBLAS kernels vary most are not overrated. The host floor is the smallest
host time of a fused call (the benchmark times the GPU with every call queued ahead, and the host
separately). Prints the ``ChunkingFit`` for the run's world size (an entry of ``GpuProfile.fits``) and
how the model with it would gate every measured shape (``--min-speedup``, as
``FusionConfig.async_tp_min_speedup``).
Runs on the CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics

from fusionpasses import FusionConfig
from fusionpasses.cost_model import HOPPER, ChunkingFit, estimate_benchmark_row

MIN_GEMM_MS = 0.15


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(a, b) of fused_us = a * gemm_us + b, b raised to the 90th percentile of the residuals."""
    xs, ys = zip(*points, strict=True)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    a = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
    residuals = sorted(y - a * x for x, y in points)
    b = residuals[min(len(residuals) - 1, round(0.9 * (len(residuals) - 1)))]
    return a, b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("json", help="bench_async_tp.json")
    parser.add_argument("--min-speedup", type=float, default=FusionConfig().async_tp_min_speedup,
                        help="the gate's margin to report decisions at (default: FusionConfig's)")
    args = parser.parse_args()
    run = json.load(open(args.json))
    results, world_size = run["results"], run["meta"]["world_size"]

    chunked = {}
    for kind, side in sorted({(r["kind"], r["side"]) for r in results}):
        points = [(r["gemm_ms"] * 1e3, r["ours_ms"] * 1e3) for r in results
                  if (r["kind"], r["side"]) == (kind, side) and r["gemm_ms"] >= MIN_GEMM_MS]
        chunked[(kind, side)] = tuple(round(v) if abs(v) >= 10 else round(v, 2) for v in fit_line(points))
    fit = ChunkingFit(host_us=round(min(r["ours_host_ms"] for r in results) * 1e3, -1), chunked=chunked)
    profile = dataclasses.replace(HOPPER, fits={**HOPPER.fits, world_size: fit})
    print(f"{world_size}: ChunkingFit(host_us={fit.host_us}, chunked={{"
          + ", ".join(f"{k!r}: ({a}, {b})" for k, (a, b) in chunked.items()) + "})")

    fused = []
    for r in results:
        est = estimate_benchmark_row(profile, r, world_size)
        fuse = est.speedup >= args.min_speedup
        if fuse:
            fused.append(r["speedup"])
        print(f"{r['kind']:>9} {r['side']} {r['M']:>6} {r['K']:>5} {r['N']:>6}  measured {r['speedup']:.2f}x  "
              f"predicted {est.speedup:.2f}x  {'fuse' if fuse else 'keep'}")
    slowest = f", the slowest of them measured {min(fused):.2f}x" if fused else ""
    print(f"gated at {args.min_speedup}x: {len(fused)} of {len(results)} shapes fused{slowest}")


if __name__ == "__main__":
    main()
