"""The batch-invariant FP8 GEMM on CPU: the Triton kernel in the interpreter against the reference,
needle rows across batch sizes, batched (3-D) calls, layouts the launcher must copy, input checks,
and the rule that the tile configuration never looks at M."""

from __future__ import annotations

import inspect
import re
from dataclasses import replace

import pytest
import torch

from fusionpasses.kernels import KernelInputError
from fusionpasses.kernels.batch_invariant_fp8_gemm import (
    INTERPRETER_PROGRAMS,
    TILE_RULES,
    WGMMA_M,
    TileConfig,
    batch_invariant_fp8_gemm_triton,
    reference_batch_invariant_fp8_gemm,
    tile_config,
)

FP8 = torch.float8_e4m3fn
op = torch.ops.fusionpasses.batch_invariant_fp8_gemm

# (M, K, N): edge rows (1, odd, one past a tile), K and N below, at and off the tile sizes.
SHAPES = [
    (1, 16, 16),
    (17, 48, 80),
    (64, 128, 64),
    (65, 272, 144),
    (130, 256, 48),
]
# One shape per wider tile_config class (128-wide N tiles; 256-wide on two warpgroups), each costing
# seconds in the interpreter: one scale mode each.
WIDE_N_CASES = [(3, 128, 3072, "tensor_channel"), (2, 128, 8192, "token_tensor")]
SCALES = ["tensor", "token_channel", "token_tensor", "tensor_channel"]


def small_ints(*shape: int, generator: torch.Generator) -> torch.Tensor:
    """fp8 values in [-8, 8]: every product and partial sum is exact in fp32, in any order."""
    return torch.randint(-8, 9, shape, generator=generator).float().to(FP8)


def scales_for(mode: str, batch: tuple[int, ...], M: int, N: int, g: torch.Generator):
    per_token = torch.rand(*batch, M, 1, generator=g) + 0.5
    per_channel = torch.rand(*batch, 1, N, generator=g) + 0.5
    a = per_token if mode.startswith("token") else torch.rand(1, generator=g) + 0.5
    b = per_channel if mode.endswith("channel") else (torch.rand((), generator=g) + 0.5)
    return a, b


def assert_matches_reference(out: torch.Tensor, ref: torch.Tensor) -> None:
    if out.dtype == torch.float16:
        # numpy's fp32 -> fp16 cast rounds to nearest even, like torch: bit for bit.
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    else:
        # Triton's interpreter truncates fp32 -> bf16 where the GPU and torch round to nearest:
        # at most one bf16 ulp apart.
        torch.testing.assert_close(out.float(), ref.float(), rtol=2**-7, atol=0)


@pytest.mark.parametrize(
    "M,K,N,scales", [(*shape, scales) for shape in SHAPES for scales in SCALES] + WIDE_N_CASES
)
def test_kernel_matches_reference(M, K, N, scales):
    g = torch.Generator().manual_seed(M * 7 + K + N)
    A = small_ints(M, K, generator=g)
    B = small_ints(N, K, generator=g).t()
    A_scale, B_scale = scales_for(scales, (), M, N, g)
    case = M + K // 16 + SCALES.index(scales)
    bias = [None, torch.randn(N, generator=g).to(torch.bfloat16), torch.randn(N, generator=g)][case % 3]
    out_dtype = (torch.float16, torch.bfloat16)[case % 2]
    out = batch_invariant_fp8_gemm_triton(A, B, A_scale, B_scale, bias, out_dtype)
    ref = reference_batch_invariant_fp8_gemm(A, B, A_scale, B_scale, bias, out_dtype)
    assert out.shape == (M, N) and out.dtype == out_dtype
    assert_matches_reference(out, ref)


@pytest.mark.parametrize("scales", ["tensor", "token_channel"])
def test_kernel_batched_matches_each_batch(scales):
    g = torch.Generator().manual_seed(1)
    b, M, K, N = 3, 20, 64, 48
    A = small_ints(b, M, K, generator=g)
    B = small_ints(b, N, K, generator=g).transpose(1, 2)
    A_scale, B_scale = scales_for(scales, (b,), M, N, g)
    if scales == "tensor":
        A_scale = A_scale.reshape(())
    out = batch_invariant_fp8_gemm_triton(A, B, A_scale, B_scale, None, torch.float16)
    assert out.shape == (b, M, N)
    assert_matches_reference(out, reference_batch_invariant_fp8_gemm(A, B, A_scale, B_scale, None, torch.float16))
    for z in range(b):
        a_s = A_scale[z] if A_scale.dim() == 3 else A_scale
        b_s = B_scale[z] if B_scale.dim() == 3 else B_scale
        alone = batch_invariant_fp8_gemm_triton(A[z], B[z], a_s, b_s, None, torch.float16)
        torch.testing.assert_close(out[z], alone, rtol=0, atol=0)


