"""Llama-style tensor-parallel layers with FP8 GEMMs: baseline vs sequence parallelism vs SP + AsyncTP.

    source scripts/gpu_setup.sh
    torchrun --nproc-per-node 2 scripts/bench_tp_block.py [--gemm bmm_fp8] [--cudagraphs] [--layers L [--deeper L2]] [--quick] [--out DIR]

The model: ``--layers`` decoder layers at Llama-3-70B sizes (hidden 8192, 64 query / 8 KV heads of 128,
intermediate 28672), split over the ranks like Megatron/vLLM TP:

    q = quant(x);  qkv = gemm(q, W_qkv[rank])               column-parallel
    o = gemm(quant(qkv[:, :local q heads]), W_o[:, rank])   row-parallel (attention left out, below)
    x, residual = fused_add_rms_norm(all_reduce(o), residual)
    gate, up = gemm(quant(x), W_gate_up[rank]).chunk(2)      column-parallel
    d = gemm(quant(silu(gate) * up), W_down[:, rank])        row-parallel
    x, residual = fused_add_rms_norm(all_reduce(d), residual)
    returns x

The block returns ``x`` only. Its last norm stands where a Llama model's final norm stands, and that
one drops its residual output (vLLM's ``hidden_states, _ = self.norm(hidden_states, residual)``);
between layers the residual stays on each rank, token-sharded under SP. Returning it as well made
SP gather a full residual that no model gathers: 0.62 ms of a 27 ms two-layer forward at 16384
tokens (the table's first recordings did; 1.070x against 1.087-1.095x for x alone, 2x H200).

Attention is replaced by passing this rank's query heads through: neither pass touches it, and a
causal attention over one long sequence would dominate the time at the large token counts and hide
what the passes change. GEMMs: ``torch._scaled_mm`` (default) or FlashInfer's ``bmm_fp8``
(``--gemm bmm_fp8``), static per-tensor scales; norms and quantization are the backend's ops.

Variants, each compiled per token count with static shapes:
    baseline     FusionConfig()
    sp           FusionConfig(sequence_parallel=True)                 this GPU family's thresholds
    sp+async_tp  FusionConfig(sequence_parallel=True, async_tp=True)  AsyncTP's cost model decides
Times are medians of per-iteration CUDA-event times after warm-up, the slowest rank's, with the
inputs rotated through copies larger than L2. Without CUDA graphs a forward of a few thousand tokens
is bound by host time (Python launches of every kernel and collective), which SP's extra ops lengthen;
``--cudagraphs`` replays each compiled forward as a CUDA graph, as serving engines do. The table shows ms, the speedup over the baseline,
whether SP applied (it must stay off below the threshold) and how many collectives AsyncTP fused.
``--deeper L2`` runs L2 layers as well and prints what one more layer costs in a deep model (the
difference of the two runs per layer added, ``per_layer``): a short block pays SP's boundary costs
(the last all_gather has no GEMM after it) once for few layers.
"""

from __future__ import annotations

import os

