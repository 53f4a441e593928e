"""Batch invariance of ``fusionpasses.batch_invariant_fp8_gemm`` on a GPU, and of a compiled FP8 MLP
in batch-invariant mode.

    pytest -s -q tests/gpu/test_batch_invariant.py

``-s`` shows the table of shapes where cuBLAS (``torch._scaled_mm`` and bf16 ``mm``) changed a row
with the batch size; that table is data, not a failure. Set OUT=<dir> to also save it as JSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
import torch

import fusionpasses
from fusionpasses import FusionConfig, PassManager
from fusionpasses.kernels.batch_invariant_fp8_gemm import (
    TileConfig,
    batch_invariant_fp8_gemm_triton,
    reference_batch_invariant_fp8_gemm,
    tile_config,
)

pytestmark = pytest.mark.gpu

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
op = torch.ops.fusionpasses.batch_invariant_fp8_gemm


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token quantization: fp8 rows and their (M, 1) float32 dequantization scales."""
    scale = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


@dataclass
class FP8Linear:
    """An FP8 linear layer: (N, K) weight, per-tensor or per-channel weight scale, optional bias;
    activations quantized per token, or per tensor with a static calibration scale."""

    weight: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None
    act_scale: torch.Tensor | None
    out_dtype: torch.dtype

    @staticmethod
    def random(N: int, K: int, per_channel: bool, bias: bool, static_act: bool, out_dtype: torch.dtype) -> FP8Linear:
        w = torch.randn(N, K, device="cuda") / K**0.5
        if per_channel:
            w_scale = w.abs().amax(-1).float().unsqueeze(0) / FP8_MAX
            weight = quantize_static(w, w_scale.t())
        else:
            w_scale = w.abs().amax().float() / FP8_MAX
            weight = quantize_static(w, w_scale)
        return FP8Linear(
            weight=weight,
            weight_scale=w_scale,
            bias=torch.randn(N, device="cuda", dtype=out_dtype) if bias else None,
            act_scale=torch.tensor(4.0 / FP8_MAX, device="cuda") if static_act else None,
            out_dtype=out_dtype,
        )

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.act_scale is None:
            return quantize_rows(x)
        return quantize_static(x, self.act_scale), self.act_scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        q, scale = self.quantize(x)
        return op(q, self.weight.t(), scale, self.weight_scale, self.bias, self.out_dtype)


def needle_outputs(layer, needle: torch.Tensor, filler: torch.Tensor, batch: int) -> tuple[torch.Tensor, ...]:
    """The needle's output alone, first in a batch of ``batch`` rows and last in it."""
    rows = filler[: batch - 1]
    return layer(needle)[0], layer(torch.cat([needle, rows]))[0], layer(torch.cat([rows, needle]))[-1]


# ---- the seed's test ---------------------------------------------------------------------------


@pytest.mark.parametrize("weight_shape", [(1024, 2048), (4608, 4096)])
@pytest.mark.parametrize("batch_size", [1, 16, 17, 32, 64, 65, 256, 257])
@torch.inference_mode()
def test_seed_needle_is_bitwise_batch_invariant(weight_shape, batch_size):
    """Per-token dynamic activations, per-tensor static weight, bf16 out (the seed's layer)."""
    torch.manual_seed(0)
    N, K = weight_shape
    layer = FP8Linear.random(N, K, per_channel=False, bias=False, static_act=False, out_dtype=torch.bfloat16)
    needle = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    filler = torch.randn(max(batch_size - 1, 0), K, device="cuda", dtype=torch.bfloat16)
    alone, first, last = needle_outputs(layer, needle, filler, batch_size)
    torch.testing.assert_close(first, alone, rtol=0, atol=0)
    torch.testing.assert_close(last, alone, rtol=0, atol=0)


# ---- wider: shapes, batch sizes, scales, bias, output dtypes ----------------------------------

BATCH_SIZES = [1, 2, 7, 16, 31, 64, 65, 127, 128, 129, 255, 257, 1000, 1023, 2049, 4097, 8191]

