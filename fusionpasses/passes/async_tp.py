"""AsyncTP: overlap tensor-parallel collectives with the GEMMs next to them.

Column-parallel GEMM after an all_gather (sequence-parallel input):

    g = wait(all_gather(x_shard))            gathered, out = fusionpasses.all_gather_gemm(
    y = gemm(g, W)                    ->         x_shard, W, scales, gemm=<kind>, ...)
                                              y = out;  other users of g read `gathered`
                                              (none: return_gathered=False, no copy kept)

Row-parallel GEMM before a reduce_scatter:

    p = gemm(x, W)                            y = fusionpasses.gemm_reduce_scatter(
    y = wait(reduce_scatter(p, "sum"))  ->        x, W, scales, gemm=<kind>, reduce_op="sum", ...)

The GEMM keeps its kind (aten.mm, aten._scaled_mm, FlashInfer bmm_fp8 through fusionpasses.bmm_fp8):
the fused ops call it per rank chunk inside a SymmetricMemory pipeline. 3-D activations gathered or
scattered along the sequence dim (DTensor ``Shard(1)``) are handled by reordering rows around the
2-D op. A match is declined, with the reason recorded, when it is not provably equivalent or when the
cost model predicts no speedup (see fusionpasses/cost_model.py).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from .. import cost_model, symm_mem
from ..patterns.collectives import AllGatherMatch, ReduceScatterMatch, find_all_gathers, find_reduce_scatters
from ..patterns.gemm import GemmMatch, consumers, producer
from ..patterns.graph_utils import ancestors, aten, call, hoist_before, is_op, size_arg, static_int, val
from ..platform import device_capability, family_name
from .base import FusionPass

fusionpasses_ops = torch.ops.fusionpasses


def _erase_unused(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    """Erase those of ``nodes`` left without users, consumers before producers."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in sorted((n for n in set(nodes) if n in order), key=order.__getitem__, reverse=True):
        if not n.users:
            graph.erase_node(n)


def _rank_major_to_seq(graph: fx.Graph, rows: fx.Node, world_size: int, batch: int, last: int | fx.Node) -> fx.Node:
    """Rows gathered rank-major, (ws, b, s) order, into sequence order (b, ws, s); flat (b*S, last)."""
    if batch == 1:
        return rows
    blocks = call(graph, aten.reshape.default, rows, [world_size, batch, -1, last])
    seq = call(graph, aten.permute.default, blocks, [1, 0, 2, 3])
    return call(graph, aten.reshape.default, seq, [-1, last])


def _seq_to_rank_major(graph: fx.Graph, rows: fx.Node, world_size: int, batch: int, last: int | fx.Node) -> fx.Node:
    """Rows in sequence order (b, ws, s) into rank-major (ws, b, s) order; flat (ws*b*s, last)."""
    if batch == 1:
        return rows
    blocks = call(graph, aten.reshape.default, rows, [batch, world_size, -1, last])
    ranked = call(graph, aten.permute.default, blocks, [1, 0, 2, 3])
    return call(graph, aten.reshape.default, ranked, [-1, last])


