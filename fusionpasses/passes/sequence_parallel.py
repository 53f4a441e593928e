"""Sequence parallelism: run the norm after each all_reduce on this rank's share of the tokens.

    y = wait(all_reduce(x, "sum", g))               s = wait(reduce_scatter(x, "sum", ws, g))   (M/ws, H)
    h = y + residual                                 h = s + residual_shard
    out = rms_norm(h)  [-> quant]            ->      out = rms_norm(h)  [-> quant]
    gemm(out); later layers read h                   gemm(wait(all_gather(out, ws, g)))
                                                     later layers read h itself (still a shard)

The all_gather moves the norm's output (the quantized one when a quantization follows: FP8 as
bytes, ``view(uint8) -> all_gather -> view(fp8)``, NVFP4 as its packed values and block scales), so
AsyncTP finds ``all_gather -> GEMM`` and ``GEMM -> reduce_scatter`` pairs to fuse.

The residual stream stays sharded from layer to layer: a tensor this pass all_gathered is read as
its shard by the next layer. A replicated residual that enters unsharded (a graph input, or the
output of a layer the pass declined) is cut with ``fusionpasses.rank_rows``, which reads the rank
when it runs. Anything else that reads a sharded tensor (the graph's outputs, a final LM head, ops
the pass does not know) gets it all_gathered back, so the graph computes what it did before.

Gating (see ``fusionpasses/sp_thresholds.py``): the token count must reach the family's minimum
and be divisible by the world size. For a dynamic token count the pass installs a shape guard
``M % ws == 0`` (when the size hint satisfies it), so a non-divisible count recompiles without SP
instead of failing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols, guard_or_false, statically_known_true

from ..patterns.graph_utils import c10d, call, is_op, set_fake_value, static_int, val
from ..patterns.norm import CONVERT, NormAfterReduce, match_norm_after
from ..sp_thresholds import decide_tokens, resolve_min_tokens
from .base import FusionPass

aten = torch.ops.aten
fusionpasses_ops = torch.ops.fusionpasses

# Nodes this pass may leave without users (gathers it inserted, casts of them): erased when dead.
_ERASABLE_WHEN_DEAD = (
    CONVERT,
    aten.view.dtype,
    c10d.wait_tensor.default,
    c10d.all_gather_into_tensor.default,
    fusionpasses_ops.rank_rows.default,
)


def _erase_if_dead(node: fx.Node) -> None:
    while not node.users and is_op(node, *_ERASABLE_WHEN_DEAD):
        inputs = node.all_input_nodes
        node.graph.erase_node(node)
        if len(inputs) != 1:
            return
        node = inputs[0]


@dataclass
class _Gathered:
    shard: fx.Node
    group_name: str


class ShardedTensors:
    """Per graph: the full tensors this pass rebuilt with all_gathers, and the shards they came from."""

    def __init__(self, graph: fx.Graph) -> None:
        self.graph = graph
        self.gathered: dict[fx.Node, _Gathered] = {}

    def gather(self, shard: fx.Node, world_size: int, group_name: str, original: torch.Tensor) -> fx.Node:
        """``shard`` all_gathered along dim 0, inserted right after it, standing for the tensor whose
        fake value was ``original``. One-byte floats (fp8) travel as uint8 (gloo cannot gather fp8;
        the bytes are the same) and AsyncTP recognizes that form."""
        graph = self.graph
        dtype = val(shard).dtype
        as_bytes = dtype.is_floating_point and dtype.itemsize == 1
        with graph.inserting_after(shard):
            source = call(graph, aten.view.dtype, shard, torch.uint8) if as_bytes else shard
        with graph.inserting_after(source):
            gathered = call(graph, c10d.all_gather_into_tensor.default, source, world_size, group_name)
        with graph.inserting_after(gathered):
            full = call(graph, c10d.wait_tensor.default, gathered)
        if as_bytes:
            with graph.inserting_after(full):
                full = call(graph, aten.view.dtype, full, dtype)
        # ws * (M // ws) rows by the collective's shape rule: M itself once M % ws == 0 is known, but
        # not every torch version simplifies it. Keep the original's sizes so that shapes downstream,
        # and the next layer's residual-add match, compare equal.
        mode = detect_fake_mode([original])
        if mode is not None:
            with mode:
                full.meta["val"] = original.new_empty(original.shape)
        self.gathered[full] = _Gathered(shard, group_name)
        return full

    def shard_of(self, full: fx.Node, world_size: int, group_name: str, before: fx.Node) -> fx.Node:
        """This rank's rows of ``full``: the shard it was gathered from, else cut from it (a cast is
        cut before it is applied, so the rows move in the narrower dtype)."""
        known = self.gathered.get(full)
        if known is not None and known.group_name == group_name:
            return known.shard
        graph = self.graph
        if is_op(full, CONVERT):
            inner = self.shard_of(full.args[0], world_size, group_name, before)
            with graph.inserting_before(before):
                return call(graph, CONVERT, inner, full.args[1])
        with graph.inserting_before(before):
            return call(graph, fusionpasses_ops.rank_rows.default, full, world_size, group_name)

    def drop_unused(self) -> None:
        """Erase the gathers nothing reads any more (a later layer took the shard instead)."""
        alive = set(self.graph.nodes)
        for full in self.gathered:
            if full in alive:
                _erase_if_dead(full)
        self.gathered.clear()


@dataclass
class AllReduceRMSNorm:
    """``all_reduce -> RMSNorm`` where the all_reduce result is the residual (a model's first layer)."""

    all_reduce: fx.Node
    reduced: fx.Node
    """The wait_tensor: the all_reduce result as the model reads it."""
    norm: NormAfterReduce
    reduce_op: str
    world_size: int
    group_name: str

    base_pattern: ClassVar[str] = "all_reduce+rms_norm"

    @classmethod
    def pattern_for(cls, norm: NormAfterReduce) -> str:
        return cls.base_pattern + (norm.quant.suffix if norm.quant is not None else "")

    @property
    def pattern(self) -> str:
        return self.pattern_for(self.norm)

    def token_inputs(self) -> list[fx.Node]:
        """(M, ...) tensors besides the all_reduce result that the norm's nodes read."""
        return []

    def replace(self, sharded: ShardedTensors) -> None:
        graph = self.all_reduce.graph
        nodes = self.norm.nodes
        in_norm = set(nodes)
        with graph.inserting_before(self.all_reduce):
            scattered = call(
                graph,
                c10d.reduce_scatter_tensor.default,
                self.all_reduce.args[0],
                self.reduce_op,
                self.world_size,
                self.group_name,
            )
            shard = call(graph, c10d.wait_tensor.default, scattered)
        substitute = {self.reduced: shard}
        for full in self.token_inputs():
            first_reader = next(n for n in nodes if full in n.all_input_nodes)
            substitute[full] = sharded.shard_of(full, self.world_size, self.group_name, before=first_reader)
        originals = {node: val(node) for node in nodes}
        for node in nodes:
            node.args, node.kwargs = fx.map_arg((node.args, node.kwargs), lambda n: substitute.get(n, n))
            set_fake_value(node)
        for full in substitute:
            if full is not self.reduced:
                _erase_if_dead(full)
        # Everything outside the norm reads full tensors: the sum of the all_reduce, the norm's outputs.
        if self.reduced.users:
            full = sharded.gather(shard, self.world_size, self.group_name, val(self.reduced))
            self.reduced.replace_all_uses_with(full)
        for node in nodes:
            outside = [u for u in node.users if u not in in_norm]
            if outside:
                full = sharded.gather(node, self.world_size, self.group_name, originals[node])
                for user in outside:
                    user.replace_input_with(node, full)
        graph.erase_node(self.reduced)
        graph.erase_node(self.all_reduce)


@dataclass
class AllReduceAddRMSNorm(AllReduceRMSNorm):
    """``all_reduce -> residual add -> RMSNorm`` (the middle layers): the residual is sharded too."""

    base_pattern: ClassVar[str] = "all_reduce+add+rms_norm"

    def token_inputs(self) -> list[fx.Node]:
        return [self.norm.residual] if self.norm.residual is not None else []


class SequenceParallelPass(FusionPass):
    name = "sequence_parallel"

    def disabled_reason(self) -> str | None:
        if self.config.batch_invariant:
            return (
                "batch_invariant is on: a reduce_scatter sums each token on the rank that owns it, in an "
                "order that depends on the token count, so SP would break batch invariance"
            )
        return None

    def run(self, graph: fx.Graph) -> None:
        sharded = ShardedTensors(graph)
        for all_reduce in [n for n in graph.nodes if is_op(n, c10d.all_reduce.default)]:
            name = all_reduce.name
            match = self._match(all_reduce)
            if match is not None:
                match.replace(sharded)
                self.matched(match.pattern, name)
        sharded.drop_unused()

    # -- matching and gating ------------------------------------------------------------------
    def _match(self, all_reduce: fx.Node) -> AllReduceRMSNorm | None:
        pattern = AllReduceRMSNorm.base_pattern
        x, reduce_op, group_name = all_reduce.args[:3]
        group_name = str(group_name)
        waits = list(all_reduce.users)
        if len(waits) != 1 or not is_op(waits[0], c10d.wait_tensor.default):
            self.decline(pattern, all_reduce, "the all_reduce is not read through exactly one wait_tensor")
            return None
        reduced = waits[0]
        if not self.config.allows_group(group_name):
            self.decline(pattern, all_reduce, f"group {group_name!r} is not in config.group_names")
            return None
        reduced_val = val(reduced)
        if not isinstance(reduced_val, torch.Tensor) or reduced_val.dim() != 2:
            shape = tuple(reduced_val.shape) if isinstance(reduced_val, torch.Tensor) else "unknown"
            reason = f"SP shards 2-D (tokens, hidden) activations; the all_reduce result has shape {shape}"
            self.decline(pattern, all_reduce, reason)
            return None
        norm = match_norm_after(reduced)
        if isinstance(norm, str):
            self.decline(pattern, all_reduce, norm)
            return None
        cls = AllReduceAddRMSNorm if norm.residual is not None else AllReduceRMSNorm
        pattern = cls.pattern_for(norm)

        world_size = _world_size(group_name)
        if world_size is None:
            self.decline(pattern, all_reduce, f"process group {group_name!r} is not known in this process")
            return None
        if world_size == 1:
            self.decline(pattern, all_reduce, "world size 1: there is nothing to shard")
            return None
        tokens, hidden = reduced_val.shape
        static_hidden = static_int(hidden)
        if static_hidden is None:
            self.decline(pattern, all_reduce, f"the hidden size {hidden} is dynamic")
            return None
        min_tokens = resolve_min_tokens(self.config, static_hidden, world_size, reduced_val.dtype.itemsize)
        decision = decide_tokens(self.config, min_tokens, static_int(tokens), _size_hint(tokens))
        if not decision.applies:
            self.decline(pattern, all_reduce, decision.reason)
            return None
        problem = self._divisibility_problem(tokens, world_size)
        if problem is not None:
            self.decline(pattern, all_reduce, problem)
            return None
        return cls(all_reduce, reduced, norm, str(reduce_op), world_size, group_name)

    def _divisibility_problem(self, tokens: int | torch.SymInt, world_size: int) -> str | None:
        """None when the token count is (or is now guarded to be) a multiple of the world size."""
        static = static_int(tokens)
        if static is not None:
            return None if static % world_size == 0 else f"{static} tokens are not divisible by world size {world_size}"
        if free_unbacked_symbols(tokens):
            return f"the token count {tokens} is data-dependent: cannot prove it divisible by {world_size}"
        if statically_known_true(tokens % world_size == 0):
            return None
        hint = _size_hint(tokens)
        if hint is None or hint % world_size != 0:
            return f"the dynamic token count {tokens} (size hint {hint}) is not divisible by world size {world_size}"
        if not guard_or_false(tokens % world_size == 0):
            return f"could not guard the dynamic token count {tokens} to a multiple of {world_size}"
        self.note(
            f"guarded {tokens} % {world_size} == 0: token counts that are not multiples of {world_size} "
            "recompile without sequence parallelism"
        )
        return None


def _world_size(group_name: str) -> int | None:
    if not dist.is_available() or not dist.is_initialized():
        return None
    try:
        return dist.distributed_c10d._resolve_process_group(group_name).size()
    except (ValueError, RuntimeError, KeyError):
        return None


def _size_hint(size: int | torch.SymInt) -> int | None:
    if isinstance(size, int):
        return size
    hint = size.node.hint
    return int(hint) if hint is not None else None