def test_kernel_accuracy_on_general_values():
    """Random (not integer) fp8 values: within fp32 summation-order noise of the reference."""
    g = torch.Generator().manual_seed(2)
    M, K, N = 33, 512, 80
    A = (torch.randn(M, K, generator=g) * 3).to(FP8)
    B = (torch.randn(N, K, generator=g) * 3).to(FP8).t()
    A_scale, B_scale = torch.rand(M, 1, generator=g) + 0.1, torch.rand(1, N, generator=g) + 0.1
    out = batch_invariant_fp8_gemm_triton(A, B, A_scale, B_scale, None, torch.float16)
    ref = reference_batch_invariant_fp8_gemm(A, B, A_scale, B_scale, None, torch.float16)
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=1e-2)


def order_sensitive_row(K: int, g: torch.Generator) -> torch.Tensor:
    """A row whose product with ``order_sensitive_weight`` cancels two huge partial sums (+-16*448^2,
    in different K tiles) down to a small one: any change of the K summation order changes the fp32
    rounding of the huge partials, which then shows at half precision after the cancellation."""
    row = torch.randn(1, K, generator=g)
    row[0, :16] = 448.0
    row[0, 128:144] = -448.0
    return row.to(FP8)


def order_sensitive_weight(N: int, K: int, g: torch.Generator) -> torch.Tensor:
    W = torch.randn(N, K, generator=g)
    W[:, :16] = 448.0
    W[:, 128:144] = 448.0
    return W.to(FP8)


def batches_with_needle(needle: torch.Tensor, filler: torch.Tensor, batch: int, where: str) -> torch.Tensor:
    rows = [filler[: batch - 1]]
    rows.insert(0 if where == "first" else 1, needle)
    return torch.cat([r.view(torch.uint8) for r in rows]).view(FP8)


@pytest.mark.parametrize("K,N,scales", [(256, 48, "token_tensor"), (384, 144, "token_channel")])
def test_needle_row_keeps_its_bits_in_every_batch(K, N, scales):
    """The seed's test in the interpreter, with a needle sharp enough to show any change of the K order.

    Only the needle-first half: the interpreter's numpy matmul rounds a row differently depending on
    its position inside the 64-row tile (OpenBLAS edge kernels), which the GPU's tensor cores do not;
    tests/gpu/test_batch_invariant.py checks every position.
    """
    g = torch.Generator().manual_seed(3)
    needle = order_sensitive_row(K, g)
    filler = (torch.randn(129, K, generator=g) * 2).to(FP8)
    B = order_sensitive_weight(N, K, g).t()
    _, B_scale = scales_for(scales, (), 1, N, g)
    needle_scale = torch.tensor([[0.37]])
    filler_scale = torch.rand(129, 1, generator=g) + 0.5
    bias = torch.randn(N, generator=g).to(torch.bfloat16)
    alone = batch_invariant_fp8_gemm_triton(needle, B, needle_scale, B_scale, bias, torch.float16)
    for batch in (2, 16, 17, 64, 65, 130):
        A = batches_with_needle(needle, filler, batch, "first")
        A_scale = torch.cat([needle_scale, filler_scale[: batch - 1]])
        out = batch_invariant_fp8_gemm_triton(A, B, A_scale, B_scale, bias, torch.float16)
        torch.testing.assert_close(out[0], alone[0], rtol=0, atol=0, msg=f"batch {batch}")


@pytest.mark.parametrize("where", ["first", "last"])
def test_needle_row_value_does_not_depend_on_other_rows(where):
    """Exact (integer-valued) data, so the interpreter's rounding cannot hide a wrong row, scale or
    mask: the needle's output is the same wherever it sits and whatever fills the batch."""
    g = torch.Generator().manual_seed(6)
    K, N = 160, 80
    needle, filler = small_ints(1, K, generator=g), small_ints(129, K, generator=g)
    B = small_ints(N, K, generator=g).t()
    B_scale = torch.rand(1, N, generator=g) + 0.5
    needle_scale, filler_scale = torch.tensor([[0.37]]), torch.rand(129, 1, generator=g) + 0.5
    alone = batch_invariant_fp8_gemm_triton(needle, B, needle_scale, B_scale, None, torch.float16)
    for batch in (2, 63, 64, 65, 130):
        A = batches_with_needle(needle, filler, batch, where)
        parts = [filler_scale[: batch - 1]]
        parts.insert(0 if where == "first" else 1, needle_scale)
        out = batch_invariant_fp8_gemm_triton(A, B, torch.cat(parts), B_scale, None, torch.float16)
        torch.testing.assert_close(out[0 if where == "first" else -1], alone[0], rtol=0, atol=0, msg=f"batch {batch}")


