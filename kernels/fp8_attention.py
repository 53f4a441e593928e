"""FP8 self-attention over packed variable-length sequences: ``fusionpasses.fp8_attention``.

A vision encoder attends within each image (or window): the tokens of all images are packed into
one (T, H, D) tensor and ``cu_seqlens`` marks where each sequence starts. The operands are the outputs
of ``fusionpasses.qkv_fp8_quant``::

    q, k, v      (T, H, Dp) float8_e4m3fn, contiguous, Dp a multiple of 16 (zero columns past D)
    *_scale      float32, one element each: dequantization multipliers (real ≈ fp8 * scale)
    cu_seqlens   (N + 1,) int32: sequence n is tokens [cu_seqlens[n], cu_seqlens[n + 1]); ends at T
    max_seqlen   int >= the longest sequence
    head_dim     D, the unpadded head size; the softmax scale defaults to D ** -0.5
    out          (T, H, D) in out_dtype (bfloat16 or float16), contiguous: the pad is dropped

    out[t] = softmax(q_t · K_n^T * softmax_scale) · V_n, over the sequence n that holds token t

Paths on CUDA (``backend="auto"`` picks the first that applies and logs why it did not take cuDNN):

- ``cudnn``: FlashInfer's cuDNN SDPA graph (``flashinfer.cudnn.cudnn_batch_prefill_with_kv_cache``)
  with FP8 inputs, ragged by ``cu_seqlens``. Needs sm90+, FlashInfer with ``import cudnn`` working
  (else FlashInfer would try to download cubins) and cuDNN >= 9.17.1. Which output dtypes the FP8 graph
  supports depends on the GPU (:func:`cudnn_fp8_output_dtype_report` prints them): the first call per
  padded head size tries ``out_dtype``, then FP8, and keeps the first that builds for good, converting
  to later calls' ``out_dtype``. Switching would be unsafe: FlashInfer's graph cache key leaves the
  output dtype out, so a second dtype for the same shape would run the first one's graph.
  With an FP8 output the graph is given ``v_scale = 1`` so that O is produced in units of the quantized
  V (|O| <= 448, never saturating whatever the real magnitude) and multiplied by ``v_scale`` here.
  FlashInfer fixes the softmax's FP8 scale at 1: probabilities below 2^-9 of the row maximum become 0.
- ``sdpa``: dequantize to ``out_dtype`` and run FlashAttention's varlen kernel (or, where it does not
  apply, SDPA on a zero-padded batch with a key mask). No host synchronisation on either path.

On CPU the op runs :func:`reference_fp8_attention`.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from .library import (
    HALF_DTYPES,
    OpSample,
    cached_buffer,
    check,
    check_contiguous,
    check_dtype,
    check_same_device,
    check_tensorwise_scale,
    op_name,
    opcheck_samples,
)

OP = "fp8_attention"
BACKENDS = ("auto", "cudnn", "sdpa")
FP8_DTYPE = torch.float8_e4m3fn
HEAD_DIM_ALIGNMENT = 16

CUDNN_MIN_CAPABILITY = (9, 0)
CUDNN_MIN_VERSION = 91701  # FlashInfer refuses FP8 SDPA below cuDNN 9.17.1
CUDNN_MAX_HEAD_DIM = 256
CUDNN_WORKSPACE_BYTES = 128 << 20  # FlashInfer's documented size for prefill workloads

# Below this longest-sequence length the FP8 path (three quantize passes + FP8 attention) is not
# expected to beat bf16 FlashAttention; the seed measured 0.91x at 4096 on Hopper.
# scripts/bench_fp8_attention.py prints the measured crossover; keep this in line with it.
FP8_ATTENTION_MIN_SEQLEN = 8192

log = logging.getLogger("fusionpasses.fp8_attention")


# ---------------------------------------------------------------------------------------------
# Validation and the reference
# ---------------------------------------------------------------------------------------------


class FP8AttentionInputs(NamedTuple):
    """The op's operands in its argument order (so ``*inputs`` fits the reference's signature)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_scale: torch.Tensor
    k_scale: torch.Tensor
    v_scale: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    head_dim: int


