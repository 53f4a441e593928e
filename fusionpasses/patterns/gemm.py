"""GEMM nodes the collective fusions accept, one class per kind (FP8 kinds by subclass).

Each match knows its 2-D operands as the fused op needs them and how to hand the fused result back
to the GEMM's users. The kinds:

    MmMatch        aten.mm(A, B)                                          bf16/fp16
    ScaledMmMatch  aten._scaled_mm(A, B, sa, sb, bias, sr, dtype, fast)   fp8, tensor-wise or row-wise
    BmmFp8Match    fusionpasses.bmm_fp8(A[None], B[None], sa, sb, dtype)  fp8, FlashInfer, batch 1
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx
from torch.fx.operator_schemas import normalize_function

import fusionpasses.kernels  # noqa: F401  (registers the ops matched here)

from .graph_utils import aten, call, is_op, static_int, val

fusionpasses_ops = torch.ops.fusionpasses


@dataclass
class GemmMatch:
    """``aten.mm``: the base kind, bf16/fp16."""

    node: fx.Node
    """The GEMM node."""
    a: fx.Node
    """The 2-D (M, K) A operand (for bmm_fp8: the tensor under the batch-1 unsqueeze)."""
    b: fx.Node

    kind: ClassVar[str] = "mm"
    targets: ClassVar[tuple] = (aten.mm.default,)

    # -- discovery ----------------------------------------------------------------------
    @classmethod
    def from_node(cls, node: fx.Node) -> GemmMatch | None:
        for kind in (MmMatch, ScaledMmMatch, BmmFp8Match):
            if is_op(node, *kind.targets):
                return kind._parse(node)
        return None

    @classmethod
    def _parse(cls, node: fx.Node) -> GemmMatch | None:
        return cls(node=node, a=node.args[0], b=node.args[1])

    # -- what the fusions ask -----------------------------------------------------------
    @property
    def label(self) -> str:
        return self.kind

    def decline_reason(self) -> str | None:
        if val(self.a) is None or val(self.b) is None or val(self.a).dim() != 2:
            return f"{self.kind}: A must be a 2-D operand with known shape"
        return None

    def scales(self) -> tuple[fx.Node | None, fx.Node | None]:
        return None, None

    def rowwise(self) -> bool:
        return False

    def operand_nodes(self) -> list[fx.Node]:
        """Inputs other than A: they must not depend on the collective being fused."""
        return [n for n in (self.b, *self.scales()) if isinstance(n, fx.Node)]

    def fused_args(self, graph: fx.Graph) -> dict:
        """Arguments of the fused op besides A: (B, A_scale, B_scale, gemm, out_dtype, use_fast_accum)."""
        return dict(B=self.b, A_scale=None, B_scale=None, gemm=self.kind, out_dtype=None, use_fast_accum=False)

    def output(self) -> fx.Node:
        """The node holding the (M, N) result (the GEMM itself for 2-D kinds)."""
        return self.node

    def replace_output(self, graph: fx.Graph, rows: fx.Node) -> None:
        self.output().replace_all_uses_with(rows)

    def erase(self, graph: fx.Graph) -> None:
        for n in (self.output(), self.node):
            if n in graph.nodes and not n.users:
                graph.erase_node(n)

    def shape(self) -> tuple[int | torch.SymInt, int, int]:
        m, k = val(self.a).shape
        return m, val(self.b).shape[0], val(self.b).shape[-1]

    def a_bytes(self) -> int:
        return val(self.a).element_size()

    def out_bytes(self) -> int:
        return val(self.output()).element_size()


class MmMatch(GemmMatch):
    pass


@dataclass
class ScaledMmMatch(GemmMatch):
    """``aten._scaled_mm``: fp8 with tensor-wise or row-wise scales."""

    a_scale: fx.Node | None = None
    b_scale: fx.Node | None = None
    bias: object = None
    scale_result: object = None
    out_dtype: torch.dtype | None = None
    use_fast_accum: bool = False

    kind: ClassVar[str] = "scaled_mm"
    targets: ClassVar[tuple] = (aten._scaled_mm.default,)

    @classmethod
    def _parse(cls, node: fx.Node) -> GemmMatch | None:
        normalized = normalize_function(
            node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True
        )
        if normalized is None:
            return None
        kw = normalized.kwargs
        return cls(
            node=node,
            a=kw["input"],
            b=kw["mat2"],
            a_scale=kw["scale_a"],
            b_scale=kw["scale_b"],
            bias=kw.get("bias"),
            scale_result=kw.get("scale_result"),
            out_dtype=kw.get("out_dtype"),
            use_fast_accum=bool(kw.get("use_fast_accum", False)),
        )

    @property
    def label(self) -> str:
        return f"{self.kind}({'row-wise' if self.rowwise() else 'tensor-wise'})"

    def decline_reason(self) -> str | None:
        if (reason := super().decline_reason()) is not None:
            return reason
        if self.bias is not None:
            return "_scaled_mm with a bias: the fused ops do not carry a bias (a reduce-scatter would sum it ws times)"
        if self.scale_result is not None:
            return "_scaled_mm with scale_result: not carried by the fused ops"
        b = val(self.b)
        if not (b.dim() == 2 and b.stride(0) == 1):
            return "_scaled_mm B operand is not column-major"
        a_scale = val(self.a_scale)
        if a_scale is None:
            return "_scaled_mm A scale has no known shape"
        if a_scale.numel() != 1 and not (a_scale.dim() == 2 and a_scale.shape[-1] == 1):
            return f"_scaled_mm A scale of shape {tuple(a_scale.shape)} is neither tensor-wise nor row-wise"
        return None

    def scales(self) -> tuple[fx.Node | None, fx.Node | None]:
        return self.a_scale, self.b_scale

    def rowwise(self) -> bool:
        scale = val(self.a_scale) if self.a_scale is not None else None
        return scale is not None and static_int(scale.numel()) != 1

    def fused_args(self, graph: fx.Graph) -> dict:
        return dict(
            B=self.b,
            A_scale=self.a_scale,
            B_scale=self.b_scale,
            gemm=self.kind,
            out_dtype=self.out_dtype,
            use_fast_accum=self.use_fast_accum,
        )


@dataclass
class BmmFp8Match(ScaledMmMatch):
    """``fusionpasses.bmm_fp8`` on a batch-1 view of a 2-D activation, as models call FlashInfer.

    Its (1, M, N) output is usually squeezed back to (M, N); ``squeeze`` is that node when present.
    """

    a3: fx.Node | None = None
    b3: fx.Node | None = None
    backend: str = "cublas"
    squeeze: fx.Node | None = None

    kind: ClassVar[str] = "bmm_fp8"
    targets: ClassVar[tuple] = (fusionpasses_ops.bmm_fp8.default,)

    @classmethod
    def _parse(cls, node: fx.Node) -> GemmMatch | None:
        a3, b3, a_scale, b_scale, out_dtype = node.args[:5]
        backend = node.args[5] if len(node.args) > 5 else node.kwargs.get("backend", "cublas")
        a = _unbatched(a3)
        if a is None:
            return None
        squeeze = None
        if len(node.users) == 1:
            user = next(iter(node.users))
            if _is_unbatch(user, node):
                squeeze = user
        return cls(
            node=node, a=a, b=b3, a_scale=a_scale, b_scale=b_scale, out_dtype=out_dtype, a3=a3, b3=b3,
            backend=backend, squeeze=squeeze,
        )

    @property
    def label(self) -> str:
        return self.kind

    def decline_reason(self) -> str | None:
        if val(self.a) is None or val(self.a).dim() != 2:
            return "bmm_fp8: A is not a batch-1 view of a 2-D activation"
        if static_int(val(self.b3).shape[0]) != 1:
            return "bmm_fp8 with batch > 1: not a linear layer"
        for name, scale in (("A", self.a_scale), ("B", self.b_scale)):
            if val(scale) is None or static_int(val(scale).numel()) != 1:
                return f"row-wise {name} scale into bmm_fp8: FlashInfer's bmm_fp8 takes tensor-wise scales only"
        return None

    def rowwise(self) -> bool:
        return False

    def fused_args(self, graph: fx.Graph) -> dict:
        b2 = call(graph, aten.select.int, self.b3, 0, 0)
        gemm = self.kind if self.backend == "cublas" else f"{self.kind}:{self.backend}"
        return dict(B=b2, A_scale=self.a_scale, B_scale=self.b_scale, gemm=gemm, out_dtype=self.out_dtype,
                    use_fast_accum=False)

    def output(self) -> fx.Node:
        return self.squeeze if self.squeeze is not None else self.node

    def erase(self, graph: fx.Graph) -> None:
        super().erase(graph)
        if self.a3 in graph.nodes and not self.a3.users:
            graph.erase_node(self.a3)

    def replace_output(self, graph: fx.Graph, rows: fx.Node) -> None:
        if self.squeeze is not None:
            self.squeeze.replace_all_uses_with(rows)
        else:
            self.node.replace_all_uses_with(call(graph, aten.unsqueeze.default, rows, 0))

    def shape(self) -> tuple[int | torch.SymInt, int, int]:
        m, k = val(self.a).shape
        return m, k, val(self.b3).shape[-1]

    def out_bytes(self) -> int:
        return val(self.node).element_size()


def _unbatched(a3: fx.Node) -> fx.Node | None:
    """x for ``unsqueeze(x, 0)`` or ``reshape(x, [1, M, K])`` of a 2-D x; None otherwise."""
    if is_op(a3, aten.unsqueeze.default) and a3.args[1] == 0:
        return a3.args[0]
    if is_op(a3, aten.reshape.default, aten.view.default) and val(a3.args[0]) is not None:
        src = a3.args[0]
        if val(src).dim() == 2 and static_int(val(a3).shape[0]) == 1 and val(a3).dim() == 3:
            return src
    return None


def _is_unbatch(user: fx.Node, bmm: fx.Node) -> bool:
    """``squeeze(out, 0)``, ``select(out, 0, 0)`` or ``reshape(out, [M, N])`` of a (1, M, N) result."""
    if is_op(user, aten.squeeze.dim) and user.args[1] == 0:
        return True
    if is_op(user, aten.select.int) and user.args[1] == 0 and user.args[2] == 0:
        return True
    return is_op(user, aten.reshape.default, aten.view.default) and val(user) is not None and val(user).dim() == 2


VIEW_OPS = (aten.reshape.default, aten.view.default)


def consumers(result: fx.Node) -> list[GemmMatch]:
    """GEMMs that read ``result`` (N-D, rows in its leading dims) as their A operand, possibly
    through one reshape to 2-D and, for bmm_fp8, a batch-1 unsqueeze."""
    found = []
    k = val(result).shape[-1] if val(result) is not None else None
    candidates: list[fx.Node] = [result]
    for user in result.users:
        if is_op(user, *VIEW_OPS) and val(user) is not None and val(user).dim() == 2 and val(user).shape[-1] == k:
            candidates.append(user)
    for a in candidates:
        if val(a) is None or val(a).dim() != 2:
            continue
        for user in a.users:
            gemm = GemmMatch.from_node(user) if user.args and user.args[0] is a else None
            if gemm is None and (is_op(user, aten.unsqueeze.default) or is_op(user, *VIEW_OPS)):
                for bmm in user.users:
                    if is_op(bmm, *BmmFp8Match.targets) and bmm.args[0] is user:
                        gemm = GemmMatch.from_node(bmm)
            if gemm is not None and gemm.a is a:
                found.append(gemm)
    return found


def producer(source: fx.Node) -> tuple[GemmMatch | None, fx.Node | None]:
    """The GEMM whose (M, N) result ``source`` is, directly or through one reshape to N-D.
    Returns (gemm, reshape node or None)."""
    post = None
    x = source
    if is_op(x, *VIEW_OPS) and val(x.args[0]) is not None and val(x.args[0]).dim() == 2 and val(x).dim() > 2:
        post, x = x, x.args[0]
    gemm = GemmMatch.from_node(x)
    if gemm is None and x.args and isinstance(x.args[0], fx.Node) and is_op(x.args[0], *BmmFp8Match.targets):
        gemm = GemmMatch.from_node(x.args[0])
        if gemm is not None and gemm.output() is not x:
            gemm = None
    if gemm is not None and gemm.output() is not x:
        return None, None
    return gemm, post