def test_order_sensitive_needle_detects_a_different_k_order():
    """The needle above is sharp enough to fail if the K tile (the summation order) changed."""
    g = torch.Generator().manual_seed(3)
    K, N = 256, 48
    needle, B = order_sensitive_row(K, g), order_sensitive_weight(N, K, g).t()
    one = torch.tensor([[1.0]])
    args = (needle, B, one, torch.tensor(1.0), None, torch.float16)
    chosen = batch_invariant_fp8_gemm_triton(*args)
    for block_k in (32, 64, 256):
        other = batch_invariant_fp8_gemm_triton(*args, config=TileConfig(64, 64, block_k, 8, 4, 2))
        assert not torch.equal(other, chosen), f"block_k={block_k} gave the same bits: the needle is too blunt"


# ---- structural variants: the same bits, whatever the schedule and the store ---------------------

# The interpreter runs each program in turn and ignores warp specialization and loop flattening:
# here the variants check their indexing (persistent tile loop, 3-D TMA store clipping at M and N,
# epilogue slices); the sm90 compile check below checks that they compile, the GPU tests their bits.
BASE = TileConfig(64, 64, 128, group_m=2, num_warps=4, num_stages=2)
VARIANTS = {
    "persistent": replace(BASE, persistent=True),
    "ws": replace(BASE, warp_specialize=True),
    "tma-store": replace(BASE, tma_store=True),
    "persistent+ws+tma-store": replace(BASE, persistent=True, warp_specialize=True, tma_store=True),
    "persistent+tma-store/2": replace(BASE, persistent=True, tma_store=True, epilogue_subtiles=2),
}
# (batch, M, K, N): one tile; 3 x 3 tiles, so each of the interpreter's persistent programs loops
# over three, with rows and columns past M and N; 4 batches of a part-filled tile each.
VARIANT_SHAPES = [((), 1, 48, 80), ((), 130, 256, 144), ((4,), 20, 64, 48)]


@pytest.mark.parametrize("shape", VARIANT_SHAPES, ids=lambda s: "x".join(map(str, (*s[0], *s[1:]))))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_matches_reference_exactly(variant, shape):
    batch, M, K, N = shape
    assert 130 // BASE.block_m * (144 // BASE.block_n) > INTERPRETER_PROGRAMS
    g = torch.Generator().manual_seed(M + K + N)
    A = small_ints(*batch, M, K, generator=g)
    B = small_ints(*batch, N, K, generator=g).transpose(-1, -2)
    A_scale, B_scale = scales_for("token_channel", batch, M, N, g)
    bias = torch.randn(N, generator=g).to(torch.bfloat16)
    out = batch_invariant_fp8_gemm_triton(A, B, A_scale, B_scale, bias, torch.float16, config=VARIANTS[variant])
    assert out.shape == (*batch, M, N)
    assert_matches_reference(out, reference_batch_invariant_fp8_gemm(A, B, A_scale, B_scale, bias, torch.float16))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_needle_keeps_the_default_variants_bits(variant):
    """A row alone and placed first in batches of 1..130 gets the bits the default schedule gives it
    (an order-sensitive needle: any other K order would show), and exact rows keep their value
    first or last."""
    g = torch.Generator().manual_seed(7)
    K, N = 256, 48
    cfg = VARIANTS[variant]
    needle, filler = order_sensitive_row(K, g), (torch.randn(129, K, generator=g) * 2).to(FP8)
    B = order_sensitive_weight(N, K, g).t()
    B_scale = torch.rand(1, N, generator=g) + 0.5
    needle_scale, filler_scale = torch.tensor([[0.37]]), torch.rand(129, 1, generator=g) + 0.5
    expected = batch_invariant_fp8_gemm_triton(needle, B, needle_scale, B_scale, None, torch.float16, config=BASE)[0]
    for batch in (1, 17, 65, 130):
        A = batches_with_needle(needle, filler, batch, "first")
        A_scale = torch.cat([needle_scale, filler_scale[: batch - 1]])
        out = batch_invariant_fp8_gemm_triton(A, B, A_scale, B_scale, None, torch.float16, config=cfg)
        torch.testing.assert_close(out[0], expected, rtol=0, atol=0, msg=f"batch {batch}")
    exact_needle, exact_filler = small_ints(1, K, generator=g), small_ints(129, K, generator=g)
    exact_B = small_ints(N, K, generator=g).t()
    alone = batch_invariant_fp8_gemm_triton(exact_needle, exact_B, needle_scale, B_scale, None, torch.float16, config=cfg)
    for batch in (17, 130):
        A = batches_with_needle(exact_needle, exact_filler, batch, "last")
        A_scale = torch.cat([filler_scale[: batch - 1], needle_scale])
        out = batch_invariant_fp8_gemm_triton(A, exact_B, A_scale, B_scale, None, torch.float16, config=cfg)
        torch.testing.assert_close(out[-1], alone[0], rtol=0, atol=0, msg=f"needle last, batch {batch}")


