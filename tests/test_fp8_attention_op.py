"""fusionpasses.fp8_attention on CPU: the reference, the dequantize + SDPA fallback, the path choice,
and the FlashInfer cuDNN adapter against a stand-in that implements FlashInfer's documented contract."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

import fusionpasses.kernels.fp8_attention as fa
from fusionpasses.kernels import KernelInputError
from fusionpasses.kernels.qkv_fp8_quant import padded_head_dim, reference_qkv_fp8_quant


def cu_seqlens_of(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def quantized_problem(lengths: list[int], heads: int, head_dim: int, seed: int = 0, v_amplitude: float = 1.0):
    """bf16 Q/K/V, their per-tensor FP8 quantization (padded) and the scales."""
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    raw = [torch.randn(total, heads, head_dim, generator=g).to(torch.bfloat16) for _ in range(3)]
    raw[2] = (raw[2].float() * v_amplitude).to(torch.bfloat16)
    scales = [(t.float().abs().amax() / 448.0).reshape(1) for t in raw]
    fp8 = [reference_qkv_fp8_quant(t, s) for t, s in zip(raw, scales)]
    return raw, fp8, scales


def per_sequence_sdpa(q, k, v, lengths, scale=None):
    """An independent varlen attention: SDPA in float64, one sequence at a time."""
    out, start = [], 0
    for n in lengths:
        if n:
            sl = slice(start, start + n)
            o = F.scaled_dot_product_attention(*(t[sl].double().transpose(0, 1) for t in (q, k, v)), scale=scale)
            out.append(o.transpose(0, 1))
        start += n
    return torch.cat(out)


def dequantized(fp8, scales, head_dim):
    return [t[..., :head_dim].float() * s for t, s in zip(fp8, scales)]


@pytest.mark.parametrize(
    "lengths,heads,head_dim",
    [([7], 2, 16), ([5, 1, 9], 3, 72), ([4, 0, 6], 1, 80), ([1, 1], 2, 8)],
)
def test_reference_matches_independent_sdpa(lengths, heads, head_dim):
    _, fp8, scales = quantized_problem(lengths, heads, head_dim)
    cu = cu_seqlens_of(lengths)
    out = fa.reference_fp8_attention(*fp8, *scales, cu, max(lengths), head_dim, None, torch.float32)
    expected = per_sequence_sdpa(*dequantized(fp8, scales, head_dim), lengths)
    assert out.shape == (sum(lengths), heads, head_dim)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_reference_uses_the_given_softmax_scale():
    lengths, head_dim = [6, 3], 24
    _, fp8, scales = quantized_problem(lengths, 2, head_dim)
    out = fa.reference_fp8_attention(*fp8, *scales, cu_seqlens_of(lengths), 6, head_dim, 0.05, torch.float32)
    expected = per_sequence_sdpa(*dequantized(fp8, scales, head_dim), lengths, scale=0.05)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_op_on_cpu_is_the_reference():
    lengths = [5, 3]
    _, fp8, scales = quantized_problem(lengths, 2, 72)
    cu = cu_seqlens_of(lengths)
    out = torch.ops.fusionpasses.fp8_attention(*fp8, *scales, cu, 5, 72, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.shape == (8, 2, 72) and out.is_contiguous()
    torch.testing.assert_close(
        out, fa.reference_fp8_attention(*fp8, *scales, cu, 5, 72, None, torch.bfloat16), atol=0, rtol=0
    )


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lengths", [[9], [5, 0, 12, 1]])
def test_dequantize_sdpa_fallback_matches_reference(lengths, out_dtype):
    _, fp8, scales = quantized_problem(lengths, 3, 72, seed=len(lengths))
    cu = cu_seqlens_of(lengths)
    # max_seqlen above the longest sequence: the padded batch must mask the extra keys
    out = fa.dequantized_attention(*fp8, *scales, cu, max(lengths) + 3, 72, None, out_dtype)
    expected = fa.reference_fp8_attention(*fp8, *scales, cu, max(lengths), 72, None, torch.float32)
    assert out.dtype == out_dtype and out.shape == expected.shape
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


def test_varlen_attention_in_bf16_matches_per_sequence_sdpa():
    lengths = [3, 8, 1]
    raw, _, _ = quantized_problem(lengths, 2, 40)
    out = fa.varlen_attention(*raw, cu_seqlens_of(lengths), 8)
    torch.testing.assert_close(out.double(), per_sequence_sdpa(*raw, lengths), atol=2e-2, rtol=2e-2)


def test_sequences_do_not_see_each_other():
    """Changing sequence 1's keys and values leaves sequence 0's output untouched."""
    lengths = [4, 6]
    _, (q, k, v), scales = quantized_problem(lengths, 2, 16)
    cu = cu_seqlens_of(lengths)
    out = fa.dequantized_attention(q, k, v, *scales, cu, 6, 16, None, torch.bfloat16)
    k2, v2 = k.clone(), v.clone()
    k2.view(torch.uint8)[4:] = 0x38  # 1.0
    v2.view(torch.uint8)[4:] = 0x40  # 2.0
    out2 = fa.dequantized_attention(q, k2, v2, *scales, cu, 6, 16, None, torch.bfloat16)
    assert torch.equal(out[:4], out2[:4])
    assert not torch.equal(out[4:], out2[4:])


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------


def _valid_args():
    _, fp8, scales = quantized_problem([3, 2], 2, 24)
    return [*fp8, *scales, cu_seqlens_of([3, 2]), 3, 24, torch.bfloat16]


def _set(index, make):
    def mutate(args):
        args[index] = make(args)

    return mutate


def _truncate_head_dims(args):
    for i in range(3):
        args[i] = args[i][..., :24].contiguous()


@pytest.mark.parametrize(
    "mutate,message",
    [
        (_set(0, lambda a: a[0].float()), "q must have dtype"),
        (_set(1, lambda a: a[1].transpose(0, 1).contiguous().transpose(0, 1)), "k must be contiguous"),
        (_set(2, lambda a: a[2][:4]), "one shape"),
        (_truncate_head_dims, "multiple of 16"),
        (_set(8, lambda a: 33), "head_dim must be in"),
        (_set(3, lambda a: a[3].double()), "q_scale must be float32"),
        (_set(6, lambda a: a[6].long()), "cu_seqlens must be a 1-D int32"),
        (_set(7, lambda a: 0), "max_seqlen must be >= 1"),
        (_set(9, lambda a: torch.float32), "out_dtype must be bfloat16 or float16"),
    ],
)
def test_validation(mutate, message):
    args = _valid_args()
    mutate(args)
    with pytest.raises(KernelInputError, match=message):
        torch.ops.fusionpasses.fp8_attention(*args)


def test_reference_checks_offsets_and_max_seqlen():
    args = _valid_args()
    with pytest.raises(KernelInputError, match="max_seqlen"):
        torch.ops.fusionpasses.fp8_attention(*args[:7], 2, *args[8:])
    with pytest.raises(KernelInputError, match="rise from 0"):
        torch.ops.fusionpasses.fp8_attention(*args[:6], cu_seqlens_of([3, 1]), *args[7:])
    with pytest.raises(KernelInputError, match="backend"):
        torch.ops.fusionpasses.fp8_attention(*args, backend="flash")


# ---------------------------------------------------------------------------------------------
# path choice and the cuDNN adapter
# ---------------------------------------------------------------------------------------------


class FakeCudnnPrefill:
    """``flashinfer.cudnn.cudnn_batch_prefill_with_kv_cache`` as FlashInfer 0.7.0 documents and builds it
    (non-paged ragged q/k/v/o with element offsets, (b, 1, 1, 1) lengths and descales, fixed softmax
    FP8 scale of 1, saturating FP8 output), in float64 on CPU. Building a graph for an ``unsupported``
    output dtype raises the way cuDNN does; built graphs are cached by FlashInfer's key, which leaves
    the output dtype out."""

    def __init__(self, unsupported: tuple[torch.dtype, ...] = ()) -> None:
        self.unsupported = unsupported
        self.calls: list[dict] = []
        self.graphs: dict[tuple, torch.dtype] = {}  # FlashInfer's cache key has no output dtype

    def __call__(
        self,
        q,
        k_cache,
        v_cache,
        scale,
        workspace,
        *,
        max_token_per_sequence,
        max_sequence_kv,
        actual_seq_lens_q,
        actual_seq_lens_kv,
        causal,
        return_lse,
        q_scale,
        k_scale,
        v_scale,
        batch_offsets_q,
        batch_offsets_o,
        batch_offsets_k,
        batch_offsets_v,
        out,
        o_data_type,
    ):
        self.calls.append(dict(o_data_type=o_data_type, max_token_per_sequence=max_token_per_sequence, scale=scale))
        total, heads, padded = q.shape
        key = (actual_seq_lens_q.shape[0], max_token_per_sequence, heads, padded, scale)
        if key not in self.graphs and o_data_type in self.unsupported:  # refused at graph build
            raise RuntimeError("cudnnGraphNotSupportedError: No valid engine configs for SDPA_FP8_FWD")
        built = self.graphs.setdefault(key, o_data_type)
        assert built == o_data_type, f"FlashInfer would run the {built}-output graph for a {o_data_type} output"
        assert not causal and not return_lse and workspace.numel() >= 1 << 20
        assert out.shape == (total, heads, padded) and out.dtype == o_data_type and out.is_contiguous()
        assert max_sequence_kv == max_token_per_sequence
        for s in (q_scale, k_scale, v_scale):
            assert s.shape == (1, 1, 1, 1) and s.dtype == torch.float32
        lengths = actual_seq_lens_q.flatten().tolist()
        assert actual_seq_lens_q.shape == (len(lengths), 1, 1, 1) and actual_seq_lens_q.dtype == torch.int32
        assert torch.equal(actual_seq_lens_q, actual_seq_lens_kv) and max(lengths) <= max_token_per_sequence
        for offsets in (batch_offsets_q, batch_offsets_o, batch_offsets_k, batch_offsets_v):
            assert offsets.dtype == torch.int32 and offsets.shape == (len(lengths) + 1,)
        row = heads * padded
        for b, n in enumerate(lengths):
            starts = [int(o[b]) for o in (batch_offsets_q, batch_offsets_k, batch_offsets_v, batch_offsets_o)]
            assert all(s % row == 0 for s in starts)
            (sq, sk, sv, so) = (s // row for s in starts)
            qf = q[sq : sq + n].double() * q_scale.item()
            kf = k_cache[sk : sk + n].double() * k_scale.item()
            vf = v_cache[sv : sv + n].double() * v_scale.item()
            p = (torch.einsum("qhd,khd->hqk", qf, kf) * scale).softmax(-1)
            o = torch.einsum("hqk,khd->qhd", p, vf)
            if o_data_type == torch.float8_e4m3fn:
                o = o.clamp(-448, 448)
            out[so : so + n] = o.to(o_data_type)
        return out, None


class FakeCudnnModule:
    @staticmethod
    def backend_version() -> int:
        return 91900


@pytest.fixture
def fake_flashinfer(monkeypatch):
    def install(prefill: FakeCudnnPrefill) -> FakeCudnnPrefill:
        monkeypatch.setattr(fa, "_import_cudnn_prefill", lambda: (prefill, FakeCudnnModule))
        return prefill

    return install


def _run_dispatch(fp8, scales, lengths, head_dim, state, backend="auto", out_dtype=torch.bfloat16, max_seqlen=None):
    inputs = fa.FP8AttentionInputs(*fp8, *scales, cu_seqlens_of(lengths), max_seqlen or max(lengths), head_dim)
    return fa._dispatch(inputs, out_dtype, None, backend, state)


def test_cudnn_path_with_half_output(fake_flashinfer):
    prefill = fake_flashinfer(FakeCudnnPrefill())
    lengths, head_dim = [5, 0, 130, 2], 72
    _, fp8, scales = quantized_problem(lengths, 2, head_dim)
    state = fa._DeviceState(None)
    out = _run_dispatch(fp8, scales, lengths, head_dim, state)
    expected = fa.reference_fp8_attention(*fp8, *scales, cu_seqlens_of(lengths), 130, head_dim, None, torch.float32)
    assert out.dtype == torch.bfloat16 and out.shape == (sum(lengths), 2, head_dim) and out.is_contiguous()
    torch.testing.assert_close(out.float(), expected, atol=1e-2, rtol=1e-2)
    assert [c["o_data_type"] for c in prefill.calls] == [torch.bfloat16]
    assert prefill.calls[0]["max_token_per_sequence"] == 256  # 130 bucketed up to a power of two
    assert prefill.calls[0]["scale"] == pytest.approx(head_dim**-0.5)  # the unpadded head_dim
    assert state.out_dtype_status == {(torch.bfloat16, 80): "ok"} and state.cudnn_out_dtype == {80: torch.bfloat16}
    assert state.last_path == "cudnn (bfloat16 output)"


def test_cudnn_path_falls_back_to_fp8_output_and_remembers(fake_flashinfer):
    """Hopper's case: no half output. The FP8 output must not saturate when |O| > 448 (V scale > 1)."""
    prefill = fake_flashinfer(FakeCudnnPrefill(unsupported=(torch.bfloat16,)))
    lengths, head_dim = [40, 17], 80
    _, fp8, scales = quantized_problem(lengths, 2, head_dim, v_amplitude=3000.0)
    expected = fa.reference_fp8_attention(*fp8, *scales, cu_seqlens_of(lengths), 40, head_dim, None, torch.float32)
    assert expected.abs().max() > 448, "the test needs outputs beyond the FP8 range"
    state = fa._DeviceState(None)
    out = _run_dispatch(fp8, scales, lengths, head_dim, state)
    # one e4m3 rounding of the output: relative error up to 2^-4
    torch.testing.assert_close(out.float(), expected, atol=1e-3 * expected.abs().max().item(), rtol=2**-4)
    assert state.last_path == "cudnn (float8_e4m3fn output)"
    assert state.out_dtype_status[(torch.bfloat16, 80)].startswith("RuntimeError: cudnnGraphNotSupportedError")
    assert state.out_dtype_status[(torch.float8_e4m3fn, 80)] == "ok"
    _run_dispatch(fp8, scales, lengths, head_dim, state)
    assert [c["o_data_type"] for c in prefill.calls] == [torch.bfloat16, torch.float8_e4m3fn, torch.float8_e4m3fn]