# (N, K, weight per channel, bias, static per-tensor activations, out dtype): every tile_config
# class, the small-N / large-K shapes where cuBLAS splits K, and each option on and off.
WIDE_CASES = [
    (1024, 2048, True, True, False, torch.bfloat16),
    (4608, 4096, False, True, True, torch.float16),
    (4096, 4096, True, False, True, torch.bfloat16),
    (14336, 4096, True, True, False, torch.float16),
    (2048, 7168, False, False, False, torch.float16),
    (128, 8192, True, False, False, torch.bfloat16),
    (256, 16384, False, True, False, torch.bfloat16),
    (512, 28672, True, True, True, torch.float16),
]


@pytest.mark.parametrize("N,K,per_channel,bias,static_act,out_dtype", WIDE_CASES)
@torch.inference_mode()
def test_needle_is_bitwise_batch_invariant_wide(N, K, per_channel, bias, static_act, out_dtype):
    torch.manual_seed(1)
    layer = FP8Linear.random(N, K, per_channel, bias, static_act, out_dtype)
    needle = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    filler = torch.randn(max(BATCH_SIZES) - 1, K, device="cuda", dtype=torch.bfloat16)
    alone = layer(needle)[0]
    for batch in BATCH_SIZES:
        _, first, last = needle_outputs(layer, needle, filler, batch)
        torch.testing.assert_close(first, alone, rtol=0, atol=0, msg=f"needle first, batch {batch}")
        torch.testing.assert_close(last, alone, rtol=0, atol=0, msg=f"needle last, batch {batch}")


@torch.inference_mode()
def test_batched_3d_needle_is_bitwise_batch_invariant():
    """The bmm_fp8 layout (b weights, e.g. MLA heads): one head's needle row, across batch sizes."""
    torch.manual_seed(2)
    heads, K, N = 4, 512, 128
    weight = (torch.randn(heads, N, K, device="cuda") * 0.1).to(FP8)
    w_scale = torch.tensor(0.01, device="cuda")
    needle = (torch.randn(heads, 1, K, device="cuda") * 8).to(FP8)
    filler = (torch.randn(heads, 4096, K, device="cuda") * 8).to(FP8)

    def run(A: torch.Tensor) -> torch.Tensor:
        scale = torch.full((heads, A.shape[1], 1), 0.02, device="cuda")
        return op(A, weight.transpose(1, 2), scale, w_scale, None, torch.bfloat16)

    alone = run(needle)[:, 0]
    for batch in (2, 17, 64, 65, 300, 4097):
        rows = filler[:, : batch - 1]
        torch.testing.assert_close(run(torch.cat([needle, rows], 1))[:, 0], alone, rtol=0, atol=0)
        torch.testing.assert_close(run(torch.cat([rows, needle], 1))[:, -1], alone, rtol=0, atol=0)
        per_head = op(needle[2], weight[2].t(), torch.full((1, 1), 0.02, device="cuda"), w_scale, None, torch.bfloat16)
        torch.testing.assert_close(per_head[0], alone[2], rtol=0, atol=0)


# ---- structural variants: persistent, warp-specialized, TMA-store epilogue --------------------

STRUCTURAL_VARIANTS = {
    "persistent": {"persistent": True},
    "persistent+ws": {"persistent": True, "warp_specialize": True},
    "ws": {"warp_specialize": True},
    "persistent+tma-store": {"persistent": True, "tma_store": True},
    "persistent+ws+tma-store/2": {"persistent": True, "warp_specialize": True, "tma_store": True, "epilogue_subtiles": 2},
}


def plain(cfg: TileConfig) -> TileConfig:
    return replace(cfg, persistent=False, warp_specialize=False, tma_store=False, epilogue_subtiles=1)


