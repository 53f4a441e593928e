"""Batch-invariant mode: every FP8 GEMM onto the batch-invariant kernel, collective passes off.

cuBLAS picks its tile shape, split-K factor and stream-K schedule from M, so a token's output can
change with the batch it is computed in. This pass moves the FP8 GEMMs of the graph onto
``fusionpasses.batch_invariant_fp8_gemm``, whose tile configuration and K reduction order depend only
on the weight's (N, K)::

    y = aten._scaled_mm(a, w_t, sa, sb, bias, None, bf16, fast)    # cuBLASLt, tiles chosen from M
 -> y = fusionpasses.batch_invariant_fp8_gemm(a, w_t, sa, sb, bias, bf16, fast)

    y = fusionpasses.bmm_fp8(a, w_t, sa, sb, bf16, "cublas")         # FlashInfer -> cuBLASLt
 -> y = fusionpasses.batch_invariant_fp8_gemm(a, w_t, sa, sb, None, bf16, False)

Per-tensor, per-token (M, 1) and per-channel (1, N) scales carry over unchanged, and so does the
accumulation mode (``use_fast_accum``; FlashInfer's cuBLASLt GEMM promotes to fp32, so bmm_fp8 maps
to False). GEMMs the pass cannot prove it handles exactly
(another output dtype, an output scale, e5m2 operands, a layout the kernel does not read) are
declined with the reason, and so are the bf16/fp16 GEMMs, which stay on cuBLAS and are therefore not
batch-invariant: the report lists every GEMM that keeps the guarantee from holding end to end.

The collective passes cannot keep the guarantee either: sequence parallelism reduce-scatters rows
to the rank that owns them, and AsyncTP cuts each GEMM into per-rank chunks of M, so both change a
row's summation order with the batch size. Each returns a ``disabled_reason`` when
``config.batch_invariant`` is set, and this pass's note says why (:data:`COLLECTIVES_OFF_REASON`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

import fusionpasses.kernels  # noqa: F401  (registers the op this pass emits)
from fusionpasses.kernels.batch_invariant_fp8_gemm import BIAS_DTYPES
from fusionpasses.kernels.library import HALF_DTYPES

from ..config import FusionConfig
from ..patterns.graph_utils import aten, call, static_int, val
from .base import FusionPass

COLLECTIVES_OFF_REASON = (
    "batch_invariant is set: sequence parallelism and AsyncTP split M across ranks (reduce-scatter "
    "ownership, per-rank GEMM chunks), which changes a row's summation order with the batch size; "
    "neither has a deterministic variant yet"
)
"""Why the collective passes are off in batch-invariant mode, as this pass's note states it."""

COLLECTIVE_SWITCHES = ("sequence_parallel", "async_tp")

# Where the replaced GEMM came from, for stack traces and profiler names. Not "eager_input_vals":
# those are the old op's arguments, and Inductor would normalize them against the new op's schema.
PROVENANCE_META = ("stack_trace", "nn_module_stack", "source_fn_stack", "original_aten", "seq_nr")

# GEMMs this mode leaves on cuBLAS, each declined with the reason so that the report lists every
# GEMM that is not batch-invariant.
NOT_REWRITTEN_REASON: dict[Any, str] = dict.fromkeys(
    (aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default),
    "bf16/fp16/fp32 GEMM stays on cuBLAS, whose split-K choice depends on M: its rows are not batch-invariant",
)
if hasattr(aten, "_scaled_mm_v2"):  # torch.nn.functional.scaled_mm, torch >= 2.10
    NOT_REWRITTEN_REASON[aten._scaled_mm_v2.default] = (
        "aten._scaled_mm_v2 (F.scaled_mm, scaling given as recipe enums) is not rewritten and stays on "
        "cuBLAS: use torch._scaled_mm for FP8 linears in batch-invariant mode"
    )


class NotRewritable(Exception):
    """A candidate GEMM the pass must leave alone; the message is the decline reason."""


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise NotRewritable(reason)


