"""Block-scaled FP8 GEMM: the Triton kernel in the CPU interpreter, the ops, and the cond dispatch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from unittest import mock

import pytest
import torch
import torch._dynamo.testing
import triton
from fusionpasses.kernels import block_fp8_gemm as bf
from fusionpasses.kernels.library import KernelInputError

# The issue's M list: aligned, unaligned, 1, and both sides of tile and alignment boundaries.
ISSUE_MS = (1, 2, 3, 4, 5, 127, 128, 129, 4095, 4096)


def exact_operands(M: int, N: int, K: int, scale_row_stride: int | None = None, seed: int = 0):
    """Small-integer fp8 values and power-of-two scales: every product and sum is exact in fp32 in any
    order, so kernel and reference reach the same fp32 value and round it to float16 the same way."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randint(-2, 3, (M, K), generator=g).float().to(torch.float8_e4m3fn)
    B = torch.randint(-2, 3, (N, K), generator=g).float().to(torch.float8_e4m3fn)
    stride = M if scale_row_stride is None else scale_row_stride
    A_scale_t = torch.zeros(K // 128, stride)[:, :M]
    A_scale_t.copy_(2.0 ** torch.randint(-3, 1, (K // 128, M), generator=g).float())
    B_scale = 2.0 ** torch.randint(-3, 1, (-(-N // 128), K // 128), generator=g).float()
    return A, B, A_scale_t, B_scale


def exact_activations(M: int, K: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """A and A_scale_t of :func:`exact_operands` for M rows, seeded by M."""
    A, _, A_scale_t, _ = exact_operands(M, 40, K, seed=M)
    return A, A_scale_t


def random_operands(M: int, N: int, K: int, scale_row_stride: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    A, A_scale_t = bf.quantize_activation_blockwise(torch.randn(M, K, generator=g), scale_row_stride)
    B, B_scale = bf.quantize_weight_blockwise(torch.randn(N, K, generator=g))
    return A, B, A_scale_t, B_scale


def config(block_m: int, block_n: int, group_m: int = 8, split_k: int = 1, **overrides) -> dict[str, int]:
    """A full launch config: the default rule's scale loading, small stages (the interpreter ignores them)."""
    base = bf.launch_config(block_m, block_n, 128, 132)
    base.update(BLOCK_M=block_m, BLOCK_N=block_n, GROUP_M=group_m, SPLIT_K=split_k, num_warps=4, num_stages=2)
    base.update(overrides)
    return base


# Every compile-time variant the sweep can pick. The interpreter ignores warp_specialize (it runs the
# loop as written), so "ws" checks only that the flag leaves the result alone.
VARIANTS = {
    "tma": {"SCALE_LOAD": bf.SCALE_TMA},
    "ptr": {"SCALE_LOAD": bf.SCALE_PTR},
    "ws": {"WARP_SPECIALIZE": True},
}

# (M, N, K, scale row stride, tile): M of 1 and odd M through padded scale rows, M on both sides of
# the 128 tile, N not a multiple of 128 (nor of the tile), one and three K groups.
SHAPES = [
    (1, 8, 128, 4, (64, 64)),
    (3, 200, 384, 4, (64, 64)),
    (4, 136, 128, None, (64, 128)),
    (5, 72, 384, 8, (128, 64)),
    (127, 264, 384, 128, (128, 128)),
    (129, 200, 128, 132, (64, 128)),
]


def _kernel_cases():
    cases = []
    for name, variant in VARIANTS.items():
        for M, N, K, stride, (bm, bn) in SHAPES:
            cfg = config(bm, bn, group_m=2, **variant)
            cases.append(pytest.param(M, N, K, stride, cfg, id=f"{name}-M{M}-N{N}-K{K}"))
    # 256-wide tiles span two weight blocks: per-column weight scales.
    for name in ("tma", "ptr"):
        for M, N, K, stride, bm in ((3, 264, 384, 4, 64), (129, 520, 128, 132, 128), (4, 200, 256, None, 64)):
            cfg = config(bm, 256, **VARIANTS[name])
            cases.append(pytest.param(M, N, K, stride, cfg, id=f"{name}-256-M{M}-N{N}-K{K}"))
    # Split-K with splits of unequal length.
    for name in ("tma", "ptr"):
        cfg2 = config(64, 64, split_k=2, **VARIANTS[name])
        cfg4 = config(128, 64, split_k=4, **VARIANTS[name])
        cases.append(pytest.param(5, 72, 640, 8, cfg2, id=f"{name}-split2-K640"))
        cases.append(pytest.param(68, 136, 1024, None, cfg4, id=f"{name}-split4-K1024"))
    cases.append(pytest.param(4, 16, 128, None, None, id="default-M4-N16"))
    return cases


@pytest.mark.parametrize("M,N,K,row_stride,cfg", _kernel_cases())
def test_kernel_matches_reference_bit_for_bit(M, N, K, row_stride, cfg):
    A, B, A_scale_t, B_scale = exact_operands(M, N, K, row_stride)
    out = torch.full((M, N), float("nan"), dtype=torch.float16)
    bf.launch_block_fp8_mm(A, B, A_scale_t, B_scale, out, cfg)
    assert torch.equal(out, bf.reference_block_fp8_mm(A, B, A_scale_t, B_scale, torch.float16))


@pytest.mark.parametrize("M,N,K,row_stride", [(5, 136, 256, 8), (129, 64, 384, 132), (64, 128, 128, None)])
def test_kernel_bf16_random_within_one_ulp(M, N, K, row_stride):
    A, B, A_scale_t, B_scale = random_operands(M, N, K, row_stride)
    out = torch.empty(M, N, dtype=torch.bfloat16)
    bf.launch_block_fp8_mm(A, B, A_scale_t, B_scale, out)
    ref = bf.reference_block_fp8_mm(A, B, A_scale_t, B_scale, torch.bfloat16)
    # The interpreter truncates fp32 -> bf16 where the GPU rounds to nearest: allow one bf16 ulp.
    torch.testing.assert_close(out, ref, rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"SPLIT_K": 8}, "leaves a split without K groups"),  # 5 groups: 4 splits of 1, then nothing
        ({"SCALE_LOAD": 7}, "unknown SCALE_LOAD"),
        ({"BLOCK_N": 96}, "unsupported tile"),
    ],
)
def test_launch_rejects_bad_configs(overrides, message):
    A, B, A_scale_t, B_scale = exact_operands(4, 16, 640)
    out = torch.empty(4, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=message):
        bf.launch_block_fp8_mm(A, B, A_scale_t, B_scale, out, config(64, 64, **overrides))


def test_launch_config_fills_the_gpu_before_growing_tiles():
    decode = bf.launch_config(1, 2048, 7168, 132)
    assert (decode["BLOCK_M"], decode["BLOCK_N"], decode["SPLIT_K"]) == (64, 64, 4)  # 32 tiles x 4 splits
    assert bf.launch_config(128, 2048, 7168, 132)["BLOCK_N"] == 64  # 16 tiles of 128x128 would idle 116 SMs
    # 144 tiles of 128x128 fill 55% of two waves, 288 of 128x64 73% of three; 128 or 256 tiles fill one or two.
    assert bf.launch_config(128, 18432, 7168, 132)["BLOCK_N"] == 64
    assert bf.launch_config(1024, 2048, 7168, 132)["BLOCK_N"] == 128
    assert bf.launch_config(1, 7168, 2048, 132)["SPLIT_K"] == 1  # 112 tiles already fill the GPU
    assert bf.launch_config(1, 256, 512, 132)["SPLIT_K"] == 1  # 4 K groups: nothing to split
    large = bf.launch_config(16384, 18432, 7168, 132)
    assert (large["BLOCK_M"], large["BLOCK_N"], large["SPLIT_K"], large["num_warps"]) == (128, 128, 1, 8)


def test_launch_config_rules_and_overrides():
    first, last = bf.LAUNCH_RULES[0], bf.LAUNCH_RULES[-1]
    assert bf.launch_config(first.max_m, 7168, 2048, 132)["BLOCK_M"] == first.BLOCK_M
    assert bf.launch_config(first.max_m + 1, 7168, 2048, 132)["SCALE_LOAD"] == last.SCALE_LOAD
    # A tile override is applied before split-K is chosen and is not shrunk to fill the GPU.
    wide = bf.launch_config(1, 2048, 7168, 132, BLOCK_N=256)
    assert (wide["BLOCK_N"], wide["SPLIT_K"]) == (256, 8)  # 8 tiles: split into 8 (the cap)
    assert bf.launch_config(1, 2048, 7168, 132, SPLIT_K=1, SCALE_LOAD=bf.SCALE_PTR)["SPLIT_K"] == 1
    assert bf.launch_config(1, 2048, 7168, 132, SCALE_LOAD=bf.SCALE_PTR)["SCALE_LOAD"] == bf.SCALE_PTR


def test_quantizers_round_trip():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 256, generator=g)
    w = torch.randn(200, 256, generator=g)
    A, A_scale_t = bf.quantize_activation_blockwise(x, scale_row_stride=8)
    B, B_scale = bf.quantize_weight_blockwise(w)
    assert A_scale_t.shape == (2, 6) and A_scale_t.stride() == (8, 1)
    assert B_scale.shape == (2, 2)
    x_back = (A.float().reshape(6, 2, 128) * A_scale_t.t()[:, :, None]).reshape(6, 256)
    w_back = B.float().reshape(200, 2, 128) * B_scale.repeat_interleave(128, 0)[:200, :, None]
    torch.testing.assert_close(x_back, x, rtol=0.07, atol=1e-3)
    torch.testing.assert_close(w_back.reshape(200, 256), w, rtol=0.07, atol=5e-3)


# ---- ops on CPU (reference kernels) ----------------------------------------------------------


@pytest.mark.parametrize("M", [0, 4, 8])
def test_direct_op_matches_reference(M):
    A, B, A_scale_t, B_scale = exact_operands(M, 24, 256)
    out = torch.ops.fusionpasses.block_fp8_mm(A, B, A_scale_t, B_scale, torch.bfloat16)
    assert out.shape == (M, 24) and out.dtype == torch.bfloat16
    assert torch.equal(out, bf.reference_block_fp8_mm(A, B, A_scale_t, B_scale, torch.bfloat16))


@pytest.mark.parametrize("M", [1, 5, 8])
def test_padded_op_matches_reference(M):
    A, B, A_scale_t, B_scale = exact_operands(M, 24, 256)
    out = torch.ops.fusionpasses.block_fp8_mm_padded(A, B, A_scale_t, B_scale, torch.bfloat16)
    assert torch.equal(out, bf.reference_block_fp8_mm(A, B, A_scale_t, B_scale, torch.bfloat16))


def spy_on_gemms(function: str = "reference_block_fp8_mm"):
    """Patches ``bf.<function>`` (the CPU reference, or the GPU launcher) to record, for every GEMM the
    ops run, its M and whether A is the caller's tensor (not a padded copy)."""
    calls: list[tuple[int, bool]] = []
    caller_ptr = [0]
    original = getattr(bf, function)

    def spy(A, *args, **kwargs):
        calls.append((A.shape[0], A.data_ptr() == caller_ptr[0]))
        return original(A, *args, **kwargs)

    return mock.patch.object(bf, function, spy), calls, caller_ptr


def branch_checked_calls(compiled, B, B_scale, activations_for, calls, caller_ptr):
    """Calls ``compiled`` on ``activations_for(M)`` = (A, A_scale_t) for every M of ISSUE_MS, M unbacked (no 0/1 specialization, so M = 1
    shares the graph too), asserting that exactly one GEMM ran, on the caller's A when M is aligned and
    on a padded copy otherwise. Yields (M, A, A_scale_t, out) for the caller's value checks."""
    for M in ISSUE_MS:
        A, A_scale_t = activations_for(M)
        torch._dynamo.decorators.mark_unbacked(A, 0)
        torch._dynamo.decorators.mark_unbacked(A_scale_t, 1)
        calls.clear()
        caller_ptr[0] = A.data_ptr()
        out = compiled(A, B, A_scale_t, B_scale)
        aligned = M % 4 == 0
        assert calls == [(M + (-M) % 4, aligned)], f"M={M}: {'direct' if aligned else 'padded'} branch expected"
        yield M, A, A_scale_t, out


@pytest.mark.parametrize("M,direct", [(3, False), (4, True), (0, True)])
def test_any_m_eager_pads_only_when_unaligned(M, direct):
    A, B, A_scale_t, B_scale = exact_operands(M, 16, 128)
    patch, calls, caller_ptr = spy_on_gemms()
    caller_ptr[0] = A.data_ptr()
    with patch:
        out = bf.block_fp8_mm_any_m(A, B, A_scale_t, B_scale)
    assert calls == [(M + (-M) % 4, direct)]
    assert torch.equal(out, bf.reference_block_fp8_mm(A, B, A_scale_t, B_scale, torch.bfloat16))


def test_any_m_compiles_once_for_every_m_with_both_branches():
    B, B_scale = exact_operands(4, 40, 128, seed=1)[1::2]
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(bf.block_fp8_mm_any_m, backend=counter, fullgraph=True)
    patch, calls, caller_ptr = spy_on_gemms()
    with patch:
        for M, A, A_scale_t, out in branch_checked_calls(compiled, B, B_scale, exact_activations, calls, caller_ptr):
            eager = bf.block_fp8_mm_any_m(A, B, A_scale_t, B_scale)
            reference = bf.reference_block_fp8_mm(A, B, A_scale_t, B_scale, torch.bfloat16)
            assert torch.equal(out, eager) and torch.equal(out, reference), f"M={M}"
    assert counter.frame_count == 1


# ---- validation ------------------------------------------------------------------------------


def _invalid_inputs():
    A, B, A_scale_t, B_scale = exact_operands(4, 16, 256)
    unaligned = exact_operands(5, 16, 256)
    cases = [
        ("multiple of 4", (unaligned[0], B, unaligned[2], B_scale), "block_fp8_mm"),
        ("M-major", (A, B, A_scale_t.t().contiguous().t(), B_scale), "block_fp8_mm"),
        ("float8_e4m3fn", (A.float(), B, A_scale_t, B_scale), "block_fp8_mm"),
        ("K differs", (A, B[:, :128].contiguous(), A_scale_t, B_scale), "block_fp8_mm_padded"),
        ("multiple of 128", (A[:, :64].contiguous(), B[:, :64].contiguous(), A_scale_t[:1], B_scale[:, :1]), "block_fp8_mm"),
        ("multiple of 8", (A, B[:12].contiguous(), A_scale_t, B_scale), "block_fp8_mm"),
        ("B_scale must have shape", (A, B, A_scale_t, B_scale[:, :1].contiguous()), "block_fp8_mm_padded"),
        ("A_scale_t must have shape", (A, B, A_scale_t[:, :3], B_scale), "block_fp8_mm_padded"),
    ]
    return [pytest.param(message, args, op, id=message.replace(" ", "-")) for message, args, op in cases]


@pytest.mark.parametrize("message,args,op", _invalid_inputs())
def test_invalid_inputs_are_rejected_with_the_argument_named(message, args, op):
    with pytest.raises(KernelInputError, match=message):
        getattr(torch.ops.fusionpasses, op)(*args, torch.bfloat16)


def test_direct_op_accepts_any_m_with_aligned_scale_rows():
    A, B, A_scale_t, B_scale = exact_operands(5, 16, 256, scale_row_stride=8)
    out = torch.ops.fusionpasses.block_fp8_mm(A, B, A_scale_t, B_scale, torch.float16)
    assert torch.equal(out, bf.reference_block_fp8_mm(A, B, A_scale_t, B_scale, torch.float16))


# ---- the GPU compile, checked without a GPU --------------------------------------------------


# Runs in a fresh process: this one has the interpreter on (TRITON_INTERPRET=1), the compiler needs it off.
_COMPILE_FOR_SM90 = """
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fusionpasses.kernels import block_fp8_gemm as bf

results = {}
# What the launch rules pick for the issue's grid (tiles, split-K) with the default scale loading,
# then the other scale loadings and a 256-wide tile on 128x128.
cases = [bf.launch_config(M, N, K, 132) for M, N, K in
         [(1, 2048, 7168), (64, 7168, 2048), (128, 2048, 7168), (128, 18432, 7168), (16384, 18432, 7168)]]
big = bf.launch_config(16384, 18432, 7168, 132)
cases += [dict(big, SCALE_LOAD=bf.SCALE_TMA), dict(big, WARP_SPECIALIZE=False),
          dict(big, BLOCK_N=256, SCALE_LOAD=bf.SCALE_PTR, num_stages=3)]
for index, cfg in enumerate(cases):
    bm, bn, split_k = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["SPLIT_K"]
    out = f"tensordesc<bf16[{bm}, {bn}]>" if split_k == 1 else f"tensordesc<fp32[1, {bm}, {bn}]>"
    signature = {
        "a_desc": f"tensordesc<fp8e4nv[{bm}, 128]>", "b_desc": f"tensordesc<fp8e4nv[{bn}, 128]>",
        "a_scale_desc": f"tensordesc<fp32[1, {bm}]>", "a_scale_ptr": "*fp32", "a_scale_row_stride": "i32",
        "b_scale_ptr": "*fp32", "c_desc": out, "M": "i32", "N": "i32", "K": "i32",
        **dict.fromkeys(("BLOCK_M", "BLOCK_N", "GROUP_M", "SPLIT_K", "SCALE_LOAD", "WARP_SPECIALIZE"),
                        "constexpr"),
    }
    constexprs = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "GROUP_M", "SPLIT_K", "SCALE_LOAD")}
    constexprs["WARP_SPECIALIZE"] = bool(cfg["WARP_SPECIALIZE"])
    compiled = triton.compile(
        ASTSource(fn=bf._block_fp8_mm_kernel, signature=signature, constexprs=constexprs),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]},
    )
    ptx = compiled.asm["ptx"]
    name = f"{index}: {bm}x{bn}/split{split_k}/scale{cfg['SCALE_LOAD']}/stages{cfg['num_stages']}"
    results[name] = {
        "tma": "cp.async.bulk.tensor" in ptx, "fp8_wgmma": "wgmma.mma_async" in ptx and "e4m3.e4m3" in ptx,
        "shared": compiled.metadata.shared,
    }
print(json.dumps(results))
"""


def test_kernel_compiles_for_hopper():
    """Triton compiles the kernel for sm90 ahead of time, no device needed: the tile shapes and splits
    the launcher picks lower to TMA loads and fp8 wgmma within the shared memory."""
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_SM90],
        env=env,
        cwd=tempfile.gettempdir(),  # the checkout on sys.path[0] would shadow the installed package
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(results) == 8
    for name, result in results.items():
        assert result["tma"] and result["fp8_wgmma"], f"{name}: {result}"
        assert result["shared"] <= 227 * 1024, f"{name}: {result}"