# NVLink multicast stays off (shared hosts forbid it; the fused ops need only peer copies). Set before
# torch initializes NCCL or SymmetricMemory.
for _key in ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "NCCL_NVLS_ENABLE", "NVSHMEM_DISABLE_NVLS"):
    os.environ.setdefault(_key, "0" if _key == "NCCL_NVLS_ENABLE" else "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402

import torch  # noqa: E402
import torch._inductor.cudagraph_trees  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed._functional_collectives as funcol  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fusionpasses.kernels  # noqa: E402,F401
from fusionpasses import FusionConfig, PassManager  # noqa: E402
from fusionpasses.kernels._symm_mem_pipeline import schedules_run  # noqa: E402
from fusionpasses.platform import device_capability, family_name  # noqa: E402

FP8 = torch.float8_e4m3fn
BF16 = torch.bfloat16
fp = torch.ops.fusionpasses
L2_BYTES = 60 << 20

VARIANTS = {
    "baseline": FusionConfig(),
    "sp": FusionConfig(sequence_parallel=True),
    "sp+async_tp": FusionConfig(sequence_parallel=True, async_tp=True),
}


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int = 8192
    heads: int = 64
    kv_heads: int = 8
    head_dim: int = 128
    intermediate: int = 28672


class TPLayers(torch.nn.Module):
    def __init__(self, shape: Shape, layers: int, gemm: str, world_size: int, device: str = "cuda") -> None:
        super().__init__()
        self.gemm = gemm
        self.q_width = shape.heads * shape.head_dim // world_size
        qkv_width = (shape.heads + 2 * shape.kv_heads) * shape.head_dim // world_size
        inter = shape.intermediate // world_size
        g = torch.Generator(device=device).manual_seed(1000 + dist.get_rank())

        def weight(n: int, k: int) -> torch.Tensor:
            # Values with a dequantized std of 1/sqrt(k), so activations stay O(1) through the layers.
            return (torch.randn(n, k, device=device, generator=g) * 16).to(FP8)

        self.weights = [
            (
                weight(qkv_width, shape.hidden),
                weight(shape.hidden, self.q_width),
                weight(2 * inter, shape.hidden),
                weight(shape.hidden, inter),
            )
            for _ in range(layers)
        ]
        self.norm_weights = [
            (torch.ones(shape.hidden, device=device, dtype=BF16), torch.ones(shape.hidden, device=device, dtype=BF16))
            for _ in range(layers)
        ]
        self.act_scale = torch.tensor([8.0 / 448], device=device)
        self.w_scales = {
            k: torch.tensor([1.0 / (16 * k**0.5)], device=device) for k in (shape.hidden, self.q_width, inter)
        }

    def _linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        q = fp.quant_fp8_static(x, self.act_scale)
        w_scale = self.w_scales[w.shape[1]]
        if self.gemm == "scaled_mm":
            return torch._scaled_mm(q, w.t(), self.act_scale, w_scale, out_dtype=BF16)
        return fp.bmm_fp8(q.unsqueeze(0), w.t().unsqueeze(0), self.act_scale, w_scale, BF16, "cublas").squeeze(0)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        group = dist.group.WORLD
        for (w_qkv, w_o, w_gate_up, w_down), (norm_attn, norm_mlp) in zip(self.weights, self.norm_weights, strict=True):
            qkv = self._linear(x, w_qkv)
            o = self._linear(qkv[:, : self.q_width], w_o)
            x, residual = fp.fused_add_rms_norm(funcol.all_reduce(o, "sum", group), residual, norm_attn, 1e-5)
            gate, up = self._linear(x, w_gate_up).chunk(2, dim=-1)
            d = self._linear(F.silu(gate) * up, w_down)
            x, residual = fp.fused_add_rms_norm(funcol.all_reduce(d, "sum", group), residual, norm_mlp, 1e-5)
        return x


def timed(fn, inputs: list[tuple[torch.Tensor, ...]], iters: int, warmup: int = 3) -> float:
    """Median ms of one call, the slowest rank's; each call takes the next input copy."""
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    dist.barrier()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for i, (start, end) in enumerate(events):
        start.record()
        fn(*inputs[i % len(inputs)])
        end.record()
    torch.cuda.synchronize()
    median = torch.tensor([statistics.median(s.elapsed_time(e) for s, e in events)], device="cuda")
    dist.all_reduce(median, op=dist.ReduceOp.MAX)
    return float(median.item())


def run(args: argparse.Namespace) -> dict:
    ws, rank = dist.get_world_size(), dist.get_rank()
    shape = Shape()
    model = TPLayers(shape, args.layers, args.gemm, ws)
    capability = device_capability(FusionConfig())
    rows = []
    for tokens in args.tokens:
        copies = max(1, min(8, -(-2 * L2_BYTES // (2 * tokens * shape.hidden * 2))))
        g = torch.Generator(device="cuda").manual_seed(tokens)  # the same replicated inputs on every rank
        inputs = [
            (torch.randn(tokens, shape.hidden, device="cuda", generator=g).to(BF16),
             torch.randn(tokens, shape.hidden, device="cuda", generator=g).to(BF16))
            for _ in range(copies)
        ]
        iters = max(5, min(args.iters, int(args.iters * 1024 / tokens) + 5))
        row: dict = {"tokens": tokens}
        reference = None
        for name, config in VARIANTS.items():
            torch._dynamo.reset()
            schedules_run.clear()
            pm = PassManager(config)
            # No FX graph cache: a hit replays a graph compiled earlier without running the passes,
            # and the table's SP and AsyncTP counts come from running them.
            options = {"post_grad_custom_post_pass": pm, "triton.cudagraphs": args.cudagraphs, "fx_graph_cache": False}
            compiled = torch.compile(model, options=options, dynamic=False)
            skips_before = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
            out = compiled(*inputs[0]).float()
            if args.cudagraphs and torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] > skips_before:
                row[f"{name}_cudagraph_skipped"] = True
                if rank == 0:
                    print(f"  {name}: Inductor skipped CUDA graphs (see TORCH_LOGS=perf_hints)", flush=True)
            if reference is None:
                reference = out
            row[f"{name}_max_abs_diff"] = float((out - reference).abs().max())
            row[f"{name}_ms"] = timed(compiled, inputs, iters)
            if config.sequence_parallel:
                sp = pm.pass_by_name("sequence_parallel").stats
                row[f"{name}_sp_applied"] = sp.matched
                row[f"{name}_sp_reason"] = sp.declined[0].reason if sp.declined and not sp.matched else ""
            if config.async_tp:
                row[f"{name}_async_tp_fused"] = pm.pass_by_name("async_tp").stats.matched
                # Python calls of the fused ops (compile, warm-up, capture; replays run no Python).
                row[f"{name}_schedules"] = {" ".join(key): n for key, n in sorted(schedules_run.items())}
        for name in VARIANTS:
            row[f"{name}_speedup"] = row["baseline_ms"] / row[f"{name}_ms"]
        rows.append(row)
        if rank == 0:
            print(f"  {tokens} tokens done", flush=True)
    return {
        "device": torch.cuda.get_device_name(),
        "family": family_name(capability),
        "torch": torch.__version__,
        "date": datetime.datetime.now().isoformat(timespec="minutes"),
        "world_size": ws,
        "layers": args.layers,
        "gemm": args.gemm,
        "cudagraphs": args.cudagraphs,
        "shape": dataclasses.asdict(shape),
        "rows": rows,
    }


def table(result: dict) -> str:
    lines = [
        f"# bench_tp_block: {result['layers']} Llama-style TP layers, hidden {result['shape']['hidden']}, "
        f"FP8 {result['gemm']}, ws {result['world_size']}" + (", CUDA graphs" if result["cudagraphs"] else ""),
        f"# {result['device']} ({result['family']}), torch {result['torch']}, {result['date']}",
        f"{'tokens':>7} {'baseline ms':>12} {'sp ms':>9} {'sp+async ms':>12} {'sp x':>6} {'sp+async x':>11}"
        f" {'sp on':>6} {'fused':>6}  max |diff| vs baseline (sp, sp+async)",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['tokens']:>7} {r['baseline_ms']:>12.3f} {r['sp_ms']:>9.3f} {r['sp+async_tp_ms']:>12.3f}"
            f" {r['sp_speedup']:>6.2f} {r['sp+async_tp_speedup']:>11.2f} {r['sp_sp_applied']:>6} "
            f"{r['sp+async_tp_async_tp_fused']:>6}  {r['sp_max_abs_diff']:.3g}, {r['sp+async_tp_max_abs_diff']:.3g}"
        )
    for r in result["rows"]:
        if r.get("sp+async_tp_schedules"):
            ran = ", ".join(f"{key} x{n}" for key, n in r["sp+async_tp_schedules"].items())
            lines.append(f"# {r['tokens']} tokens, fused ops' schedules (calls): {ran}")
    off = [r for r in result["rows"] if not r["sp_sp_applied"]]
    if off:
        lines.append(f"# SP off below its threshold: {off[0]['sp_sp_reason']}")
    return "\n".join(lines)


def per_layer(short: dict, long: dict) -> dict:
    """What one more layer costs in a deep model: the difference of two runs over the same token counts
    with ``short["layers"]`` and ``long["layers"]`` layers, per layer added. The costs a block pays once
    cancel: its last all_gather, which has no GEMM after it (in a model the next layer's QKV
    projection takes it, fused), and its first layer's replicated input."""
    added = long["layers"] - short["layers"]
    rows = []
    for s_row, l_row in zip(short["rows"], long["rows"], strict=True):
        row = {"tokens": s_row["tokens"]}
        for name in VARIANTS:
            row[f"{name}_ms"] = (l_row[f"{name}_ms"] - s_row[f"{name}_ms"]) / added
        for name in VARIANTS:
            row[f"{name}_speedup"] = row["baseline_ms"] / row[f"{name}_ms"]
        rows.append(row)
    return {"layers": [short["layers"], long["layers"]], "rows": rows}


def per_layer_table(result: dict) -> str:
    short, long = result["layers"]
    lines = [
        f"# one more layer (the {long}-layer run minus the {short}-layer run, per layer added)",
        f"{'tokens':>7} {'baseline ms':>12} {'sp ms':>9} {'sp+async ms':>12} {'sp x':>6} {'sp+async x':>11}",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['tokens']:>7} {r['baseline_ms']:>12.3f} {r['sp_ms']:>9.3f} {r['sp+async_tp_ms']:>12.3f}"
            f" {r['sp_speedup']:>6.2f} {r['sp+async_tp_speedup']:>11.2f}"
        )
    return "\n".join(lines)


def plot(result: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    tokens = [r["tokens"] for r in result["rows"]]
    fig, (ax_ms, ax_x) = plt.subplots(1, 2, figsize=(11, 4))
    for name in VARIANTS:
        ax_ms.plot(tokens, [r[f"{name}_ms"] for r in result["rows"]], marker="o", label=name)
        ax_x.plot(tokens, [r[f"{name}_speedup"] for r in result["rows"]], marker="o", label=name)
    for ax in (ax_ms, ax_x):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens (global)")
        ax.legend()
        ax.grid(alpha=0.3)
    ax_ms.set_ylabel("ms per forward")
    ax_x.set_ylabel("speedup vs baseline")
    ax_x.axhline(1.0, color="grey", lw=0.8)
    fig.suptitle(f"{result['device']}, ws {result['world_size']}, {result['layers']} layers, FP8 {result['gemm']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="512,1024,4096,8192,16384", help="global token counts, comma-separated")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--deeper", type=int, default=None,
                        help="also run this many layers and print what one more layer costs (steady state)")
    parser.add_argument("--gemm", choices=("scaled_mm", "bmm_fp8"), default="scaled_mm")
    parser.add_argument("--cudagraphs", action="store_true",
                        help="replay each compiled forward as a CUDA graph (Inductor's CUDA graph trees)")
    parser.add_argument("--iters", type=int, default=40, help="timed calls at 1024 tokens (fewer for more tokens)")
    parser.add_argument("--quick", action="store_true", help="a 20-second smoke run: 2 token counts, 1 layer")
    parser.add_argument("--out", default=os.environ.get("OUT") or "bench_out")
    args = parser.parse_args()
    args.tokens = [int(t) for t in args.tokens.split(",")]
    if args.quick:
        args.tokens, args.layers, args.iters = [512, 4096], 1, 10

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    try:
        ws = dist.get_world_size()
        bad = [t for t in args.tokens if t % ws]
        if bad:
            raise SystemExit(f"token counts must be multiples of the world size {ws}: {bad}")
        if args.deeper is not None and args.deeper <= args.layers:
            raise SystemExit(f"--deeper must exceed --layers ({args.layers}), got {args.deeper}")
        results = []
        for layers in [args.layers] + ([args.deeper] if args.deeper else []):
            with torch.no_grad():
                results.append(run(argparse.Namespace(**{**vars(args), "layers": layers})))
        if dist.get_rank() == 0:
            os.makedirs(args.out, exist_ok=True)
            stem = f"bench_tp_block_{args.gemm}" + ("_cudagraphs" if args.cudagraphs else "")
            for result in results:
                print(table(result))
                name = stem if len(results) == 1 else f"{stem}_layers{result['layers']}"
                json_path = os.path.join(args.out, f"{name}.json")
                with open(json_path, "w") as f:
                    json.dump(result, f, indent=2)
                png_path = os.path.join(args.out, f"{name}.png")
                plotted = plot(result, png_path)
                print(f"wrote {json_path}" + (f" and {png_path}" if plotted else " (no matplotlib: no plot)"))
            if len(results) == 2:
                steady = per_layer(*results)
                print(per_layer_table(steady))
                with open(os.path.join(args.out, f"{stem}_per_layer.json"), "w") as f:
                    json.dump(steady, f, indent=2)
    finally:
        # Graphs that captured NCCL kernels made destroy_process_group hang at exit: free them first.
        torch._dynamo.reset()
        torch._inductor.cudagraph_trees.reset_cudagraph_trees()
        torch.cuda.synchronize()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
