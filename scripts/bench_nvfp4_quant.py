"""NVFP4 quantization that writes the K padding itself, against quantizing and then padding, on one GPU.

    python scripts/bench_nvfp4_quant.py [--quick] [--out DIR] [--layout swizzled|linear] [--tile BM,BK,WARPS]
    python scripts/bench_nvfp4_quant.py --sweep [--out DIR] [--layout swizzled|linear]

For M in {16, 128, 1024, 8192} and N in {7152, 7168, 14336} (bf16 input, padded_n = round_up(N, 32)):
    quant      ``fusionpasses.nvfp4_quant(x, gs)``, unpadded
    padded     ``fusionpasses.nvfp4_quant(x, gs, padded_n)``: the kernel writes the zero padding
    quant+pad  the unpadded quant, then ``F.pad`` of the packed values (and of linear scales): what a model
               does without the fold. FlashInfer's ``fp4_quantize`` gives wrong output on Hopper, so the
               quant here is ours. Where N is already a multiple of 32 there is nothing to pad.
    copy       ``x.clone()``, a device copy of the input
    ld/st only a kernel on the default tile's grid that reads x and writes the padded outputs' bytes with
               no arithmetic: the floor of that tiling, to tell its cost from the quantization's
Targets: padded <= 1.05x quant; quant+pad >= 2x padded where N needs padding; padded's achieved bandwidth
(bytes read + written) >= 75% of the copy's at M >= 1024.

--sweep times the default tile and each of the kernel file's CANDIDATE_TILES at M in {1024, 8192} and
N in {7152, 14336} (padded and unpadded quant, and the copy), prints each shape's tiles ranked by % of copy
bandwidth with their padded/unpadded ratio, then the tiles ranked by their worst shape, and writes
bench_nvfp4_quant_sweep.json. Set the kernel's DEFAULT_* constants from the winner. Under a minute on
one H200 (mostly compiling).

Timing: a CUDA graph holding one call per rotating input (the inputs together exceed twice the L2 cache,
so each call reads from DRAM; the graph takes the launch overhead out), replayed after warm-up; the
median over replays, per call. Writes bench_nvfp4_quant.json and .png to --out (default $OUT, else
./bench_out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import fusionpasses.kernels  # noqa: F401  (registers the ops)
from fusionpasses.kernels.nvfp4_quant import (
    CANDIDATE_TILES,
    TileShape,
    default_tile,
    launch_nvfp4_quant,
    scale_shape,
)

M_VALUES = (16, 128, 1024, 8192)
N_VALUES = (7152, 7168, 14336)
QUICK_M = (128, 8192)
QUICK_N = (7152,)


def round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def time_per_call_us(call: Callable[[int], Any], n_inputs: int, replays: int) -> float:
    """Median microseconds per call of ``call(i)`` for i over the rotating inputs, replayed as a CUDA graph."""
    for i in range(n_inputs):  # compiles the kernels and warms the allocator outside the capture
        call(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n_inputs):
            call(i)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1000.0 / n_inputs)
    del graph
    return statistics.median(samples)


@triton.jit
def _load_store_only_kernel(
    x_ptr, packed_ptr, scales_ptr, M, N, stride_xm, packed_row_words, scale_rows, scale_cols,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # The quant kernel's grid, loads and stores (x as 32-bit words, 8 packed bytes and one scale byte per
    # block), with a shift and a max standing in for the arithmetic.
    BLOCKS: tl.constexpr = BLOCK_K // 16
    block = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    row = (tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rows = row[:, None, None]
    byte_col = block[None, :, None] * 8 + tl.arange(0, 8)[None, None, :]
    packed_cols = packed_row_words * 8
    in_x = (rows < M) & (byte_col * 2 < N)
    words = tl.load(x_ptr.to(tl.pointer_type(tl.int32)) + rows * (stride_xm // 2) + byte_col, mask=in_x, other=0)
    tl.store(packed_ptr + rows * packed_cols + byte_col, (words >> 9).to(tl.uint8),
             mask=(rows < M) & (byte_col < packed_cols))
    scale_row, scale_col = row[:, None], block[None, :]
    tl.store(scales_ptr + scale_row * scale_cols + scale_col, tl.max(words, axis=2).to(tl.uint8),
             mask=(scale_row < scale_rows) & (scale_col < scale_cols))


def launch_load_store_only(x: torch.Tensor, width: int, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs of ``nvfp4_quant(x, gs, width, layout)``'s sizes, written on its default tile's grid."""
    m, n = x.shape
    scale_rows, scale_cols = scale_shape(m, width, layout)
    packed = torch.empty((m, width // 2), dtype=torch.uint8, device=x.device)
    scales = torch.empty((scale_rows, scale_cols), dtype=torch.uint8, device=x.device)
    tile = default_tile(scale_cols * 16)
    grid = (triton.cdiv(scale_cols * 16, tile.block_k), triton.cdiv(scale_rows, tile.block_m))
    assert grid[1] <= 65535, "more row tiles than one grid axis holds"
    _load_store_only_kernel[grid](x, packed, scales, m, n, x.stride(0), width // 16, scale_rows, scale_cols,
                                  BLOCK_M=tile.block_m, BLOCK_K=tile.block_k, num_warps=tile.num_warps)
    return packed, scales


class Inputs:
    """Enough (M, N) bf16 inputs to rotate through that together they exceed twice the L2 cache."""

    def __init__(self, m: int, n: int) -> None:
        self.m, self.n = m, n
        self.bytes = m * n * 2
        l2_bytes = torch.cuda.get_device_properties(0).L2_cache_size
        self.count = max(2, min(512, math.ceil(2 * l2_bytes / self.bytes)))
        self.xs = [torch.randn(m, n, device="cuda", dtype=torch.bfloat16) for _ in range(self.count)]
        self.gs = (448.0 * 6.0 / self.xs[0].float().abs().amax()).reshape(1)

    def time_quant_us(self, width: int | None, layout: str, tile: TileShape | None, replays: int) -> float:
        return time_per_call_us(
            lambda i: launch_nvfp4_quant(self.xs[i], self.gs, width, layout, tile), self.count, replays
        )

    def time_copy_us(self, replays: int) -> float:
        return time_per_call_us(lambda i: self.xs[i].clone(), self.count, replays)

    def time_load_store_only_us(self, width: int, layout: str, replays: int) -> float:
        return time_per_call_us(lambda i: launch_load_store_only(self.xs[i], width, layout), self.count, replays)

    def padded_bytes(self, padded_n: int, layout: str) -> int:
        """Bytes the padded quant reads and writes: x, the packed values and the scales."""
        rows, cols = scale_shape(self.m, padded_n, layout)
        return self.bytes + self.m * padded_n // 2 + rows * cols


def measure(m: int, n: int, layout: str, tile: TileShape | None, replays: int) -> dict[str, Any]:
    padded_n = round_up(n, 32)
    inputs = Inputs(m, n)
    xs, gs, n_inputs, input_bytes = inputs.xs, inputs.gs, inputs.count, inputs.bytes

    def quant(i: int, width: int | None):
        return launch_nvfp4_quant(xs[i], gs, width, layout, tile)

    def quant_then_pad(i: int):
        packed, scales = quant(i, None)
        packed = F.pad(packed, (0, (padded_n - n) // 2))
        if layout == "linear":
            scales = F.pad(scales.view(torch.uint8), (0, (padded_n - n) // 16)).view(torch.float8_e4m3fn)
        return packed, scales

    times = {
        "quant_us": inputs.time_quant_us(None, layout, tile, replays),
        "padded_us": inputs.time_quant_us(padded_n, layout, tile, replays),
        "copy_us": inputs.time_copy_us(replays),
        "load_store_only_us": inputs.time_load_store_only_us(padded_n, layout, replays),
    }
    needs_pad = padded_n != n
    times["quant_pad_us"] = time_per_call_us(quant_then_pad, n_inputs, replays) if needs_pad else None

    padded_bytes = inputs.padded_bytes(padded_n, layout)
    padded_gbps = padded_bytes / times["padded_us"] / 1e3
    copy_gbps = 2 * input_bytes / times["copy_us"] / 1e3
    return {
        "M": m,
        "N": n,
        "padded_n": padded_n,
        "layout": layout,
        "inputs_rotated": n_inputs,
        **times,
        "padding_overhead": times["padded_us"] / times["quant_us"],
        "speedup_vs_quant_pad": times["quant_pad_us"] / times["padded_us"] if needs_pad else None,
        "padded_gbps": padded_gbps,
        "copy_gbps": copy_gbps,
        "fraction_of_copy": padded_gbps / copy_gbps,
        "load_store_only_fraction_of_copy": padded_bytes / times["load_store_only_us"] / 1e3 / copy_gbps,
    }


def header(layout: str, tile: TileShape | None) -> str:
    name = torch.cuda.get_device_name(0)
    today = datetime.date.today().isoformat()
    tile_text = "default tile" if tile is None else f"tile {tile}"
    return (f"nvfp4_quant on {name} | torch {torch.__version__} | triton {triton.__version__} | {today} | "
            f"bf16 input, {layout} scales, padded_n = round_up(N, 32), {tile_text}")


def format_table(rows: list[dict[str, Any]]) -> str:
    columns = ("M", "N", "pad_n", "quant us", "padded us", "padded/quant", "quant+pad us", "(q+pad)/padded",
               "padded GB/s", "copy GB/s", "of copy", "ld/st only")
    lines = [" | ".join(f"{c:>14}" for c in columns)]
    for r in rows:
        quant_pad = "-" if r["quant_pad_us"] is None else f"{r['quant_pad_us']:.2f}"
        speedup = "no pad needed" if r["speedup_vs_quant_pad"] is None else f"{r['speedup_vs_quant_pad']:.2f}x"
        cells = (r["M"], r["N"], r["padded_n"], f"{r['quant_us']:.2f}", f"{r['padded_us']:.2f}",
                 f"{r['padding_overhead']:.3f}x", quant_pad, speedup, f"{r['padded_gbps']:.0f}",
                 f"{r['copy_gbps']:.0f}", f"{100 * r['fraction_of_copy']:.0f}%",
                 f"{100 * r['load_store_only_fraction_of_copy']:.0f}%")
        lines.append(" | ".join(f"{c!s:>14}" for c in cells))
    return "\n".join(lines)


def summary(rows: list[dict[str, Any]]) -> list[str]:
    overhead = max(r["padding_overhead"] for r in rows)
    speedups = [r["speedup_vs_quant_pad"] for r in rows if r["speedup_vs_quant_pad"] is not None]
    large = [r["fraction_of_copy"] for r in rows if r["M"] >= 1024]
    lines = [f"padding overhead: worst {overhead:.3f}x (target <= 1.05x): {'met' if overhead <= 1.05 else 'MISSED'}"]
    if speedups:
        worst = min(speedups)
        lines.append(f"vs quant + pad copy: worst {worst:.2f}x (target >= 2x): {'met' if worst >= 2 else 'MISSED'}")
    if large:
        worst = min(large)
        floor = min(r["load_store_only_fraction_of_copy"] for r in rows if r["M"] >= 1024)
        lines.append(f"bandwidth at M >= 1024: worst {100 * worst:.0f}% of copy (target >= 75%): "
                     f"{'met' if worst >= 0.75 else 'MISSED'} "
                     f"(loads and stores alone on its grid: worst {100 * floor:.0f}%)")
    return lines


def plot(rows: list[dict[str, Any]], title: str, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    labels = [f"{r['M']}x{r['N']}" for r in rows]
    xs = range(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    speedups = [r["speedup_vs_quant_pad"] or 0.0 for r in rows]
    axes[0].bar([x - 0.2 for x in xs], [r["padding_overhead"] for r in rows], 0.4, label="padded / quant")
    axes[0].bar([x + 0.2 for x in xs], speedups, 0.4, label="(quant + pad) / padded")
    axes[0].axhline(2.0, color="gray", linestyle="--", linewidth=0.8)
    axes[0].set_ylabel("time ratio")
    axes[0].legend()
    axes[1].bar(xs, [100 * r["fraction_of_copy"] for r in rows])
    axes[1].axhline(75, color="gray", linestyle="--", linewidth=0.8)
    axes[1].set_ylabel("padded quant bandwidth, % of device copy")
    for ax in axes:
        ax.set_xticks(list(xs), labels, rotation=45, ha="right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


SWEEP_M = (1024, 8192)
SWEEP_N = (7152, 14336)


def tile_label(tile: TileShape | None, cols: int) -> str:
    chosen = tile or default_tile(cols)
    text = f"{chosen.block_m}x{chosen.block_k}/{chosen.num_warps}w"
    if chosen.programs_per_sm:
        text += f" {chosen.programs_per_sm}/SM s{chosen.stages}"
    return f"default ({text})" if tile is None else text


def sweep(layout: str, replays: int) -> list[dict[str, Any]]:
    """Every candidate tile (and the default) on every sweep shape."""
    results = []
    for n in SWEEP_N:
        for m in SWEEP_M:
            inputs = Inputs(m, n)
            padded_n = round_up(n, 32)
            copy_us = inputs.time_copy_us(replays)
            copy_gbps = 2 * inputs.bytes / copy_us / 1e3
            cols = scale_shape(m, padded_n, layout)[1] * 16
            for tile in (None, *CANDIDATE_TILES):
                quant_us = inputs.time_quant_us(None, layout, tile, replays)
                padded_us = inputs.time_quant_us(padded_n, layout, tile, replays)
                padded_gbps = inputs.padded_bytes(padded_n, layout) / padded_us / 1e3
                results.append({
                    "M": m, "N": n, "padded_n": padded_n, "layout": layout, "tile": tile_label(tile, cols),
                    "quant_us": quant_us, "padded_us": padded_us, "copy_us": copy_us,
                    "padding_overhead": padded_us / quant_us, "padded_gbps": padded_gbps, "copy_gbps": copy_gbps,
                    "fraction_of_copy": padded_gbps / copy_gbps,
                })
            del inputs
    return results


def format_sweep(results: list[dict[str, Any]]) -> str:
    lines = []
    for n in SWEEP_N:
        for m in SWEEP_M:
            rows = sorted((r for r in results if r["M"] == m and r["N"] == n), key=lambda r: -r["fraction_of_copy"])
            lines.append(f"M={m} N={n} (padded_n={rows[0]['padded_n']}, copy {rows[0]['copy_us']:.2f} us)")
            lines.append(f"  {'rank':>4} | {'tile':>22} | {'padded us':>10} | {'of copy':>8} | {'padded/quant':>12}")
            for rank, r in enumerate(rows, 1):
                lines.append(f"  {rank:>4} | {r['tile']:>22} | {r['padded_us']:>10.2f} | "
                             f"{100 * r['fraction_of_copy']:>7.1f}% | {r['padding_overhead']:>11.3f}x")
    # Across shapes: a tile is as good as its worst shape. The default's tile differs by shape; it is one entry.
    by_tile: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_tile.setdefault(r["tile"].split(" (")[0], []).append(r)
    ranked = sorted(by_tile.items(), key=lambda item: -min(r["fraction_of_copy"] for r in item[1]))
    lines.append("all shapes, ranked by the worst shape's % of copy bandwidth")
    lines.append(f"  {'rank':>4} | {'tile':>22} | {'worst of copy':>13} | {'mean of copy':>12} | {'worst padded/quant':>18}")
    for rank, (label, rows) in enumerate(ranked, 1):
        worst = min(r["fraction_of_copy"] for r in rows)
        mean = statistics.mean(r["fraction_of_copy"] for r in rows)
        overhead = max(r["padding_overhead"] for r in rows)
        lines.append(f"  {rank:>4} | {label:>22} | {100 * worst:>12.1f}% | {100 * mean:>11.1f}% | {overhead:>17.3f}x")
    return "\n".join(lines)


def parse_tile(text: str | None) -> TileShape | None:
    if text is None:
        return None
    return TileShape(*(int(v) for v in text.split(",")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two M, one N, fewer replays (about 20 s)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "./bench_out")
    parser.add_argument("--layout", choices=("swizzled", "linear"), default="swizzled")
    parser.add_argument("--tile", help="BLOCK_M,BLOCK_K,NUM_WARPS[,PROGRAMS_PER_SM,STAGES] instead of the default tile")
    parser.add_argument("--sweep", action="store_true", help="rank CANDIDATE_TILES at M >= 1024 (under a minute)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_nvfp4_quant needs a CUDA GPU")
    os.makedirs(args.out, exist_ok=True)

    if args.sweep:
        title = header(args.layout, None) + " | tile sweep"
        results = sweep(args.layout, replays=10)
        print(title)
        print(format_sweep(results))
        json_path = os.path.join(args.out, "bench_nvfp4_quant_sweep.json")
        with open(json_path, "w") as f:
            json.dump({"title": title, "rows": results}, f, indent=2)
        print(f"wrote {json_path}")
        return

    tile = parse_tile(args.tile)
    m_values, n_values = (QUICK_M, QUICK_N) if args.quick else (M_VALUES, N_VALUES)
    replays = 10 if args.quick else 30
    rows = [measure(m, n, args.layout, tile, replays) for n in n_values for m in m_values]

    title = header(args.layout, tile)
    print(title)
    print(format_table(rows))
    for line in summary(rows):
        print(line)

    json_path = os.path.join(args.out, "bench_nvfp4_quant.json")
    with open(json_path, "w") as f:
        json.dump({"title": title, "rows": rows, "summary": summary(rows)}, f, indent=2)
    plot(rows, title, os.path.join(args.out, "bench_nvfp4_quant.png"))
    print(f"wrote {json_path}")


if __name__ == "__main__":
    main()