@dataclass
class AllGatherGemm:
    """An all_gather whose result feeds ``gemm`` as its A operand."""

    gather: AllGatherMatch
    gemm: GemmMatch

    @property
    def pattern(self) -> str:
        return f"all_gather+{self.gemm.label}"

    def replace(self, graph: fx.Graph) -> None:
        ag, gemm = self.gather, self.gemm
        result = ag.result
        order = {n: i for i, n in enumerate(graph.nodes)}
        anchor = min(result.users, key=order.__getitem__)
        hoist_before(anchor, gemm.operand_nodes())
        with graph.inserting_before(anchor):
            shard = ag.shard
            if ag.erased_to is not None:
                src = shard.args[0] if is_op(shard, aten.view.dtype) else None
                shard = src if src is not None and val(src).dtype == ag.erased_to else call(
                    graph, aten.view.dtype, shard, ag.erased_to
                )
            k = size_arg(graph, shard, -1)
            if val(shard).dim() != 2:
                shard = call(graph, aten.reshape.default, shard, [-1, k])
            args = gemm.fused_args(graph)
            fused = call(
                graph, fusionpasses_ops.all_gather_gemm.default, shard, args["B"], args["A_scale"], args["B_scale"],
                args["gemm"], args["out_dtype"], ag.world_size, ag.group_name, args["use_fast_accum"],
            )
            out = call(graph, operator.getitem, fused, 1)
            n = size_arg(graph, out, 1)
            batch = static_int(val(result).shape[0])
            rows = out if ag.gather_dim == 0 else _rank_major_to_seq(graph, out, ag.world_size, batch, n)
        gemm.replace_output(graph, rows)
        gemm.erase(graph)
        _erase_unused(graph, [u for u in list(result.users) if not u.users])
        if result.users:
            # Other readers of the gathered tensor (a residual, another GEMM) take the pipeline's copy.
            with graph.inserting_before(min(result.users, key=order.__getitem__)):
                gathered = call(graph, operator.getitem, fused, 0)
                if ag.gather_dim == 0:
                    tail = [size_arg(graph, ag.shard, d) for d in range(1, val(result).dim())]
                    like_result = gathered if val(result).dim() == 2 else call(graph, aten.reshape.default, gathered, [-1, *tail])
                else:
                    seq = _rank_major_to_seq(graph, gathered, ag.world_size, batch, k)
                    like_result = call(graph, aten.reshape.default, seq, [batch, -1, k])
            result.replace_all_uses_with(like_result)
        else:
            # Nothing else reads the gathered rows: the op multiplies them in place and keeps no copy.
            fused.args = (*fused.args, False)
        shard_view = [ag.shard] if is_op(ag.shard, aten.view.dtype) else []
        _erase_unused(graph, [*shard_view, *ag.nodes])


@dataclass
class GemmReduceScatter:
    """A GEMM whose (M, N) result is reduce-scattered along rows (or along the sequence dim of its
    N-D reshape ``post``)."""

    scatter: ReduceScatterMatch
    gemm: GemmMatch
    post: fx.Node | None

    @property
    def pattern(self) -> str:
        return f"{self.gemm.label}+reduce_scatter"

    def replace(self, graph: fx.Graph) -> None:
        rs, gemm = self.scatter, self.gemm
        with graph.inserting_before(gemm.node):
            a = gemm.a
            if rs.scatter_dim == 1:
                batch = static_int(val(self.post).shape[0])
                a = _seq_to_rank_major(graph, a, rs.world_size, batch, size_arg(graph, gemm.a, 1))
            args = gemm.fused_args(graph)
            fused = call(
                graph, fusionpasses_ops.gemm_reduce_scatter.default, a, args["B"], args["A_scale"], args["B_scale"],
                args["gemm"], args["out_dtype"], rs.reduce_op, rs.world_size, rs.group_name, args["use_fast_accum"],
            )
            out = fused
            if self.post is not None:
                out = call(graph, aten.reshape.default, fused, _scattered_shape(self.post, rs.scatter_dim))
        rs.wait.replace_all_uses_with(out)
        _erase_unused(graph, rs.nodes)
        if self.post is not None:
            _erase_unused(graph, [self.post])
        gemm.erase(graph)


def _scattered_shape(post: fx.Node, scatter_dim: int) -> list[int | fx.Node] | None:
    """Shape of the reduce-scattered N-D result: -1 on the scatter dim, the other dims static or taken
    from the post-GEMM reshape's own size nodes (defined before it, so they outlive it)."""
    shape: list[int | fx.Node] = []
    for d, size in enumerate(val(post).shape):
        if d == scatter_dim:
            shape.append(-1)
        elif static_int(size) is not None:
            shape.append(static_int(size))
        elif isinstance(post.args[1][d], fx.Node):
            shape.append(post.args[1][d])
        else:
            return None
    return shape