def _validate(inputs: FP8AttentionInputs, out_dtype: torch.dtype, backend: str) -> None:
    q, k, v, q_scale, k_scale, v_scale, cu_seqlens, max_seqlen, head_dim = inputs
    for name, t in (("q", q), ("k", k), ("v", v)):
        check(t.dim() == 3, OP, f"{name} must be (T, H, Dp), got shape {tuple(t.shape)}")
        check_dtype(t, OP, name, (FP8_DTYPE,))
        check_contiguous(t, OP, name)
    check(
        q.shape == k.shape == v.shape,
        OP,
        f"q, k and v must have one shape (self-attention), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}",
    )
    padded = q.shape[2]
    check(padded % HEAD_DIM_ALIGNMENT == 0, OP, f"the padded head_dim ({padded}) must be a multiple of 16")
    check(1 <= head_dim <= padded, OP, f"head_dim must be in [1, {padded}] (the padded size), got {head_dim}")
    for name, s in (("q_scale", q_scale), ("k_scale", k_scale), ("v_scale", v_scale)):
        check_tensorwise_scale(s, OP, name)
    check(
        cu_seqlens.dim() == 1 and cu_seqlens.shape[0] >= 2 and cu_seqlens.dtype == torch.int32,
        OP,
        "cu_seqlens must be a 1-D int32 tensor of N + 1 >= 2 offsets, "
        f"got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}",
    )
    check(max_seqlen >= 1, OP, f"max_seqlen must be >= 1, got {max_seqlen}")
    check(out_dtype in HALF_DTYPES, OP, f"out_dtype must be bfloat16 or float16, got {out_dtype}")
    check(backend in BACKENDS, OP, f"backend must be one of {BACKENDS}, got {backend!r}")
    check_same_device(OP, q=q, k=k, v=v, q_scale=q_scale, k_scale=k_scale, v_scale=v_scale, cu_seqlens=cu_seqlens)


def _check_offsets(cu_seqlens: torch.Tensor, total_tokens: int, max_seqlen: int) -> list[int]:
    """Host-side check of the offsets (the reference reads them anyway; the GPU paths cannot)."""
    bounds = cu_seqlens.tolist()
    lengths = [b - a for a, b in itertools.pairwise(bounds)]
    check(
        bounds[0] == 0 and bounds[-1] == total_tokens and min(lengths) >= 0,
        OP,
        f"cu_seqlens must rise from 0 to T={total_tokens}, got {bounds}",
    )
    check(max(lengths) <= max_seqlen, OP, f"max_seqlen ({max_seqlen}) is below the longest sequence ({max(lengths)})")
    return bounds


def default_softmax_scale(head_dim: int, softmax_scale: float | None) -> float:
    return head_dim**-0.5 if softmax_scale is None else softmax_scale