@pytest.mark.parametrize("N,K", [(2048, 7168), (4096, 4096), (14336, 1024)])
@pytest.mark.parametrize("variant", sorted(STRUCTURAL_VARIANTS))
@torch.inference_mode()
def test_structural_variant_gives_the_plain_kernels_bits(variant, N, K):
    """A scheduling or store variant of a tile shape computes every tile with the same instructions:
    its output is the plain kernel's bit for bit, and a needle row keeps its bits across batch sizes
    (first and last, the persistent schedule changing with M). Covers each tile_config class."""
    torch.manual_seed(9)
    cfg = replace(plain(tile_config(N, K)), **STRUCTURAL_VARIANTS[variant])
    layer = FP8Linear.random(N, K, per_channel=True, bias=True, static_act=False, out_dtype=torch.bfloat16)

    def run(x: torch.Tensor, config: TileConfig) -> torch.Tensor:
        q, scale = layer.quantize(x)
        return batch_invariant_fp8_gemm_triton(q, layer.weight.t(), scale, layer.weight_scale, layer.bias,
                                               torch.bfloat16, config=config)

    x = torch.randn(4097, K, device="cuda", dtype=torch.bfloat16)
    try:
        run(x[:1], cfg)
    except Exception as error:  # only a compiler rejection is a skip (the sweep reports it too)
        message = str(error)
        if type(error).__module__.startswith("triton") or "PassManager" in message or "out of resource" in message.lower():
            pytest.skip(f"{cfg} does not compile with this Triton: {message.splitlines()[0][:200] if message else ''}")
        raise
    for M in (1, 130, 4097):
        torch.testing.assert_close(run(x[:M], cfg), run(x[:M], plain(cfg)), rtol=0, atol=0, msg=f"M={M}")
    needle, filler = x[:1], x[1:]
    alone = run(needle, cfg)[0]
    for batch in (2, 17, 65, 130, 1000, 4097):
        rows = filler[: batch - 1]
        torch.testing.assert_close(run(torch.cat([needle, rows]), cfg)[0], alone, rtol=0, atol=0, msg=f"first, {batch}")
        torch.testing.assert_close(run(torch.cat([rows, needle]), cfg)[-1], alone, rtol=0, atol=0, msg=f"last, {batch}")


@torch.inference_mode()
def test_structural_variants_on_batched_3d_inputs():
    """bmm layout: the persistent loop walks tiles of every batch, and the TMA store clips each
    batch at its own row M (a 2-D store would write into the next batch)."""
    torch.manual_seed(10)
    heads, M, K, N = 3, 70, 512, 192
    A = (torch.randn(heads, M, K, device="cuda") * 4).to(FP8)
    W = (torch.randn(heads, N, K, device="cuda") * 0.1).to(FP8)
    A_scale, B_scale = torch.rand(heads, M, 1, device="cuda") + 0.5, torch.rand(heads, 1, N, device="cuda") + 0.5
    base = plain(tile_config(N, K))
    expected = batch_invariant_fp8_gemm_triton(A, W.transpose(1, 2), A_scale, B_scale, None, torch.float16, config=base)
    for variant, flags in STRUCTURAL_VARIANTS.items():
        out = batch_invariant_fp8_gemm_triton(A, W.transpose(1, 2), A_scale, B_scale, None, torch.float16,
                                              config=replace(base, **flags))
        torch.testing.assert_close(out, expected, rtol=0, atol=0, msg=variant)


# ---- accuracy --------------------------------------------------------------------------------

SCALE_MODES = [("tensor", "tensor"), ("token", "channel"), ("token", "tensor"), ("tensor", "channel")]


def make_scales(mode: tuple[str, str], M: int, N: int) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.rand(M, 1, device="cuda") + 0.5 if mode[0] == "token" else torch.rand((), device="cuda") + 0.5
    b = torch.rand(1, N, device="cuda") + 0.5 if mode[1] == "channel" else torch.rand((), device="cuda") + 0.5
    return a, b


# Every scale combination once, across the three tile_config classes (each new combination is
# another Triton compile, so not the full cross product).
EXACT_CASES = [(1, 4096, 64, SCALE_MODES[0]), (77, 2048, 3072, SCALE_MODES[1]), (300, 4096, 8192, SCALE_MODES[2]),
               (129, 1024, 14336, SCALE_MODES[3])]


@pytest.mark.parametrize("M,K,N,mode", EXACT_CASES, ids=[f"{c[0]}x{c[1]}x{c[2]}-{'x'.join(c[3])}" for c in EXACT_CASES])
@torch.inference_mode()
def test_exact_on_small_integers(M, K, N, mode):
    """Integer-valued fp8 inputs (|x| <= 2): every partial sum is exact in the tensor core and in fp32,
    so scaling, bias, rounding and the fp32 promotion are checked bit for bit against the reference."""
    torch.manual_seed(3)
    A = torch.randint(-2, 3, (M, K), device="cuda").float().to(FP8)
    W = torch.randint(-2, 3, (N, K), device="cuda").float().to(FP8)
    A_scale, B_scale = make_scales(mode, M, N)
    for bias, out_dtype in ((None, torch.bfloat16), (torch.randn(N, device="cuda"), torch.float16)):
        out = op(A, W.t(), A_scale, B_scale, bias, out_dtype)
        ref = reference_batch_invariant_fp8_gemm(
            A.cpu(), W.t().cpu(), A_scale.cpu(), B_scale.cpu(), None if bias is None else bias.cpu(), out_dtype
        )
        torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=0)