def test_cudnn_output_dtype_is_fixed_per_head_size(fake_flashinfer):
    """A later fp16 request reuses the bf16 graph and converts: FlashInfer keys graphs without the
    output dtype, so a second dtype for the same shape would run the first one's graph."""
    prefill = fake_flashinfer(FakeCudnnPrefill())
    lengths = [6, 9]
    _, fp8, scales = quantized_problem(lengths, 2, 24)
    state = fa._DeviceState(None)
    _run_dispatch(fp8, scales, lengths, 24, state, out_dtype=torch.bfloat16)
    out = _run_dispatch(fp8, scales, lengths, 24, state, out_dtype=torch.float16)
    assert out.dtype == torch.float16 and [c["o_data_type"] for c in prefill.calls] == [torch.bfloat16] * 2
    expected = fa.reference_fp8_attention(*fp8, *scales, cu_seqlens_of(lengths), 9, 24, None, torch.float32)
    torch.testing.assert_close(out.float(), expected, atol=1e-2, rtol=1e-2)
    assert state.cudnn_out_dtype == {32: torch.bfloat16}


def test_refused_shape_after_success_falls_back_or_raises(fake_flashinfer, caplog):
    prefill = fake_flashinfer(FakeCudnnPrefill())
    lengths = [6]
    _, fp8, scales = quantized_problem(lengths, 1, 16)
    state = fa._DeviceState(None)
    _run_dispatch(fp8, scales, lengths, 16, state)
    prefill.unsupported = (torch.bfloat16,)  # cuDNN refuses a new shape with the chosen dtype
    with caplog.at_level(logging.WARNING, logger="fusionpasses.fp8_attention"):
        out = _run_dispatch(fp8, scales, lengths, 16, state, max_seqlen=300)
    assert state.last_path == "sdpa" and "cudnnGraphNotSupportedError" in caplog.text
    expected = fa.reference_fp8_attention(*fp8, *scales, cu_seqlens_of(lengths), 6, 16, None, torch.float32)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    calls = len(prefill.calls)
    _run_dispatch(fp8, scales, lengths, 16, state, max_seqlen=300)
    assert len(prefill.calls) == calls, "a refused shape is not rebuilt on every call"
    with pytest.raises(RuntimeError, match="backend='cudnn' is unavailable.*cudnnGraphNotSupportedError"):
        _run_dispatch(fp8, scales, lengths, 16, state, max_seqlen=300, backend="cudnn")
    _run_dispatch(fp8, scales, lengths, 16, state)  # the first shape still runs on cuDNN
    assert state.last_path == "cudnn (bfloat16 output)"