class AsyncTPPass(FusionPass):
    """Fuses all_gather -> GEMM and GEMM -> reduce_scatter onto pipelined SymmetricMemory ops."""

    name = "async_tp"

    def disabled_reason(self) -> str | None:
        if self.config.batch_invariant:
            return "batch-invariant mode: the pipelined ops chunk the GEMM by rank, so rows depend on the batch"
        return None

    def run(self, graph: fx.Graph) -> None:
        for ag in find_all_gathers(graph):
            self._all_gather(graph, ag)
        for rs in find_reduce_scatters(graph):
            self._reduce_scatter(graph, rs)

    # -- all_gather -> GEMM ---------------------------------------------------------------
    def _all_gather(self, graph: fx.Graph, ag: AllGatherMatch) -> None:
        pattern = "all_gather+gemm"
        if (reason := self._group_reason(ag.group_name)) is not None:
            return self.decline(pattern, ag.ag, reason)
        result = val(ag.result)
        if result is None:
            return self.decline(pattern, ag.ag, "the gathered tensor has no fake value (shape unknown)")
        if ag.gather_dim != 0 and not (ag.gather_dim == 1 and result.dim() == 3):
            return self.decline(
                pattern, ag.ag,
                f"gather along dim {ag.gather_dim} of a {result.dim()}-D tensor: only dim 0, or the sequence dim 1 "
                "of (B, S, H), keep the GEMM's reduction dim whole",
            )
        if ag.gather_dim == 1 and static_int(result.shape[0]) is None:
            return self.decline(pattern, ag.ag, "sequence-dim gather with a symbolic batch size")
        gemms = consumers(ag.result)
        if not gemms:
            users = ", ".join(sorted(str(u.target) for u in ag.result.users)) or "none"
            return self.decline(pattern, ag.ag, f"no GEMM reads the gathered tensor as its A operand (users: {users})")
        gemm = gemms[0]
        pattern = f"all_gather+{gemm.label}"
        if (reason := gemm.decline_reason()) is not None:
            return self.decline(pattern, gemm.node, reason)
        if ag.gather_dim == 1 and gemm.rowwise():
            return self.decline(pattern, gemm.node, "row-wise scales with a sequence-dim gather: scale rows would need the same reorder")
        if ag.ag in ancestors(gemm.operand_nodes()):
            return self.decline(pattern, gemm.node, "the GEMM's B or scales depend on the all_gather result")
        m, k, n = gemm.shape()
        if (reason := self._gate(gemm, m, k, n, ag.world_size, reduce=False, a_bytes=gemm.a_bytes())) is not None:
            return self.decline(pattern, gemm.node, reason)
        AllGatherGemm(ag, gemm).replace(graph)
        self.matched(pattern, gemm.node)

    # -- GEMM -> reduce_scatter -------------------------------------------------------------
    def _reduce_scatter(self, graph: fx.Graph, rs: ReduceScatterMatch) -> None:
        pattern = "gemm+reduce_scatter"
        if (reason := self._group_reason(rs.group_name)) is not None:
            return self.decline(pattern, rs.rs, reason)
        if rs.reduce_op not in ("sum", "avg"):
            return self.decline(pattern, rs.rs, f"reduce op {rs.reduce_op!r}: the fused op reduces with sum or avg only")
        gemm, post = producer(rs.source)
        if gemm is None:
            return self.decline(pattern, rs.rs, f"the reduce-scattered tensor is not a GEMM output (it is {rs.source.target})")
        pattern = f"{gemm.label}+reduce_scatter"
        if (reason := gemm.decline_reason()) is not None:
            return self.decline(pattern, gemm.node, reason)
        chain = [gemm.output(), *([post] if post is not None else [])]
        for node in chain:
            others = [u for u in node.users if u not in (*chain, *rs.nodes)]
            if others:
                return self.decline(pattern, gemm.node, f"the GEMM output has other users ({others[0].name}): fusing would compute it twice")
        ndim = val(rs.source).dim()
        if rs.scatter_dim == ndim - 1:
            return self.decline(pattern, gemm.node, "scatter along the GEMM's N dim: only row (token) scatters are fused")
        if post is None and rs.scatter_dim != 0:
            return self.decline(pattern, gemm.node, f"scatter along dim {rs.scatter_dim} of a 2-D GEMM output")
        if post is not None and rs.scatter_dim > 1:
            return self.decline(pattern, gemm.node, f"scatter along dim {rs.scatter_dim}: only dims 0 and 1 are fused")
        if post is not None and rs.scatter_dim == 1:
            if static_int(val(post).shape[0]) is None:
                return self.decline(pattern, gemm.node, "sequence-dim scatter with a symbolic batch size")
            if gemm.rowwise():
                return self.decline(pattern, gemm.node, "row-wise scales with a sequence-dim scatter: scale rows would need the same reorder")
        if post is not None and _scattered_shape(post, rs.scatter_dim) is None:
            return self.decline(pattern, gemm.node, "a symbolic non-scatter dim of the N-D output has no size node to reuse")
        scatter_size = static_int(val(rs.source).shape[rs.scatter_dim])
        if scatter_size is not None and scatter_size % rs.world_size != 0:
            return self.decline(pattern, gemm.node, f"M ({scatter_size}) is not divisible by the world size ({rs.world_size})")
        m, k, n = gemm.shape()
        if (reason := self._gate(gemm, m, k, n, rs.world_size, reduce=True, a_bytes=gemm.out_bytes())) is not None:
            return self.decline(pattern, gemm.node, reason)
        GemmReduceScatter(rs, gemm, post).replace(graph)
        self.matched(pattern, gemm.node)

    # -- shared checks --------------------------------------------------------------------
    def _group_reason(self, group_name: str) -> str | None:
        if not self.config.allows_group(group_name):
            return f"group {group_name!r} is not in FusionConfig.group_names {self.config.group_names}"
        reason = symm_mem.unavailable_reason(group_name, self.config)
        return None if reason is None else f"SymmetricMemory unavailable: {reason}"

    def _gate(self, gemm: GemmMatch, m, k, n, world_size: int, reduce: bool, a_bytes: int) -> str | None:
        """Cost-model decision; None to fuse. ``a_bytes``: element size of the communicated tensor."""
        if self.config.async_tp_gating == "always":
            return None
        capability = device_capability(self.config)
        profile = cost_model.profile_for(capability, self.config)
        if profile is None:
            return (
                f"no cost-model profile for {family_name(capability)}: set FusionConfig.device_capability, "
                "or async_tp_gating='always' to fuse without one"
            )
        k, n = _static_or_hint(k), _static_or_hint(n)
        if k is None or n is None:
            return "K or N is symbolic without a size hint: the cost model needs the weight shapes"
        ms, source = _token_counts(m, self.config)
        if ms is None:
            return "M is symbolic with no size hint: declare FusionConfig.token_range"
        comm_cols = n if reduce else k
        kind = gemm.kind
        estimates = [
            cost_model.estimate(profile, kind, mm, k, n, world_size, mm * comm_cols * a_bytes, reduce=reduce) for mm in ms
        ]
        worst = min(estimates, key=lambda e: e.speedup)
        if worst.speedup < self.config.async_tp_min_speedup:
            fit_size, _ = profile.fit_for(world_size)
            fit = "" if fit_size == world_size else f" with the ws={fit_size} fit"
            return (
                f"cost model ({profile.name}, ws={world_size}{fit}, M from {source}) predicts {worst.speedup:.2f}x at "
                f"M={worst.m} (unfused {worst.unfused_us:.0f} us, fused {worst.fused_us:.0f} us) "
                f"< {self.config.async_tp_min_speedup}x"
            )
        return None


def _static_or_hint(x) -> int | None:
    static = static_int(x)
    if static is not None or not isinstance(x, torch.SymInt):
        return static
    hint = getattr(x.node, "hint", None)
    return None if hint is None else int(hint)


def _token_counts(m, config) -> tuple[list[int] | None, str]:
    """The M values to evaluate: the static M, else the declared range's ends, else the size hint."""
    static = static_int(m)
    if static is not None:
        return [static], "the static shape"
    if config.token_range is not None:
        lo, hi = config.token_range
        return [lo, hi], f"FusionConfig.token_range {config.token_range}"
    hint = _static_or_hint(m)
    if hint is not None:
        return [hint], f"the size hint {hint} (no FusionConfig.token_range declared)"
    return None, ""