@pytest.mark.parametrize("M,K,N", [(1, 4096, 4096), (77, 7168, 2048), (300, 4096, 14336), (1024, 28672, 256)])
@pytest.mark.parametrize("rowwise", [False, True], ids=["tensorwise", "rowwise"])
@torch.inference_mode()
def test_accuracy_vs_scaled_mm_and_fp32(M, K, N, rowwise):
    torch.manual_seed(4)
    A, A_scale = quantize_rows(torch.randn(M, K, device="cuda"))
    W = (torch.randn(N, K, device="cuda") * 3).to(FP8)
    B_scale = torch.rand(1, N, device="cuda") * 0.01 + 0.005
    if not rowwise:
        A_scale, B_scale = A_scale.max(), B_scale.max()
    exact = (A.float().double() @ W.float().double().t()) * (A_scale.double() * B_scale.double())
    ours = op(A, W.t(), A_scale, B_scale, None, torch.bfloat16).double()
    cublas = torch._scaled_mm(A, W.t(), A_scale, B_scale, out_dtype=torch.bfloat16).double()
    atol = 1e-3 * exact.abs().max().item()
    torch.testing.assert_close(ours, exact, rtol=2**-8, atol=atol)
    torch.testing.assert_close(ours, cublas, rtol=2**-7, atol=atol)
    # No less accurate than cuBLAS (with its fp32 promotion, use_fast_accum=False).
    assert (ours - exact).abs().max() <= 1.5 * (cublas - exact).abs().max() + 1e-6 * exact.abs().max()


@pytest.mark.parametrize("M,K,N", [(300, 4096, 4096), (257, 16384, 256)])
@torch.inference_mode()
def test_fast_accum_is_batch_invariant_and_less_accurate_than_promoted(M, K, N):
    """use_fast_accum=True (no fp32 promotion) is still one instruction sequence per row. Over long K it
    loses accuracy -- which shows the flag reaches the hardware -- but stays within a loose bound."""
    torch.manual_seed(8)
    A, A_scale = quantize_rows(torch.randn(M, K, device="cuda"))
    W = (torch.randn(N, K, device="cuda") * 3).to(FP8)
    B_scale = torch.rand(1, N, device="cuda") * 0.01 + 0.005
    fast = op(A, W.t(), A_scale, B_scale, None, torch.bfloat16, use_fast_accum=True)
    for batch in (1, 17, 64, 65, M):
        rows = op(A[:batch], W.t(), A_scale[:batch], B_scale, None, torch.bfloat16, use_fast_accum=True)
        torch.testing.assert_close(rows, fast[:batch], rtol=0, atol=0, msg=f"batch {batch}")
        last = op(A[M - batch:], W.t(), A_scale[M - batch:], B_scale, None, torch.bfloat16, use_fast_accum=True)
        torch.testing.assert_close(last, fast[M - batch:], rtol=0, atol=0, msg=f"last rows, batch {batch}")
    exact = (A.float().double() @ W.float().double().t()) * (A_scale.double() * B_scale.double())
    promoted = op(A, W.t(), A_scale, B_scale, None, torch.bfloat16)
    cublas_fast = torch._scaled_mm(A, W.t(), A_scale, B_scale, out_dtype=torch.bfloat16, use_fast_accum=True)
    err = {name: (out.double() - exact).abs().max().item() / exact.abs().max().item()
           for name, out in (("ours fast", fast), ("ours promoted", promoted), ("cuBLAS fast", cublas_fast))}
    print(f"\nmax error / max |exact|, M={M} K={K} N={N}: " + ", ".join(f"{k} {v:.2e}" for k, v in err.items()))
    assert err["ours fast"] <= 0.05, err
    if K >= 16384:  # long enough for the reduced-precision accumulator to lose more than bf16 rounding
        assert err["ours promoted"] < err["ours fast"], err