def test_auto_falls_back_to_sdpa_with_a_logged_reason(fake_flashinfer, caplog):
    fake_flashinfer(FakeCudnnPrefill(unsupported=(torch.bfloat16, torch.float8_e4m3fn)))
    lengths, head_dim = [5, 7], 72
    _, fp8, scales = quantized_problem(lengths, 2, head_dim)
    expected = fa.reference_fp8_attention(*fp8, *scales, cu_seqlens_of(lengths), 7, head_dim, None, torch.float32)
    for state in (fa._DeviceState("sm80: cuDNN's FP8 attention needs sm90 (Hopper) or newer"), fa._DeviceState(None)):
        with caplog.at_level(logging.WARNING, logger="fusionpasses.fp8_attention"):
            out = _run_dispatch(fp8, scales, lengths, head_dim, state)
        torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
        assert state.last_path == "sdpa"
    assert "needs sm90" in caplog.text
    assert "cuDNN could not build the FP8 graph" in caplog.text


def test_output_dtype_report_tries_each_dtype_on_its_own_graph(fake_flashinfer, monkeypatch):
    prefill = fake_flashinfer(FakeCudnnPrefill(unsupported=(torch.bfloat16,)))
    cpu = torch.device("cpu")
    monkeypatch.setitem(fa._DEVICE_STATE, cpu, fa._DeviceState(None))
    report = fa.cudnn_fp8_output_dtype_report(cpu)
    assert report["bfloat16"].startswith("failed: RuntimeError: cudnnGraphNotSupportedError")
    for name in ("float16", "float8_e4m3fn"):
        assert report[name].startswith("ok (max abs err"), report
        err = float(report[name].split("max abs err ")[1].split()[0])
        ref_max = float(report[name].split("|ref| max ")[1].rstrip(")"))
        assert err < 0.1 * ref_max
    bounds = [c["max_token_per_sequence"] for c in prefill.calls]
    assert len(set(bounds)) == 3 and all(b & (b - 1) for b in bounds), "never a power-of-two bound the op uses"
    assert fa._DEVICE_STATE[cpu].cudnn_out_dtype == {}, "the report leaves the op's choice alone"
    assert fa.fp8_attention_report(cpu)["cudnn_unsupported_reason"] is None


