"""FP8 attention for vision encoders on one GPU: the Q/K/V quantize kernel, then FP8 vs bf16 attention.

    source scripts/gpu_setup.sh && python scripts/bench_fp8_attention.py [--quick] [--out DIR]

Kernel (``fusionpasses.qkv_fp8_quant``), per head_dim D in {64, 72, 80, 128} and for Q as a strided
view of a fused QKV projection and as a contiguous tensor: the fused kernel (its flat path where it
applies, and the row path), the eager composite (div, clamp, cast, pad), the same composite compiled
by Inductor (no fusionpasses pass), the plain static FP8 quantize op where D is aligned, and a device
copy of the same bytes. Targets: >= 75% of the copy's bandwidth, >= 2x the eager composite.

Attention, packed sequences of S tokens (S from 1024 to 16384, 32768 tokens in all), 16 heads,
D in {72, 80}: bf16 FlashAttention varlen (what the encoder runs today), bf16 SDPA on the dense batch,
FP8 attention alone (pre-quantized), and FP8 end to end (three quantize kernels + FP8 attention) with
static and with dynamic scales. Speedups are against the faster bf16 path; accuracy is the relative
RMS error against bf16 FlashAttention. The table ends with the crossover length to compare with
``fusionpasses.kernels.fp8_attention.FP8_ATTENTION_MIN_SEQLEN`` and the cuDNN output dtypes that
work on this GPU.

Times are medians of ``triton.testing.do_bench`` (it flushes L2 between calls); kernel inputs rotate
over two buffers larger than L2. Writes bench_fp8_attention.json and .png to --out ($OUT if set).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import triton.testing

import fusionpasses.kernels  # noqa: F401  (registers the ops)
import fusionpasses.kernels.fp8_attention as fa
from fusionpasses.fp8_attention_scales import DynamicFP8AttentionScales
from fusionpasses.kernels.qkv_fp8_quant import padded_head_dim, quantize_pad_fp8

FP8 = torch.float8_e4m3fn
BF16 = torch.bfloat16
HEADS = 16


def bench(fn: Callable[[], Any], rep_ms: int) -> float:
    """Median milliseconds per call."""
    return float(triton.testing.do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms, return_mode="median"))


def composite(x: torch.Tensor, scale: torch.Tensor, pad: int) -> torch.Tensor:
    return F.pad((x.float() / scale).clamp(-448.0, 448.0).to(FP8), (0, pad))


# ---------------------------------------------------------------------------------------------
# quantize kernel
# ---------------------------------------------------------------------------------------------


def kernel_case(head_dim: int, layout: str, tokens: int, rep_ms: int, compile_composite: bool) -> dict[str, Any]:
    pad = padded_head_dim(head_dim) - head_dim
    g = torch.Generator(device="cuda").manual_seed(head_dim)
    if layout == "strided":  # Q of qkv.view(T, 3, H, D)
        buffers = [
            torch.randn(tokens, 3, HEADS, head_dim, device="cuda", dtype=BF16, generator=g)[:, 0] for _ in range(2)
        ]
    else:
        buffers = [torch.randn(tokens, HEADS, head_dim, device="cuda", dtype=BF16, generator=g) for _ in range(2)]
    scale = torch.tensor([0.01], device="cuda")
    rotation = itertools.cycle(buffers)
    copy_src = [torch.empty(tokens * HEADS * head_dim, device="cuda", dtype=BF16) for _ in range(2)]
    copy_dst = torch.empty_like(copy_src[0])
    copy_rotation = itertools.cycle(copy_src)

    variants: dict[str, Callable[[], Any]] = {
        "fused": lambda: quantize_pad_fp8(next(rotation), scale, pad),
        "eager": lambda: composite(next(rotation), scale, pad),
        "copy": lambda: copy_dst.copy_(next(copy_rotation)),
    }
    if layout == "contiguous" and pad == 0:
        variants["fused_rows"] = lambda: quantize_pad_fp8(next(rotation), scale, pad, path="rows")
        if hasattr(torch.ops.fusionpasses, "quant_fp8_static"):
            variants["plain_quant"] = lambda: torch.ops.fusionpasses.quant_fp8_static(next(rotation), scale)
    if compile_composite:
        torch._dynamo.reset()
        compiled = torch.compile(lambda x: composite(x, scale, pad), dynamic=False)
        variants["inductor"] = lambda: compiled(next(rotation))

    ms = {name: bench(fn, rep_ms) for name, fn in variants.items()}
    moved = tokens * HEADS * (head_dim * 2 + (head_dim + pad))  # bf16 read + fp8 written
    copy_bytes = tokens * HEADS * head_dim * 2 * 2
    gbps = {name: (copy_bytes if name == "copy" else moved) / (t * 1e-3) / 1e9 for name, t in ms.items()}
    return dict(
        head_dim=head_dim,
        layout=layout,
        tokens=tokens,
        ms=ms,
        gbps=gbps,
        pct_of_copy=100 * gbps["fused"] / gbps["copy"],
        speedup_vs_eager=ms["eager"] / ms["fused"],
        speedup_vs_inductor=ms["inductor"] / ms["fused"] if "inductor" in ms else None,
    )


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


def attention_case(seqlen: int, head_dim: int, total_tokens: int, rep_ms: int) -> dict[str, Any]:
    batch = max(1, total_tokens // seqlen)
    tokens = batch * seqlen
    g = torch.Generator(device="cuda").manual_seed(seqlen + head_dim)
    qkv = torch.randn(tokens, 3, HEADS, head_dim, device="cuda", dtype=BF16, generator=g)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    cu = torch.arange(0, tokens + 1, seqlen, device="cuda", dtype=torch.int32)
    static = [(t.float().abs().amax() / 448.0).reshape(1) for t in (q, k, v)]
    dynamic = DynamicFP8AttentionScales()
    quant = torch.ops.fusionpasses.qkv_fp8_quant
    attend = torch.ops.fusionpasses.fp8_attention
    q8, k8, v8 = (quant(t, s) for t, s in zip((q, k, v), static))

    def dense(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch, seqlen, HEADS, head_dim).transpose(1, 2)

    def fp8_end_to_end(scales: list[torch.Tensor]) -> torch.Tensor:
        a, b, c = (quant(t, s) for t, s in zip((q, k, v), scales))
        return attend(a, b, c, *scales, cu, seqlen, head_dim, BF16)

    variants: dict[str, Callable[[], Any]] = {
        "bf16_flash_varlen": lambda: fa.varlen_attention(q, k, v, cu, seqlen),
        "bf16_sdpa_dense": lambda: F.scaled_dot_product_attention(dense(q), dense(k), dense(v)),
        "fp8_attention_only": lambda: attend(q8, k8, v8, *static, cu, seqlen, head_dim, BF16),
        "fp8_static_e2e": lambda: fp8_end_to_end(static),
        "fp8_dynamic_e2e": lambda: fp8_end_to_end(list(dynamic.qkv_scales("bench", q, k, v))),
    }
    out_fp8 = fp8_end_to_end(static)  # also builds the cuDNN graph before timing
    path = fa.fp8_attention_report()["last_path"]
    out_bf16 = fa.varlen_attention(q, k, v, cu, seqlen)
    ms = {name: bench(fn, rep_ms) for name, fn in variants.items()}
    best_bf16 = min(ms["bf16_flash_varlen"], ms["bf16_sdpa_dense"])
    flops = 4 * batch * seqlen * seqlen * HEADS * head_dim
    return dict(
        seqlen=seqlen,
        head_dim=head_dim,
        batch=batch,
        ms=ms,
        path=path,
        tflops={n: flops / (t * 1e-3) / 1e12 for n, t in ms.items()},
        speedup={n: best_bf16 / t for n, t in ms.items()},
        rel_rms_vs_bf16=rel_rms(out_fp8, out_bf16),
        max_abs_err_vs_bf16=(out_fp8.float() - out_bf16.float()).abs().max().item(),
    )


def crossover(attention: list[dict[str, Any]], variant: str) -> dict[str, int | None]:
    """Per head_dim, the shortest length from which ``variant`` beats bf16 at every longer length."""
    result: dict[str, int | None] = {}
    for d in sorted({r["head_dim"] for r in attention}):
        rows = sorted((r for r in attention if r["head_dim"] == d), key=lambda r: r["seqlen"])
        winning = None
        for r in reversed(rows):
            if r["speedup"][variant] <= 1.0:
                break
            winning = r["seqlen"]
        result[f"D={d}"] = winning
    return result


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def print_tables(
    meta: dict[str, Any], kernel: list[dict[str, Any]], attention: list[dict[str, Any]], summary: dict[str, Any]
) -> None:
    print(
        f"\nFP8 attention benchmark | {meta['device']} | torch {meta['torch']} | triton {meta['triton']} "
        f"| {meta['date']}"
    )
    print("\nqkv_fp8_quant (bf16 -> e4m3, head_dim padded to 16); us per call, GB/s = (bf16 read + fp8 written) / time")
    columns = [
        ("fused", "fused"),
        ("fused_rows", "rows"),
        ("plain_quant", "plain"),
        ("eager", "eager"),
        ("inductor", "inductor"),
        ("copy", "copy"),
    ]
    print(
        f"{'D':>4} {'layout':>10} "
        + " ".join(f"{label:>9}" for _, label in columns)
        + f" {'GB/s':>7} {'%copy':>6} {'x eager':>8} {'x induct':>9}"
    )
    for r in kernel:
        cells = " ".join(f"{r['ms'][name] * 1e3:9.1f}" if name in r["ms"] else f"{'-':>9}" for name, _ in columns)
        vs_inductor = f"{r['speedup_vs_inductor']:9.2f}" if r["speedup_vs_inductor"] else f"{'-':>9}"
        print(
            f"{r['head_dim']:>4} {r['layout']:>10} {cells} {r['gbps']['fused']:7.0f} {r['pct_of_copy']:6.1f} "
            f"{r['speedup_vs_eager']:8.2f} {vs_inductor}"
        )
    print("\nattention, packed sequences of S tokens, 16 heads; ms per call and speedup vs the faster bf16 path")
    names = ["bf16_flash_varlen", "bf16_sdpa_dense", "fp8_attention_only", "fp8_static_e2e", "fp8_dynamic_e2e"]
    print(f"{'D':>4} {'S':>6} {'B':>3} " + " ".join(f"{n:>19}" for n in names) + f" {'relRMS':>7}  path")
    for r in attention:
        cells = " ".join(f"{r['ms'][n]:8.3f} ({r['speedup'][n]:5.2f}x)  " for n in names)
        print(f"{r['head_dim']:>4} {r['seqlen']:>6} {r['batch']:>3} {cells}{r['rel_rms_vs_bf16']:7.4f}  {r['path']}")
    print("\nFP8 end-to-end wins from S = (per head_dim; None: not at the longest length measured)")
    for name, value in summary["crossover"].items():
        print(f"  {name}: {value}")
    print(f"  fusionpasses.kernels.fp8_attention.FP8_ATTENTION_MIN_SEQLEN = {fa.FP8_ATTENTION_MIN_SEQLEN}")
    print("cuDNN FP8 graph output dtypes on this GPU:")
    for dtype, status in summary["cudnn_output_dtypes"].items():
        print(f"  {dtype}: {status}")


def plot(kernel: list[dict[str, Any]], attention: list[dict[str, Any]], meta: dict[str, Any], path: str) -> None:
    import matplotlib  # optional: only for the figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_k, ax_a) = plt.subplots(1, 2, figsize=(13, 4.5))
    labels = [f"D={r['head_dim']}\n{r['layout']}" for r in kernel]
    xs = range(len(kernel))
    for offset, name, label in (
        (-0.27, "fused", "fused kernel"),
        (0.0, "inductor", "composite, Inductor"),
        (0.27, "eager", "composite, eager"),
    ):
        ax_k.bar(
            [x + offset for x in xs],
            [100 * r["gbps"].get(name, 0.0) / r["gbps"]["copy"] for r in kernel],
            width=0.27,
            label=label,
        )
    ax_k.axhline(75, color="gray", linestyle="--", linewidth=1, label="target 75%")
    ax_k.set_xticks(list(xs), labels, fontsize=7)
    ax_k.set_ylabel("% of device-copy bandwidth")
    ax_k.set_title("qkv_fp8_quant")
    ax_k.legend(fontsize=7)
    for d in sorted({r["head_dim"] for r in attention}):
        rows = [r for r in attention if r["head_dim"] == d]
        for name, style in (("fp8_static_e2e", "-o"), ("fp8_dynamic_e2e", "--s"), ("fp8_attention_only", ":^")):
            ax_a.plot([r["seqlen"] for r in rows], [r["speedup"][name] for r in rows], style, label=f"D={d} {name}")
    ax_a.axhline(1.0, color="gray", linewidth=1)
    ax_a.set_xscale("log", base=2)
    ax_a.set_xlabel("sequence length S")
    ax_a.set_ylabel("speedup vs faster bf16 attention")
    ax_a.set_title("FP8 attention")
    ax_a.legend(fontsize=6)
    fig.suptitle(f"{meta['device']} | torch {meta['torch']} | {meta['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a ~20-second smoke run")
    parser.add_argument("--out", default=os.environ.get("OUT") or "bench_out")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_fp8_attention needs a CUDA GPU")

    meta = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        quick=args.quick,
    )
    if args.quick:
        head_dims, tokens, seqlens, att_dims, total, rep = (72, 128), 1 << 16, (1024, 4096), (72,), 1 << 14, 20
    else:
        head_dims, tokens, seqlens, att_dims, total, rep = (
            (64, 72, 80, 128),
            1 << 17,
            (1024, 2048, 4096, 8192, 16384),
            (72, 80),
            1 << 15,
            100,
        )

    output_dtypes = fa.cudnn_fp8_output_dtype_report()
    kernel = [
        kernel_case(d, layout, tokens, rep, compile_composite=not args.quick)
        for d in head_dims
        for layout in ("strided", "contiguous")
    ]
    attention = [attention_case(s, d, total, rep) for d in att_dims for s in seqlens]
    summary = dict(
        crossover={
            f"{v} {d}": s for v in ("fp8_static_e2e", "fp8_dynamic_e2e") for d, s in crossover(attention, v).items()
        },
        cudnn_output_dtypes=output_dtypes,
        cudnn_gate=fa.cudnn_fp8_unsupported_reason() or "supported",
        op_report=fa.fp8_attention_report(),
    )
    print_tables(meta, kernel, attention, summary)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_fp8_attention.json"), "w") as f:
        json.dump(dict(meta=meta, kernel=kernel, attention=attention, summary=summary), f, indent=2, default=str)
    plot(kernel, attention, meta, os.path.join(args.out, "bench_fp8_attention.png"))
    print(f"\nwrote {args.out}/bench_fp8_attention.json and .png")


if __name__ == "__main__":
    main()