def test_launcher_copies_layouts_tma_cannot_read():
    g = torch.Generator().manual_seed(4)
    M, K, N = 9, 64, 32
    A = small_ints(M, K, generator=g)
    W = small_ints(2, N, K, generator=g)
    A_scale, B_scale = torch.tensor(0.5), torch.tensor(0.25)
    # A at a 1-byte offset: dense but not 16-byte aligned.
    storage = torch.empty(M * K + 1, dtype=torch.uint8)
    unaligned = storage[1:].view(FP8).view(M, K)
    unaligned.copy_(A)
    assert unaligned.data_ptr() % 16
    aligned = batch_invariant_fp8_gemm_triton(A, W[0].t(), A_scale, B_scale, None, torch.float16)
    torch.testing.assert_close(
        batch_invariant_fp8_gemm_triton(unaligned, W[0].t(), A_scale, B_scale, None, torch.float16), aligned, rtol=0, atol=0
    )
    # A weight shared by every batch through a zero batch stride.
    A3 = small_ints(2, M, K, generator=g)
    shared = W[:1].transpose(1, 2).expand(2, K, N)
    out = batch_invariant_fp8_gemm_triton(A3, shared, A_scale, B_scale, None, torch.float16)
    for z in range(2):
        torch.testing.assert_close(
            out[z], batch_invariant_fp8_gemm_triton(A3[z], W[0].t(), A_scale, B_scale, None, torch.float16), rtol=0, atol=0
        )


def test_zero_rows():
    A = torch.empty(0, 32, dtype=FP8)
    B = torch.zeros(16, 32, dtype=FP8).t()
    args = (A, B, torch.empty(0, 1), torch.tensor(1.0), None, torch.bfloat16)
    assert batch_invariant_fp8_gemm_triton(*args).shape == (0, 16)
    assert op(*args).shape == (0, 16)


def _valid(**overrides):
    g = torch.Generator().manual_seed(5)
    args = {
        "A": small_ints(4, 32, generator=g),
        "B": small_ints(16, 32, generator=g).t(),
        "A_scale": torch.ones(4, 1),
        "B_scale": torch.ones(1, 16),
        "bias": None,
        "out_dtype": torch.bfloat16,
    }
    args.update(overrides)
    return args