def _dequantize(x: torch.Tensor, scale: torch.Tensor, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    return (x[..., :head_dim].float() * scale.reshape(())).to(dtype)


def reference_fp8_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_scale: torch.Tensor,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    head_dim: int,
    softmax_scale: float | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The definition: dequantize in fp32, attend within each sequence in fp32, cast once."""
    qf, kf, vf = (_dequantize(t, s, head_dim, torch.float32) for t, s in ((q, q_scale), (k, k_scale), (v, v_scale)))
    scale = default_softmax_scale(head_dim, softmax_scale)
    out = torch.zeros(qf.shape, dtype=torch.float32, device=q.device)
    bounds = _check_offsets(cu_seqlens, q.shape[0], max_seqlen)
    for start, end in itertools.pairwise(bounds):
        if end > start:
            scores = torch.einsum("qhd,khd->hqk", qf[start:end], kf[start:end]) * scale
            out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), vf[start:end])
    return out.to(out_dtype)


# ---------------------------------------------------------------------------------------------
# Half-precision varlen attention (the fallback, and the bf16 side of the sequence-length gate)
# ---------------------------------------------------------------------------------------------


def _flash_varlen_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return (
        q.is_cuda
        and q.dtype in HALF_DTYPES
        and q.shape[-1] <= 256
        and q.shape[-1] % 8 == 0
        and all(t.stride(-1) == 1 for t in (q, k, v))
        and torch.cuda.get_device_capability(q.device) >= (8, 0)
        and torch.backends.cuda.flash_sdp_enabled()
    )


def padded_batch_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Varlen attention through SDPA: scatter the sequences into a zero-padded (N, H, max_seqlen, D)
    batch, mask the padded keys, gather the valid rows back. Index math stays on the device (no sync);
    rows of padded queries are computed and dropped."""
    total, heads, head_dim = q.shape
    num_seqs = cu_seqlens.shape[0] - 1
    starts = cu_seqlens.long()
    token = torch.arange(total, device=q.device)
    seq = torch.searchsorted(starts[1:], token, right=True)
    pos = token - starts[seq]

    def to_batch(x: torch.Tensor) -> torch.Tensor:
        dense = x.new_zeros((num_seqs, max_seqlen, heads, x.shape[-1]))
        dense[seq, pos] = x
        return dense.transpose(1, 2)

    lengths = starts[1:] - starts[:-1]
    key_mask = torch.arange(max_seqlen, device=q.device)[None, :] < lengths[:, None]
    out = F.scaled_dot_product_attention(
        to_batch(q),
        to_batch(k),
        to_batch(v),
        attn_mask=key_mask[:, None, None, :],
        scale=default_softmax_scale(head_dim, softmax_scale),
    )
    return out.transpose(1, 2)[seq, pos]


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Non-causal self-attention over packed (T, H, D) bf16/fp16 sequences: FlashAttention's varlen
    kernel where it applies (CUDA, sm80+, D % 8 == 0, D <= 256), else :func:`padded_batch_attention`."""
    if _flash_varlen_applies(q, k, v):
        # aten's own FlashAttention-2 varlen entry (what torch.nn.attention.varlen wraps); its
        # positional arguments are the same in torch 2.11 and 2.13.
        return torch.ops.aten._flash_attention_forward(
            q,
            k,
            v,
            cu_seqlens,
            cu_seqlens,
            max_seqlen,
            max_seqlen,
            0.0,
            False,
            False,
            scale=default_softmax_scale(q.shape[-1], softmax_scale),
        )[0]
    return padded_batch_attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale)


def dequantized_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_scale: torch.Tensor,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    head_dim: int,
    softmax_scale: float | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The ``sdpa`` path: FP8 operands dequantized to ``out_dtype``, then :func:`varlen_attention`."""
    qd, kd, vd = (_dequantize(t, s, head_dim, out_dtype) for t, s in ((q, q_scale), (k, k_scale), (v, v_scale)))
    return varlen_attention(qd, kd, vd, cu_seqlens, max_seqlen, default_softmax_scale(head_dim, softmax_scale))


# ---------------------------------------------------------------------------------------------
# cuDNN through FlashInfer
# ---------------------------------------------------------------------------------------------


@dataclass
class _DeviceState:
    """What this process learnt about one GPU.

    ``unsupported_reason``: why the cuDNN path is off (None: it is on). ``cudnn_out_dtype``: per padded
    head size, the one output dtype the FP8 graph is built with on this GPU; FlashInfer's graph cache
    key leaves the output dtype out, so two dtypes for one problem shape would share a graph (an FP8
    graph writing into a bf16 buffer, or worse). ``out_dtype_status``: each dtype tried, "ok" or the
    error. ``failed_shapes``: graph shapes cuDNN refused with the chosen dtype (they take SDPA).
    """

    unsupported_reason: str | None
    cudnn_out_dtype: dict[int, torch.dtype] = field(default_factory=dict)
    out_dtype_status: dict[tuple[torch.dtype, int], str] = field(default_factory=dict)
    failed_shapes: dict[tuple[int, ...], str] = field(default_factory=dict)
    last_path: str = ""
    logged: set[str] = field(default_factory=set)


_DEVICE_STATE: dict[torch.device, _DeviceState] = {}
_WORKSPACES: dict[torch.device, torch.Tensor] = {}
_ONES: dict[torch.device, torch.Tensor] = {}


def _import_cudnn_prefill() -> tuple[Callable[..., Any], Any]:
    """FlashInfer's cuDNN prefill entry and the cudnn-frontend module (imported lazily: FlashInfer is an
    optional dependency of the GPU machines only). Raises ImportError with the reason."""
    import flashinfer.cudnn.prefill as prefill_module

    if not prefill_module.CUDNN_AVAILABLE:
        raise ImportError(
            "cudnn-frontend (`import cudnn`) is not available, and without it FlashInfer would run "
            "cubins it downloads: install nvidia-cudnn-frontend"
        )
    return prefill_module.cudnn_batch_prefill_with_kv_cache, prefill_module.cudnn


def _probe_support(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"{device.type} is not a CUDA device"
    capability = torch.cuda.get_device_capability(device)
    if capability < CUDNN_MIN_CAPABILITY:
        return f"sm{capability[0]}{capability[1]}: cuDNN's FP8 attention needs sm90 (Hopper) or newer"
    try:
        _, cudnn = _import_cudnn_prefill()
    except Exception as e:  # noqa: BLE001 - any import failure means "not available", with its message
        return f"FlashInfer's cuDNN attention is not importable: {type(e).__name__}: {e}"
    try:
        version = int(cudnn.backend_version())
    except Exception as e:  # noqa: BLE001
        return f"cannot read the cuDNN version: {type(e).__name__}: {e}"
    if version < CUDNN_MIN_VERSION:
        return f"cuDNN {version} is older than 9.17.1 ({CUDNN_MIN_VERSION}), the first with FP8 SDPA in FlashInfer"
    return None


def _device_key(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _state(device: torch.device) -> _DeviceState:
    device = _device_key(device)
    state = _DEVICE_STATE.get(device)
    if state is None:
        state = _DEVICE_STATE[device] = _DeviceState(_probe_support(device))
    return state


def cudnn_fp8_unsupported_reason(device: torch.device | None = None) -> str | None:
    """Why the cuDNN FP8 path cannot run on ``device`` (default: the current CUDA device); None if it can."""
    if device is None:
        if not torch.cuda.is_available():
            return "no CUDA device"
        device = torch.device("cuda")
    return _state(device).unsupported_reason


def fp8_attention_report(device: torch.device | None = None) -> dict[str, Any]:
    """What the op knows about ``device``: the gate's reason, the output dtypes tried, the last path."""
    state = _state(torch.device("cuda") if device is None else device)
    return {
        "cudnn_unsupported_reason": state.unsupported_reason,
        "cudnn_out_dtype": {f"Dp={d}": str(dt).removeprefix("torch.") for d, dt in state.cudnn_out_dtype.items()},
        "cudnn_out_dtypes_tried": {
            f"{str(dt).removeprefix('torch.')}@Dp={d}": s for (dt, d), s in state.out_dtype_status.items()
        },
        "cudnn_failed_shapes": {f"(Dp, H, N, S_graph)={k}": v for k, v in state.failed_shapes.items()},
        "last_path": state.last_path,
    }


def _log_once(state: _DeviceState, message: str, level: int = logging.INFO) -> None:
    if message not in state.logged:
        state.logged.add(message)
        log.log(level, message)


def _graph_seqlen(max_seqlen: int) -> int:
    # cuDNN builds one graph per (batch, max sequence length, ...). The padding mask makes any bound
    # >= the true one correct, so a power-of-two bucket keeps varying image sizes to a few graphs.
    return max(128, 1 << (max_seqlen - 1).bit_length())


def _cached(
    cache: dict[torch.device, torch.Tensor], device: torch.device, make: Callable[[], torch.Tensor]
) -> torch.Tensor:
    device = _device_key(device)
    return cached_buffer(cache, device, make, device)


def _cudnn_call(
    prefill: Callable[..., Any],
    o_dtype: torch.dtype,
    inputs: FP8AttentionInputs,
    graph_seqlen: int,
    softmax_scale: float,
) -> torch.Tensor:
    """One FlashInfer call producing (T, H, Dp) in ``o_dtype``; with an FP8 output, in units of V's FP8 values."""
    q, k, v, q_scale, k_scale, v_scale, cu_seqlens, _, _ = inputs
    total, heads, padded = q.shape
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).view(-1, 1, 1, 1)
    # Ragged offsets in elements: q, k, v and out are all packed (T, H, Dp).
    offsets = cu_seqlens * (heads * padded)
    workspace = _cached(
        _WORKSPACES, q.device, lambda: torch.empty(CUDNN_WORKSPACE_BYTES, dtype=torch.uint8, device=q.device)
    )
    if o_dtype == FP8_DTYPE:
        v_scale = _cached(_ONES, q.device, lambda: torch.ones(1, dtype=torch.float32, device=q.device))
    out = torch.empty((total, heads, padded), dtype=o_dtype, device=q.device)
    prefill(
        q,
        k,
        v,
        softmax_scale,
        workspace,
        max_token_per_sequence=graph_seqlen,
        max_sequence_kv=graph_seqlen,
        actual_seq_lens_q=lengths,
        actual_seq_lens_kv=lengths,
        causal=False,
        return_lse=False,
        q_scale=q_scale.view(1, 1, 1, 1),
        k_scale=k_scale.view(1, 1, 1, 1),
        v_scale=v_scale.view(1, 1, 1, 1),
        batch_offsets_q=offsets,
        batch_offsets_o=offsets,
        batch_offsets_k=offsets,
        batch_offsets_v=offsets,
        out=out,
        o_data_type=o_dtype,
    )
    return out


def _unpad_output(
    out: torch.Tensor, o_dtype: torch.dtype, v_scale: torch.Tensor, head_dim: int, out_dtype: torch.dtype
) -> torch.Tensor:
    if o_dtype == FP8_DTYPE:
        # e4m3 values are exact in bf16/fp16; rounding v_scale to out_dtype adds 2^-9 to the output's 2^-4
        return out[..., :head_dim].to(out_dtype).contiguous().mul_(v_scale.to(out_dtype))
    return out[..., :head_dim].to(out_dtype).contiguous()


def _error_text(e: Exception) -> str:
    first_line = str(e).splitlines()[0][:300] if str(e) else ""
    return f"{type(e).__name__}: {first_line}"


class CudnnFP8Unavailable(RuntimeError):
    """The cuDNN FP8 graph could not be built for this call."""


def _cudnn_attention(
    inputs: FP8AttentionInputs, softmax_scale: float, out_dtype: torch.dtype, state: _DeviceState
) -> torch.Tensor:
    prefill, _ = _import_cudnn_prefill()
    _, heads, padded = inputs.q.shape
    graph_seqlen = _graph_seqlen(inputs.max_seqlen)
    shape_key = (padded, heads, inputs.cu_seqlens.shape[0] - 1, graph_seqlen)
    if shape_key in state.failed_shapes:
        raise CudnnFP8Unavailable(state.failed_shapes[shape_key])
    args = (inputs, graph_seqlen, softmax_scale)
    chosen = state.cudnn_out_dtype.get(padded)
    if chosen is not None:
        try:
            out = _cudnn_call(prefill, chosen, *args)
        except Exception as e:  # noqa: BLE001 - cuDNN refuses graphs with several exception types
            state.failed_shapes[shape_key] = f"{chosen} output, graph {shape_key}: {_error_text(e)}"
            raise CudnnFP8Unavailable(state.failed_shapes[shape_key]) from e
    else:
        # First call for this head size: the first output dtype cuDNN builds is kept for good.
        # Measured on H200 (cuDNN 9.19, FlashInfer 0.7.0): Hopper builds FP8 SDPA forward only with
        # FP8 output (bf16/fp16 output is Blackwell-only), and FlashInfer's graph cache has no output
        # dtype in its key, so a refused bf16 attempt would poison the FP8 one: on sm9x, FP8 goes first.
        failures = []
        for candidate in _output_dtype_order(inputs.q.device, out_dtype):
            try:
                out = _cudnn_call(prefill, candidate, *args)
            except Exception as e:  # noqa: BLE001 - cuDNN refuses graphs with several exception types
                state.out_dtype_status[(candidate, padded)] = _error_text(e)
                _log_once(
                    state,
                    f"fp8_attention: cuDNN FP8 graph with {candidate} output failed (Dp={padded}): {_error_text(e)}",
                )
                failures.append(f"{candidate}: {_error_text(e)}")
                continue
            state.out_dtype_status[(candidate, padded)] = "ok"
            state.cudnn_out_dtype[padded] = chosen = candidate
            break
        else:
            state.failed_shapes[shape_key] = "; ".join(failures)
            raise CudnnFP8Unavailable(state.failed_shapes[shape_key])
    state.last_path = f"cudnn ({str(chosen).removeprefix('torch.')} output)"
    return _unpad_output(out, chosen, inputs.v_scale, inputs.head_dim, out_dtype)


def _output_dtype_order(device: torch.device, out_dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    hopper = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
    return tuple(dict.fromkeys((FP8_DTYPE, out_dtype) if hopper else (out_dtype, FP8_DTYPE)))


def _cudnn_shape_reason(q: torch.Tensor) -> str | None:
    total, heads, padded = q.shape
    if padded > CUDNN_MAX_HEAD_DIM:
        return f"padded head_dim {padded} > {CUDNN_MAX_HEAD_DIM}"
    if total * heads * padded >= 2**31:
        return f"T*H*Dp = {total * heads * padded} overflows cuDNN's int32 ragged offsets"
    return None


# ---------------------------------------------------------------------------------------------
# The op
# ---------------------------------------------------------------------------------------------


def _dispatch(
    inputs: FP8AttentionInputs, out_dtype: torch.dtype, softmax_scale: float | None, backend: str, state: _DeviceState
) -> torch.Tensor:
    """Pick the path (the capability gate, the shape limits, the output dtypes cuDNN takes) and run it."""
    scale = default_softmax_scale(inputs.head_dim, softmax_scale)
    device = inputs.q.device
    if backend != "sdpa":
        reason = state.unsupported_reason or _cudnn_shape_reason(inputs.q)
        if reason is None:
            try:
                return _cudnn_attention(inputs, scale, out_dtype, state)
            except CudnnFP8Unavailable as e:
                reason = f"cuDNN could not build the FP8 graph: {e}"
        if backend == "cudnn":
            raise RuntimeError(f"fusionpasses.{OP}: backend='cudnn' is unavailable on {device}: {reason}")
        _log_once(state, f"fp8_attention on {device} uses the dequantize + SDPA fallback: {reason}", logging.WARNING)
    state.last_path = "sdpa"
    return dequantized_attention(*inputs, scale, out_dtype)


@torch.library.custom_op(op_name(OP), mutates_args=(), device_types="cuda")
def fp8_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_scale: torch.Tensor,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    head_dim: int,
    out_dtype: torch.dtype,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    inputs = FP8AttentionInputs(q, k, v, q_scale, k_scale, v_scale, cu_seqlens, max_seqlen, head_dim)
    _validate(inputs, out_dtype, backend)
    return _dispatch(inputs, out_dtype, softmax_scale, backend, _state(q.device))


@fp8_attention.register_kernel("cpu")
def _fp8_attention_cpu(
    q, k, v, q_scale, k_scale, v_scale, cu_seqlens, max_seqlen, head_dim, out_dtype, softmax_scale=None, backend="auto"
):
    inputs = FP8AttentionInputs(q, k, v, q_scale, k_scale, v_scale, cu_seqlens, max_seqlen, head_dim)
    _validate(inputs, out_dtype, backend)
    return reference_fp8_attention(*inputs, softmax_scale, out_dtype)


@fp8_attention.register_fake
def _fp8_attention_fake(
    q, k, v, q_scale, k_scale, v_scale, cu_seqlens, max_seqlen, head_dim, out_dtype, softmax_scale=None, backend="auto"
):
    return q.new_empty((q.shape[0], q.shape[1], head_dim), dtype=out_dtype)


def use_fp8_attention(max_seqlen: int, min_seqlen: int | None = None) -> bool:
    """The sequence-length gate: FP8 attention pays for its quantization only for long sequences."""
    return max_seqlen >= (FP8_ATTENTION_MIN_SEQLEN if min_seqlen is None else min_seqlen)


# ---------------------------------------------------------------------------------------------
# Output-dtype report (GPU test and benchmark)
# ---------------------------------------------------------------------------------------------


def cudnn_fp8_output_dtype_report(
    device: torch.device | None = None, head_dim: int = 72, heads: int = 4, seqlens: tuple[int, ...] = (200, 77)
) -> dict[str, str]:
    """Try the cuDNN FP8 graph with bf16, fp16 and FP8 outputs on a small varlen problem and say, per
    dtype, "ok (max abs err ...)" against :func:`reference_fp8_attention` or the failure. Failures are
    data (Hopper is expected to lack some dtypes), never exceptions.

    Each dtype gets its own graph bound on the sequence length (not a power of two, so never one the
    op uses): FlashInfer's graph cache would otherwise hand the first dtype's graph to the others.
    """
    from .qkv_fp8_quant import reference_qkv_fp8_quant

    device = _device_key(torch.device("cuda") if device is None else device)
    reason = cudnn_fp8_unsupported_reason(device)
    if reason is not None:
        return {"all": f"unsupported: {reason}"}
    prefill, _ = _import_cudnn_prefill()
    g = torch.Generator(device=device).manual_seed(0)
    total = sum(seqlens)
    raw = [torch.randn(total, heads, head_dim, device=device, generator=g) for _ in range(3)]
    scales = [(t.abs().amax() / 448.0).reshape(1) for t in raw]
    q, k, v = (reference_qkv_fp8_quant(t, s) for t, s in zip(raw, scales))
    cu = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    inputs = FP8AttentionInputs(q, k, v, *scales, cu, max(seqlens), head_dim)
    ref = reference_fp8_attention(*inputs, None, torch.float32)
    report = {}
    for i, o_dtype in enumerate((torch.bfloat16, torch.float16, FP8_DTYPE)):
        name = str(o_dtype).removeprefix("torch.")
        graph_seqlen = max(seqlens) + 1 + i
        try:
            out = _cudnn_call(prefill, o_dtype, inputs, graph_seqlen, head_dim**-0.5)
            if device.type == "cuda":  # errors of the launched graph surface here, still as data
                torch.cuda.synchronize(device)
        except Exception as e:  # noqa: BLE001 - a failure is the answer
            report[name] = f"failed: {_error_text(e)}"
            continue
        err = (_unpad_output(out, o_dtype, scales[2], head_dim, torch.float32) - ref).abs().max().item()
        report[name] = f"ok (max abs err {err:.4f} vs fp32 reference, |ref| max {ref.abs().max().item():.3f})"
    return report


# ---------------------------------------------------------------------------------------------
# opcheck samples
# ---------------------------------------------------------------------------------------------


def _quantized(t: torch.Tensor, padded: int) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (t.abs().amax() / 448.0).reshape(1)
    q = (t / scale).clamp(-448, 448).to(FP8_DTYPE)
    return F.pad(q, (0, padded - t.shape[-1])).contiguous(), scale


@opcheck_samples(fp8_attention)
def _fp8_attention_samples() -> Iterator[OpSample]:
    g = torch.Generator().manual_seed(0)
    for seqlens, heads, head_dim in (((5,), 2, 16), ((3, 6, 1), 2, 24)):
        total = sum(seqlens)
        padded = math.ceil(head_dim / 16) * 16
        (q, qs), (k, ks), (v, vs) = (
            _quantized(torch.randn(total, heads, head_dim, generator=g), padded) for _ in range(3)
        )
        cu = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=torch.int32)
        yield OpSample(
            (q, k, v, qs, ks, vs, cu, max(seqlens), head_dim, torch.bfloat16),
            {},
            name=f"seqlens={seqlens}-D={head_dim}",
        )