def test_forced_cudnn_raises_with_the_reason():
    _, fp8, scales = quantized_problem([4], 1, 16)
    with pytest.raises(RuntimeError, match="backend='cudnn' is unavailable.*needs sm90"):
        _run_dispatch(fp8, scales, [4], 16, fa._DeviceState("sm80: needs sm90"), backend="cudnn")


def test_forced_sdpa_skips_cudnn(fake_flashinfer):
    prefill = fake_flashinfer(FakeCudnnPrefill())
    _, fp8, scales = quantized_problem([4], 1, 16)
    state = fa._DeviceState(None)
    _run_dispatch(fp8, scales, [4], 16, state, backend="sdpa")
    assert prefill.calls == [] and state.last_path == "sdpa"


def test_shapes_beyond_cudnn_limits_take_sdpa():
    assert "head_dim" in fa._cudnn_shape_reason(torch.empty(1, 1, 272, dtype=torch.float8_e4m3fn))
    big = (
        torch.empty(0, dtype=torch.float8_e4m3fn)
        .new_empty((1,))
        .expand(1 << 20)
        .as_strided((1 << 20, 16, 128), (0, 0, 0))
    )
    assert "int32" in fa._cudnn_shape_reason(big)
    assert fa._cudnn_shape_reason(torch.empty(4, 2, 80, dtype=torch.float8_e4m3fn)) is None