BAD_INPUTS = {
    "A dtype": ({"A": torch.zeros(4, 32, dtype=torch.bfloat16)}, "A must have dtype"),
    "e5m2 B": ({"B": torch.zeros(16, 32, dtype=torch.float8_e5m2).t()}, "B must have dtype"),
    "1-D A": ({"A": torch.zeros(32, dtype=FP8)}, "A must be 2-D"),
    "rank mismatch": ({"B": torch.zeros(1, 16, 32, dtype=FP8).transpose(1, 2)}, "B must have A's rank"),
    "batch mismatch": (
        {"A": torch.zeros(2, 4, 32, dtype=FP8), "B": torch.zeros(3, 16, 32, dtype=FP8).transpose(1, 2),
             "A_scale": torch.ones(1)},
        "batch sizes differ",
    ),
    "K mismatch": ({"B": torch.zeros(16, 48, dtype=FP8).t()}, "K differs"),
    "K alignment": (
        {"A": torch.zeros(4, 24, dtype=FP8), "B": torch.zeros(16, 24, dtype=FP8).t()},
        "K (24) must be divisible by 16",
    ),
    "N alignment": ({"B": torch.zeros(24, 32, dtype=FP8).t(), "B_scale": torch.ones(1)}, "N (24) must be divisible by 16"),
    "A column-major": ({"A": torch.zeros(32, 4, dtype=FP8).t()}, "A must be row-major"),
    "B row-major": ({"B": torch.zeros(32, 16, dtype=FP8)}, "B must be column-major"),
    "A_scale dtype": ({"A_scale": torch.ones(4, 1, dtype=torch.float16)}, "A_scale must be float32"),
    "A_scale shape": ({"A_scale": torch.ones(1, 4)}, "A_scale must have one element"),
    "B_scale shape": ({"B_scale": torch.ones(16)}, "B_scale must have one element"),
    "bias shape": ({"bias": torch.zeros(8, dtype=torch.bfloat16)}, "bias must have shape (16,)"),
    "bias dtype": ({"bias": torch.zeros(16, dtype=torch.float64)}, "bias must have dtype"),
    "out dtype": ({"out_dtype": torch.float32}, "out_dtype must be bfloat16 or float16"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_rejects_bad_inputs_with_clear_errors(case):
    overrides, message = BAD_INPUTS[case]
    args = _valid(**overrides)
    for fn in (op, batch_invariant_fp8_gemm_triton):
        with pytest.raises(KernelInputError, match="fusionpasses.batch_invariant_fp8_gemm: .*" + re.escape(message)):
            fn(*args.values())


def test_tile_config_is_a_function_of_n_and_k_only():
    assert list(inspect.signature(tile_config).parameters) == ["N", "K"]
    for N in (16, 48, 128, 1024, 2048, 3072, 4096, 5120, 8192, 14336, 28672):
        for K in (16, 128, 1024, 4096, 7168, 28672):
            cfg = tile_config(N, K)
            assert isinstance(cfg, TileConfig)
            assert cfg.block_m in (WGMMA_M, 2 * WGMMA_M) and cfg.block_k == 128
            # Hopper has 227 KiB of shared memory per block; the pipeline buffers must fit.
            assert cfg.smem_bytes() <= 200 * 1024
            # The accumulator and its promotion buffer, with room left of the 255 registers.
            assert 2 * cfg.accumulator_regs_per_thread() <= 128


@pytest.mark.parametrize(
    "fields,message",
    [
        ((64, 8, 128, 8, 4, 3), "power of two"),
        ((48, 64, 128, 8, 4, 3), "power of two"),
        ((32, 64, 128, 8, 4, 3), "block_m must be 64 or 128"),
        ((128, 64, 128, 8, 4, 3), "a warpgroup"),
        ((64, 64, 128, 8, 6, 3), "num_warps must be 4 or 8"),
        ((64, 64, 128, 0, 4, 3), "must be positive"),
        ((64, 64, 128, 8, 4, 3, False, False, True, 3), "epilogue_subtiles must be 1 or 2"),
        ((64, 16, 128, 8, 4, 3, False, False, True, 2), "slices >= 16 columns"),
        ((64, 64, 128, 8, 4, 3, True, False, False, 2), "needs tma_store=True"),
    ],
)
def test_tile_config_rejects_shapes_the_kernel_cannot_take(fields, message):
    with pytest.raises(ValueError, match=message):
        TileConfig(*fields)


def test_tile_config_follows_the_first_matching_rule():
    for N, K in ((2048, 7168), (4096, 4096), (14336, 4096), (16, 16)):
        rule = next(r for r in TILE_RULES if N >= r.min_n and K >= r.min_k)
        expected = replace(rule.config, num_stages=min(rule.config.num_stages, max(2, K // rule.config.block_k)))
        assert tile_config(N, K) == expected
    # The last rule takes every weight: no (N, K) is left without a config.
    assert (TILE_RULES[-1].min_n, TILE_RULES[-1].min_k) == (0, 0)


# ---- the sm90 compile, checked without a GPU ------------------------------------------------------

# A fresh process: this one runs Triton's interpreter (TRITON_INTERPRET=1), the compiler needs it off.
_COMPILE_FOR_SM90 = """
import json, re, sys
from dataclasses import replace
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fusionpasses.kernels import batch_invariant_fp8_gemm as bi


def compile_for_sm90(cfg, fast):
    slice_n = cfg.block_n // cfg.epilogue_subtiles
    signature = {
        "a_desc": f"tensordesc<fp8e4nv[{cfg.block_m}, {cfg.block_k}]>",
        "b_desc": f"tensordesc<fp8e4nv[{cfg.block_n}, {cfg.block_k}]>",
        "out_ptr": "*bf16",
        "out_desc": f"tensordesc<bf16[1, {cfg.block_m}, {slice_n}]>" if cfg.tma_store else "*bf16",
        "a_scale_ptr": "*fp32", "b_scale_ptr": "*fp32", "bias_ptr": "*bf16",
        "M": "i32", "N": "i32", "K": "i32", **({"BATCH": "i32"} if cfg.persistent else {}),
    }
    constexprs = {"A_PER_ROW": True, "B_PER_COL": True, "HAS_BIAS": True, "FAST_ACCUM": fast,
                  "OUT_DTYPE": tl.bfloat16, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                  "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m, "WARP_SPECIALIZE": cfg.warp_specialize,
                  "TMA_STORE": cfg.tma_store, "SUBTILES": cfg.epilogue_subtiles,
                  **({"NUM_SMS": 132} if cfg.persistent else {})}
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    kernel = bi._persistent_kernel if cfg.persistent else bi._kernel
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options=bi.launch_options(cfg))
    ptx = compiled.asm["ptx"]
    return {
        "tma": "cp.async.bulk.tensor" in ptx,
        "tma_store": "cp.async.bulk.tensor.3d.global.shared" in ptx,
        "wgmma": sorted(set(re.findall(r"wgmma\\.mma_async\\.sync\\.aligned\\.(m\\d+n\\d+k\\d+)\\.f32\\.e4m3\\.e4m3", ptx))),
        "f32_adds": ptx.count("add.rn.f32"), "f32_fmas": ptx.count("fma.rn.f32"),
        "shared": compiled.metadata.shared, "block_n": cfg.block_n,
        "warpgroups_along_n": cfg.num_warps * 64 // (4 * cfg.block_m),
    }


results = {}
for N, K in json.loads(sys.argv[1]):
    cfg = bi.tile_config(N, K)
    for fast in (False, True):
        results[f"N={N} K={K} fast={fast}"] = {**compile_for_sm90(cfg, fast), "expect_tma_store": cfg.tma_store}
# Every structural flag once, on the two warp counts.
small, wide = bi.TileConfig(64, 128, 128, 8, 4, 4), bi.TileConfig(128, 128, 128, 8, 8, 4)
variants = {"persistent+ws": replace(small, persistent=True, warp_specialize=True),
            "ws+tma-store": replace(small, warp_specialize=True, tma_store=True),
            "persistent+tma-store/2": replace(wide, persistent=True, tma_store=True, epilogue_subtiles=2)}
for name, cfg in variants.items():
    for fast in (False, True):
        results[f"variant {name} fast={fast}"] = {**compile_for_sm90(cfg, fast), "expect_tma_store": cfg.tma_store}
print(json.dumps(results))
"""


def test_kernel_compiles_for_hopper():
    """Triton compiles each tile_config class and each structural variant for sm90 ahead of time (no
    device needed; this Triton, which may be newer than the GPU machines'): TMA loads, one e4m3 wgmma
    shape per config, shared memory within the 227 KiB, fp32 promotion adds only when not
    fast-accumulating, a TMA store only where asked for, and no FMA contraction."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    import triton

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton build has no NVIDIA backend")
    shapes = [(2048, 7168), (4096, 4096), (14336, 4096)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_SM90, json.dumps(shapes)],
        env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True, timeout=300, check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(results) == 2 * len(shapes) + 6
    for name, r in results.items():
        instruction_n = r["block_n"] // r["warpgroups_along_n"]
        assert r["tma"] and r["wgmma"] == [f"m64n{instruction_n}k32"], f"{name}: {r}"
        assert r["shared"] <= 227 * 1024, f"{name}: {r}"
        # The bias add follows the scale multiply: contracted into an FMA unless fusion is off.
        assert r["f32_fmas"] == 0, f"{name}: {r}"
        assert r["tma_store"] == r.get("expect_tma_store", False), f"{name}: {r}"
    configs = [f"N={N} K={K}" for N, K in shapes] + sorted({k.rsplit(" fast=", 1)[0] for k in results if k.startswith("variant")})
    for config in configs:
        # Both add the bias; only the precise one also adds each K tile's partial sums (the fp32
        # promotion, which must survive warp specialization and the persistent loop).
        precise, fast = results[f"{config} fast=False"], results[f"{config} fast=True"]
        assert precise["f32_adds"] > fast["f32_adds"], (config, precise, fast)