# ---- where cuBLAS is not batch-invariant, and ours is ------------------------------------------

SEARCH_N = (128, 256, 512)
SEARCH_K = (8192, 16384, 28672)
SEARCH_M = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257,
            511, 512, 513, 1023, 1024, 1025, 2047, 2048, 2049, 4095, 4096, 4097]


def search_variants(w: torch.Tensor, act_scale: torch.Tensor) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The GEMMs compared in the search, each mapping bf16 activations to bf16 outputs for weight ``w``."""
    w_scale_t = w.abs().amax().float() / FP8_MAX
    w_scale_c = w.abs().amax(-1).float().unsqueeze(0) / FP8_MAX
    w_t, w_c = quantize_static(w, w_scale_t), quantize_static(w, w_scale_c.t())

    def ours_token_tensor(a: torch.Tensor) -> torch.Tensor:
        q, s = quantize_rows(a)
        return op(q, w_t.t(), s, w_scale_t, None, torch.bfloat16)

    def ours_tensor_channel(a: torch.Tensor) -> torch.Tensor:
        return op(quantize_static(a, act_scale), w_c.t(), act_scale, w_scale_c, None, torch.bfloat16)

    def cublas_tensorwise(a: torch.Tensor) -> torch.Tensor:
        q = quantize_static(a, act_scale)
        return torch._scaled_mm(q, w_t.t(), act_scale, w_scale_t, out_dtype=torch.bfloat16)

    def cublas_rowwise(a: torch.Tensor) -> torch.Tensor:
        q, s = quantize_rows(a)
        return torch._scaled_mm(q, w_c.t(), s, w_scale_c, out_dtype=torch.bfloat16)

    def cublas_bf16(a: torch.Tensor) -> torch.Tensor:
        return torch.mm(a, w.t())

    return {
        "ours token x tensor": ours_token_tensor,
        "ours tensor x channel": ours_tensor_channel,
        "cuBLAS _scaled_mm tensorwise": cublas_tensorwise,
        "cuBLAS _scaled_mm rowwise": cublas_rowwise,
        "cuBLAS bf16 mm": cublas_bf16,
    }


def batch_sizes_that_change_the_needle(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> list[int]:
    """The M in SEARCH_M where row 0 of ``x``, first or last in a batch of M rows, leaves ``fn`` changed."""
    needle, filler = x[:1], x[1:]
    alone = fn(needle)[0]
    return [m for m in SEARCH_M if m > 1 and not (
        torch.equal(fn(torch.cat([needle, filler[: m - 1]]))[0], alone)
        and torch.equal(fn(torch.cat([filler[: m - 1], needle]))[-1], alone))]


@torch.inference_mode()
def test_find_where_cublas_varies_and_ours_does_not():
    """Small N with large K is where cuBLAS turns to split-K / stream-K, and its choice follows M."""
    torch.manual_seed(5)
    findings: dict[str, dict[str, list[int]]] = {}
    ours_varied: list[str] = []
    for N in SEARCH_N:
        for K in SEARCH_K:
            x = torch.randn(max(SEARCH_M), K, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
            act_scale = (x.abs().amax().float() / FP8_MAX).reshape(())
            for name, fn in search_variants(w, act_scale).items():
                varied = batch_sizes_that_change_the_needle(fn, x)
                if varied:
                    findings.setdefault(name, {})[f"N={N} K={K}"] = varied
                    if name.startswith("ours"):
                        ours_varied.append(f"{name} N={N} K={K}: M={varied}")
    _report_variation(findings)
    assert not ours_varied, ours_varied


def _report_variation(findings: dict[str, dict[str, list[int]]]) -> None:
    print(f"\nRows that changed with the batch size (needle first or last), {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}:")
    if not findings:
        print("  none: no variant changed a row for these shapes")
    for name, shapes in sorted(findings.items()):
        for shape, ms in shapes.items():
            print(f"  {name:<30} {shape:<16} M in {ms}")
    out_dir = os.environ.get("OUT")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "batch_invariance_cublas_variation.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "varied": findings}, f, indent=1)


# ---- compile mode ----------------------------------------------------------------------------


class FP8MLP(torch.nn.Module):
    """gate_up -> silu*mul -> down -> a narrow head: per-token activations, per-channel weights."""

    def __init__(self, hidden: int = 4096, intermediate: int = 1024, head: int = 256) -> None:
        super().__init__()
        for name, (n, k) in {"gate_up": (2 * intermediate, hidden), "down": (hidden, intermediate), "head": (head, hidden)}.items():
            w = torch.randn(n, k, device="cuda") / k**0.5
            scale = w.abs().amax(-1).float().unsqueeze(0) / FP8_MAX
            self.register_buffer(f"{name}_w", quantize_static(w, scale.t()))
            self.register_buffer(f"{name}_s", scale)
        self.register_buffer("down_bias", torch.randn(hidden, device="cuda", dtype=torch.bfloat16) * 0.1)

    def linear(self, x: torch.Tensor, name: str, bias: torch.Tensor | None = None) -> torch.Tensor:
        q, s = quantize_rows(x)
        return torch._scaled_mm(q, getattr(self, f"{name}_w").t(), s, getattr(self, f"{name}_s"), bias=bias,
                                out_dtype=torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.linear(x, "gate_up").chunk(2, dim=-1)
        h = self.linear(torch.nn.functional.silu(gate) * up, "down", self.down_bias)
        return self.linear(h, "head")


@torch.inference_mode()
def test_compiled_fp8_mlp_rows_are_bitwise_batch_invariant():
    torch.manual_seed(6)
    model = FP8MLP()
    options = fusionpasses.compile_options(FusionConfig(batch_invariant=True))
    manager: PassManager = options["post_grad_custom_post_pass"]
    compiled = torch.compile(model, options=options)
    needle = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    filler = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    with torch._inductor.config.patch(fx_graph_cache=False):
        alone = compiled(needle)[0]
        for batch in (3, 16, 64, 65, 257, 1024, 4097):
            first_in = torch.cat([needle, filler[: batch - 1]])
            if batch == 3:
                torch._dynamo.mark_dynamic(first_in, 0)
            first = compiled(first_in)
            torch.testing.assert_close(first[0], alone, rtol=0, atol=0, msg=f"needle first, batch {batch}")
            last = compiled(torch.cat([filler[: batch - 1], needle]))[-1]
            torch.testing.assert_close(last, alone, rtol=0, atol=0, msg=f"needle last, batch {batch}")
            # Still the eager model's function: three re-quantized FP8 layers apart only by rounding
            # (a flipped fp8 step moves a value by up to 12%, so compare the whole output).
            eager = model(first_in).float()
            assert (first.float() - eager).norm() <= 0.03 * eager.norm(), f"batch {batch}"
    stats = manager.pass_by_name("batch_invariant").stats
    assert stats.matched_count("scaled_mm") == 3 * len(stats.runs) and not stats.declined, manager.report()


@torch.inference_mode()
def test_compiled_bmm_fp8_is_rewritten_and_batch_invariant():
    """bmm_fp8 traced through its fake impl and replaced: FlashInfer is never called."""
    torch.manual_seed(7)
    heads, K, N = 8, 512, 128
    weight = (torch.randn(heads, N, K, device="cuda") * 0.1).to(FP8)
    scale = torch.tensor([0.02], device="cuda")

    def absorbed(q: torch.Tensor) -> torch.Tensor:
        a = quantize_static(q, scale)
        return torch.ops.fusionpasses.bmm_fp8(a, weight.transpose(1, 2), scale, scale, torch.bfloat16)

    options = fusionpasses.compile_options(FusionConfig(batch_invariant=True))
    compiled = torch.compile(absorbed, options=options)
    needle = torch.randn(heads, 1, K, device="cuda")
    filler = torch.randn(heads, 1024, K, device="cuda")
    with torch._inductor.config.patch(fx_graph_cache=False):
        alone = compiled(needle)[:, 0]
        for batch in (5, 64, 65, 1025):
            x = torch.cat([filler[:, : batch - 1], needle], 1)
            if batch == 5:
                torch._dynamo.mark_dynamic(x, 1)
            torch.testing.assert_close(compiled(x)[:, -1], alone, rtol=0, atol=0, msg=f"batch {batch}")
    assert options["post_grad_custom_post_pass"].pass_by_name("batch_invariant").stats.matched_count("bmm_fp8") >= 1