def test_capability_gate_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only answer")
    assert fa.cudnn_fp8_unsupported_reason() == "no CUDA device"
    assert "not a CUDA device" in fa.cudnn_fp8_unsupported_reason(torch.device("cpu"))


def test_graph_seqlen_buckets():
    assert [fa._graph_seqlen(n) for n in (1, 128, 129, 4096, 4097, 16384)] == [128, 128, 256, 4096, 8192, 16384]


def test_sequence_length_gate():
    assert not fa.use_fp8_attention(fa.FP8_ATTENTION_MIN_SEQLEN - 1)
    assert fa.use_fp8_attention(fa.FP8_ATTENTION_MIN_SEQLEN)
    assert fa.use_fp8_attention(64, min_seqlen=64) and not fa.use_fp8_attention(63, min_seqlen=64)


def test_padded_head_dim_of_common_vit_sizes():
    assert [padded_head_dim(d) for d in (64, 72, 80, 88, 128)] == [64, 80, 80, 96, 128]
    assert math.isclose(fa.default_softmax_scale(72, None), 72**-0.5)


def test_hopper_tries_fp8_output_first(monkeypatch):
    # cuDNN 9.19 builds FP8 SDPA on sm90 only with FP8 output, and FlashInfer's graph cache would
    # reuse a refused bf16 graph for the FP8 attempt: the order must put FP8 first there only.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fa._output_dtype_order(torch.device("cuda", 0), torch.bfloat16) == (torch.float8_e4m3fn, torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    assert fa._output_dtype_order(torch.device("cuda", 0), torch.bfloat16) == (torch.bfloat16, torch.float8_e4m3fn)
    assert fa._output_dtype_order(torch.device("cpu"), torch.float16) == (torch.float16, torch.float8_e4m3fn)