def _bind(node: fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in (post-grad graphs mix args and kwargs)."""
    schema = node.target._schema  # type: ignore[union-attr]
    bound = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
    bound.update(zip((a.name for a in schema.arguments), node.args))
    bound.update(node.kwargs)
    return bound


def _fake(node: Any, name: str) -> torch.Tensor:
    _require(isinstance(node, fx.Node), f"{name} is not a graph value")
    value = val(node)
    _require(isinstance(value, torch.Tensor), f"{name} has no fake tensor metadata")
    return value


def _known_equal(a: Any, b: Any) -> bool:
    return statically_known_true(a == b)


# ---------------------------------------------------------------------------------------------
# matches: one dataclass per FP8 GEMM form, each able to replace itself
# ---------------------------------------------------------------------------------------------


@dataclass
class FP8GemmMatch(ABC):
    """An FP8 GEMM node whose arguments the batch-invariant op takes as they are."""

    pattern: ClassVar[str]
    target: ClassVar[Any]

    node: fx.Node
    A: fx.Node
    B: fx.Node
    A_scale: fx.Node
    B_scale: fx.Node
    bias: fx.Node | None
    out_dtype: torch.dtype
    use_fast_accum: bool

    @classmethod
    @abstractmethod
    def from_node(cls, node: fx.Node) -> FP8GemmMatch:
        """The match for ``node`` (whose target is ``cls.target``); raises :class:`NotRewritable`
        with the reason when the batch-invariant op cannot compute it exactly as written."""

    def check_operands(self, batch_dims: int) -> None:
        """What the kernel needs of the fake values, proven statically (a dynamic M is fine)."""
        A, B = _fake(self.A, "A"), _fake(self.B, "B")
        _require(A.dim() == 2 + batch_dims and B.dim() == 2 + batch_dims, f"A and B must be {2 + batch_dims}-D")
        _require(
            A.dtype == torch.float8_e4m3fn and B.dtype == torch.float8_e4m3fn,
            f"operands are {A.dtype} x {B.dtype}; the kernel takes float8_e4m3fn only",
        )
        K, N = static_int(B.shape[-2]), static_int(B.shape[-1])
        _require(K is not None and N is not None, "the weight's K and N must be static")
        assert K is not None and N is not None
        _require(K % 16 == 0 and N % 16 == 0, f"K ({K}) and N ({N}) must be multiples of 16")
        # A's K may be symbolic (dynamic=True marks every dim): the op checks it against the weight's
        # at run time and raises, as the GEMM it replaces would. Its layout must be proven here.
        _require(
            _known_equal(A.stride(-1), 1) and (_known_equal(A.shape[-2], 1) or _known_equal(A.stride(-2), A.shape[-1])),
            f"A must be row-major with dense rows, got strides {tuple(A.stride())}",
        )
        _require(
            _known_equal(B.stride(-2), 1) and _known_equal(B.stride(-1), K),
            f"B must be column-major (W.t() of a contiguous weight), got strides {tuple(B.stride())}",
        )
        for i in range(batch_dims):
            _require(_known_equal(A.shape[i], B.shape[i]), "batch sizes of A and B differ")
        batch = tuple(A.shape[:-2])
        _check_scale(_fake(self.A_scale, "A_scale"), (*batch, A.shape[-2], 1), "A_scale", "(M, 1)")
        _check_scale(_fake(self.B_scale, "B_scale"), (*batch, 1, N), "B_scale", "(1, N)")
        if self.bias is not None:
            bias = _fake(self.bias, "bias")
            _require(bias.dim() == 1 and _known_equal(bias.shape[0], N), f"bias must have shape ({N},)")
            _require(bias.dtype in BIAS_DTYPES, f"bias dtype {bias.dtype} is not one of {BIAS_DTYPES}")
        _require(self.out_dtype in HALF_DTYPES, f"out_dtype {self.out_dtype} is not bfloat16 or float16")

    def replace(self, graph: fx.Graph) -> fx.Node:
        with graph.inserting_before(self.node):
            new = call(
                graph,
                torch.ops.fusionpasses.batch_invariant_fp8_gemm.default,
                self.A,
                self.B,
                self.A_scale,
                self.B_scale,
                self.bias,
                self.out_dtype,
                self.use_fast_accum,
            )
        for key in PROVENANCE_META:
            if key in self.node.meta:
                new.meta[key] = self.node.meta[key]
        self.node.replace_all_uses_with(new)
        graph.erase_node(self.node)
        return new


def _check_scale(scale: torch.Tensor, per_slice: tuple[Any, ...], name: str, form: str) -> None:
    _require(scale.dtype == torch.float32, f"{name} must be float32, got {scale.dtype}")
    tensorwise = static_int(scale.numel()) == 1
    per_slice_shape = scale.dim() == len(per_slice) and all(
        _known_equal(s, expected) for s, expected in zip(scale.shape, per_slice)
    )
    _require(tensorwise or per_slice_shape, f"{name} of shape {tuple(scale.shape)} is neither tensor-wise nor {form}")


@dataclass
class ScaledMMMatch(FP8GemmMatch):
    """``aten._scaled_mm(A (M, K), B (K, N), A_scale, B_scale, bias, scale_result, out_dtype, fast_accum)``."""

    pattern: ClassVar[str] = "scaled_mm"
    target: ClassVar[Any] = aten._scaled_mm.default

    @classmethod
    def from_node(cls, node: fx.Node) -> ScaledMMMatch:
        args = _bind(node)
        _require(args["scale_result"] is None, "an output scale (scale_result) means an FP8 output")
        out_dtype = args["out_dtype"]
        _require(out_dtype is not None, "no out_dtype: the result would be FP8")
        _require(isinstance(args["use_fast_accum"], bool), "use_fast_accum is not a constant")
        match = cls(
            node, args["self"], args["mat2"], args["scale_a"], args["scale_b"], args["bias"], out_dtype,
            args["use_fast_accum"],
        )
        match.check_operands(batch_dims=0)
        return match


@dataclass
class BmmFP8Match(FP8GemmMatch):
    """``fusionpasses.bmm_fp8(A (b, M, K), B (b, K, N), A_scale, B_scale, out_dtype, backend)``."""

    pattern: ClassVar[str] = "bmm_fp8"
    target: ClassVar[Any] = torch.ops.fusionpasses.bmm_fp8.default

    @classmethod
    def from_node(cls, node: fx.Node) -> BmmFP8Match:
        args = _bind(node)
        match = cls(node, args["A"], args["B"], args["A_scale"], args["B_scale"], None, args["out_dtype"], False)
        match.check_operands(batch_dims=1)
        return match


MATCH_TYPES: dict[Any, type[FP8GemmMatch]] = {m.target: m for m in (ScaledMMMatch, BmmFP8Match)}


# ---------------------------------------------------------------------------------------------
# the pass
# ---------------------------------------------------------------------------------------------


class BatchInvariantPass(FusionPass):
    """Rewrites ``aten._scaled_mm`` and ``fusionpasses.bmm_fp8`` onto the batch-invariant FP8 GEMM."""

    name = "batch_invariant"

    def __init__(self, config: FusionConfig, dump_dir: str | None = None) -> None:
        super().__init__(config, dump_dir)
        self._note_collectives()

    def run(self, graph: fx.Graph) -> None:
        self._note_collectives()
        for node in list(graph.nodes):
            if node.op != "call_function":
                continue
            match_type = MATCH_TYPES.get(node.target)
            if match_type is not None:
                try:
                    match = match_type.from_node(node)
                except NotRewritable as reason:
                    self.decline(match_type.pattern, node, str(reason))
                    continue
                except Exception as error:  # noqa: BLE001  a node form the matcher does not know: never raise
                    self.decline(match_type.pattern, node, f"could not analyze the node: {error!r}")
                    continue
                new = match.replace(graph)
                self.matched(match.pattern, new)
            elif node.target in NOT_REWRITTEN_REASON:
                self.decline("not_rewritten_gemm", node, NOT_REWRITTEN_REASON[node.target])

    def _note_collectives(self) -> None:
        requested = [s for s in COLLECTIVE_SWITCHES if getattr(self.config, s)]
        which = ", ".join(requested) if requested else "sequence_parallel, async_tp (not requested)"
        self.note(f"collective passes off: {which}; {COLLECTIVES_OFF_REASON}")
