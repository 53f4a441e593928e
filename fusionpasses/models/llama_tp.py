"""A small Llama-style tensor-parallel transformer: the reference model of the inspection command
and the end-to-end test model of the passes.

One decoder layer, as the graph passes see it (T tokens, hidden H, tensor parallelism over ``group``)::

    h, residual = rms_norm(x + residual)            # fused residual add, fp32 math
    qkv = linear(h, W_qkv[rank])                      # column-parallel: this rank's heads
    attn = sdpa(q, k, v, is_causal=True)              # local heads only, GQA by repeating K/V
    o = all_reduce(linear(attn, W_o[:, rank]))        # row-parallel partial sums -> sum
    h, residual = rms_norm(o + residual)
    gate_up = linear(h, W_gate_up[rank])              # column-parallel, gate and up in one weight
    x = all_reduce(linear(silu(gate) * up, W_down[:, rank]))

``all_reduce -> add -> rms_norm`` is what the sequence-parallel pass rewrites, and the linears on
either side of it are what AsyncTP fuses with the resulting all_gather / reduce_scatter.

Weights are generated from ``cfg.seed`` as full matrices and sliced per rank, so every world size
computes the same function (up to the order of the fp32 -> bf16 partial-sum reduction). There is no
embedding, rotary embedding or LM head: none of them touches a pattern the passes match, and leaving
them out keeps the graphs small enough to read.

FP8 linears (``cfg.linear`` = "scaled_mm" or "bmm_fp8") use static per-tensor scales:

- weight scale: ``amax(full W) / 448``, from the full matrix, so all ranks share one scale;
- activation scale: ``cfg.fp8_activation_amax / 448``, a calibration constant. Inputs of the
  linears are RMS-normalized states, attention outputs and SiLU*mul outputs, all well inside
  +-16 for this model's weights. A static scale quantizes each element on its own, so a rank's shard
  of a row-parallel input quantizes exactly as the full tensor would: that is what keeps the
  function independent of the world size (a dynamic amax per rank would not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
import torch.nn.functional as F

LinearKind = Literal["bf16", "scaled_mm", "bmm_fp8"]
LINEAR_KINDS: tuple[str, ...] = ("bf16", "scaled_mm", "bmm_fp8")

FP8_MAX = 448.0  # largest finite float8_e4m3fn value


@dataclass(frozen=True)
class TPModelConfig:
    """Sizes and numerics of the reference model. Defaults are small enough for a laptop CPU."""

    hidden_size: int = 256
    intermediate_size: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    num_layers: int = 2
    eps: float = 1e-5
    linear: LinearKind = "bf16"
    """"bf16": ``F.linear`` in ``dtype`` (any float dtype, despite the name); "scaled_mm":
    ``torch._scaled_mm`` on FP8 operands; "bmm_fp8": ``torch.ops.fusionpasses.bmm_fp8`` (FlashInfer's
    cuBLASLt GEMM) on FP8 operands."""
    dtype: torch.dtype = torch.bfloat16
    """Activations, non-FP8 weights and GEMM outputs. float32 makes sharded and unsharded runs agree
    to fp32 rounding, which is how the tests check the sharding itself."""
    seed: int = 0
    fp8_activation_amax: float = 16.0
    """Calibrated |activation| bound of the FP8 linears' inputs: the static scale is this / 448."""

    def __post_init__(self) -> None:
        if self.linear not in LINEAR_KINDS:
            raise ValueError(f"linear must be one of {LINEAR_KINDS}, got {self.linear!r}")
        for name in ("hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        fp8_out_dtypes = {"scaled_mm": (torch.bfloat16, torch.float16, torch.float32), "bmm_fp8": (torch.bfloat16, torch.float16)}
        if self.linear in fp8_out_dtypes and self.dtype not in fp8_out_dtypes[self.linear]:
            raise ValueError(f"linear={self.linear!r} cannot produce dtype {self.dtype}; use one of {fp8_out_dtypes[self.linear]}")
        if not self.fp8_activation_amax > 0:
            raise ValueError(f"fp8_activation_amax must be positive, got {self.fp8_activation_amax}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def check_world_size(self, world_size: int) -> None:
        """Raise ValueError unless heads and the MLP split evenly over ``world_size`` ranks."""
        problems = [
            f"{name} ({value}) is not divisible by the world size {world_size}"
            for name, value in (
                ("num_heads", self.num_heads),
                ("num_kv_heads", self.num_kv_heads),
                ("intermediate_size", self.intermediate_size),
            )
            if value % world_size
        ]
        if self.linear != "bf16":
            # cuBLASLt FP8 GEMMs need K and N multiples of 16 on every rank.
            dims = {
                "hidden_size": self.hidden_size,
                "per-rank QKV width": (self.num_heads + 2 * self.num_kv_heads) // world_size * self.head_dim,
                "per-rank attention width": self.num_heads // world_size * self.head_dim,
                "per-rank intermediate size": self.intermediate_size // world_size,
            }
            problems += [f"{name} ({value}) must be a multiple of 16 for FP8 linears" for name, value in dims.items() if value % 16]
        if problems:
            raise ValueError("TPModelConfig does not fit the world size: " + "; ".join(problems))


@dataclass(frozen=True)
class Placement:
    """Where a module's shard lives: its rank, the world size, and the group its collectives use."""

    rank: int
    world_size: int
    group: dist.ProcessGroup | None

    @staticmethod
    def resolve(group: dist.ProcessGroup | None, tensor_parallel: bool) -> Placement:
        if not tensor_parallel or (group is None and not dist.is_initialized()):
            return Placement(0, 1, None)
        group = group if group is not None else dist.group.WORLD
        return Placement(dist.get_rank(group), dist.get_world_size(group), group)

    def shard(self, full: torch.Tensor, dim: int) -> torch.Tensor:
        return full.chunk(self.world_size, dim=dim)[self.rank]

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.group is None:
            return x
        # funcol's result waits on first use; an explicit wait_tensor would put a second wait in the graph.
        return funcol.all_reduce(x, "sum", self.group)


class WeightStream:
    """Full fp32 matrices drawn from one seeded CPU generator, in a fixed order on every rank.

    Modules draw their weights in construction order, so a whole model built from one stream is
    the same function for every world size and rank.
    """

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)

    def matrix(self, out_features: int, in_features: int) -> torch.Tensor:
        return torch.randn(out_features, in_features, generator=self.gen) / math.sqrt(in_features)

    def norm_parameter(self, cfg: TPModelConfig, device: torch.device | str) -> nn.Parameter:
        # Not all ones, so that a norm applied to the wrong shard or twice changes the result.
        weight = 1.0 + 0.1 * torch.randn(cfg.hidden_size, generator=self.gen)
        return nn.Parameter(weight.to(device=device, dtype=cfg.dtype), requires_grad=False)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm with the residual add fused in front, in fp32: returns (normed, new residual).

    The plain decomposition (not a fused op) so that the sequence-parallel pass sees the
    ``add -> pow -> mean -> rsqrt -> mul`` chain right after the all_reduce.
    """
    h = x.float()
    if residual is not None:
        h = h + residual.float()
    new_residual = h.to(x.dtype)
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return normed.to(x.dtype), new_residual


class TPLinear(nn.Module):
    """``x @ W_shard.t()`` in ``cfg.dtype``. The FP8 variants subclass it and change :meth:`forward`."""

    def __init__(self, shard: torch.Tensor, full: torch.Tensor, cfg: TPModelConfig, device: torch.device | str) -> None:
        super().__init__()
        self.weight = nn.Parameter(shard.to(device=device, dtype=cfg.dtype).contiguous(), requires_grad=False)

    @staticmethod
    def build(shard: torch.Tensor, full: torch.Tensor, cfg: TPModelConfig, device: torch.device | str) -> TPLinear:
        """The linear for ``cfg.linear``; ``full`` is the unsharded weight (FP8 scales come from it)."""
        cls = {"bf16": TPLinear, "scaled_mm": ScaledMMLinear, "bmm_fp8": BmmFP8Linear}[cfg.linear]
        return cls(shard, full, cfg, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class FP8Linear(TPLinear):
    """Static per-tensor FP8: the weight is stored as a contiguous (N, K) float8_e4m3fn matrix."""

    def __init__(self, shard: torch.Tensor, full: torch.Tensor, cfg: TPModelConfig, device: torch.device | str) -> None:
        nn.Module.__init__(self)
        weight_scale = full.abs().amax().clamp(min=1e-12) / FP8_MAX
        fp8 = (shard / weight_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        self.weight = nn.Parameter(fp8.to(device).contiguous(), requires_grad=False)
        # One-element (not 0-d) fp32 scales: what cuBLASLt, bmm_fp8 and the symm_mem ops call tensor-wise.
        self.register_buffer("weight_scale", weight_scale.reshape(1).to(device=device, dtype=torch.float32))
        self.register_buffer(
            "input_scale", torch.tensor([cfg.fp8_activation_amax / FP8_MAX], dtype=torch.float32, device=device)
        )
        self.out_dtype = cfg.dtype

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() / self.input_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


class ScaledMMLinear(FP8Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch._scaled_mm(
            self.quantize(x), self.weight.t(), self.input_scale, self.weight_scale, out_dtype=self.out_dtype
        )


class BmmFP8Linear(FP8Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.fusionpasses.bmm_fp8(
            self.quantize(x).unsqueeze(0),
            self.weight.t().unsqueeze(0),
            self.input_scale,
            self.weight_scale,
            self.out_dtype,
            "cublas",
        )
        return out.squeeze(0)


class TPAttention(nn.Module):
    """Column-parallel QKV (this rank's query and KV heads), causal SDPA, row-parallel O, all_reduce."""

    def __init__(
        self,
        cfg: TPModelConfig,
        group: dist.ProcessGroup | None = None,
        device: torch.device | str = "cpu",
        *,
        tensor_parallel: bool = True,
        weights: WeightStream | None = None,
    ) -> None:
        super().__init__()
        self.place = place = Placement.resolve(group, tensor_parallel)
        cfg.check_world_size(place.world_size)
        weights = weights or WeightStream(cfg.seed)
        d = cfg.head_dim
        self.num_heads = cfg.num_heads // place.world_size
        self.num_kv_heads = cfg.num_kv_heads // place.world_size
        self.head_dim = d
        q = weights.matrix(cfg.num_heads * d, cfg.hidden_size)
        k = weights.matrix(cfg.num_kv_heads * d, cfg.hidden_size)
        v = weights.matrix(cfg.num_kv_heads * d, cfg.hidden_size)
        o = weights.matrix(cfg.hidden_size, cfg.num_heads * d)
        qkv_full = torch.cat([q, k, v])
        qkv_shard = torch.cat([place.shard(q, 0), place.shard(k, 0), place.shard(v, 0)])
        self.qkv = TPLinear.build(qkv_shard, qkv_full, cfg, device)
        self.o = TPLinear.build(place.shard(o, 1), o, cfg, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.reshape(tokens, self.num_heads, self.head_dim).transpose(0, 1)
        k = k.reshape(tokens, self.num_kv_heads, self.head_dim).transpose(0, 1)
        v = v.reshape(tokens, self.num_kv_heads, self.head_dim).transpose(0, 1)
        # Repeat K/V per query group instead of SDPA's enable_gqa, which not every backend supports.
        groups = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=0), v.repeat_interleave(groups, dim=0)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        attn = attn.transpose(0, 1).reshape(tokens, q_size)
        return self.place.all_reduce(self.o(attn))


class TPMLP(nn.Module):
    """Column-parallel gate/up (one fused weight), SiLU(gate) * up, row-parallel down, all_reduce."""

    def __init__(
        self,
        cfg: TPModelConfig,
        group: dist.ProcessGroup | None = None,
        device: torch.device | str = "cpu",
        *,
        tensor_parallel: bool = True,
        weights: WeightStream | None = None,
    ) -> None:
        super().__init__()
        self.place = place = Placement.resolve(group, tensor_parallel)
        cfg.check_world_size(place.world_size)
        weights = weights or WeightStream(cfg.seed)
        gate = weights.matrix(cfg.intermediate_size, cfg.hidden_size)
        up = weights.matrix(cfg.intermediate_size, cfg.hidden_size)
        down = weights.matrix(cfg.hidden_size, cfg.intermediate_size)
        self.gate_up = TPLinear.build(
            torch.cat([place.shard(gate, 0), place.shard(up, 0)]), torch.cat([gate, up]), cfg, device
        )
        self.down = TPLinear.build(place.shard(down, 1), down, cfg, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.place.all_reduce(self.down(F.silu(gate) * up))


class TPDecoderLayer(nn.Module):
    def __init__(
        self, cfg: TPModelConfig, group: dist.ProcessGroup | None, device: torch.device | str, tensor_parallel: bool, weights: WeightStream
    ) -> None:
        super().__init__()
        self.eps = cfg.eps
        self.input_norm = weights.norm_parameter(cfg, device)
        self.attn = TPAttention(cfg, group, device, tensor_parallel=tensor_parallel, weights=weights)
        self.post_attn_norm = weights.norm_parameter(cfg, device)
        self.mlp = TPMLP(cfg, group, device, tensor_parallel=tensor_parallel, weights=weights)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = rms_norm(x, self.input_norm, self.eps, residual)
        h, residual = rms_norm(self.attn(h), self.post_attn_norm, self.eps, residual)
        return self.mlp(h), residual


class TPTransformer(nn.Module):
    """``num_layers`` decoder layers and a final RMSNorm (with the last residual add): (T, H) -> (T, H).

    ``group``: the tensor-parallel group (None: WORLD when a process group is initialized, else one
    device). ``tensor_parallel=False`` builds the unsharded model (full weights, no collectives) even
    inside a process group: the reference every world size must agree with.
    """

    def __init__(
        self,
        cfg: TPModelConfig,
        group: dist.ProcessGroup | None = None,
        device: torch.device | str = "cpu",
        *,
        tensor_parallel: bool = True,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.place = Placement.resolve(group, tensor_parallel)
        cfg.check_world_size(self.place.world_size)
        weights = WeightStream(cfg.seed)
        self.layers = nn.ModuleList(
            TPDecoderLayer(cfg, group, device, tensor_parallel, weights) for _ in range(cfg.num_layers)
        )
        self.final_norm = weights.norm_parameter(cfg, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual)
        return rms_norm(x, self.final_norm, self.cfg.eps, residual)[0]


def example_input(cfg: TPModelConfig, num_tokens: int, device: torch.device | str = "cpu", seed: int | None = None) -> torch.Tensor:
    """Hidden states (num_tokens, hidden) in ``cfg.dtype``, identical on every rank for one seed."""
    gen = torch.Generator().manual_seed(cfg.seed + 1 if seed is None else seed)
    return torch.randn(num_tokens, cfg.hidden_size, generator=gen).to(device=device, dtype=cfg.dtype)


def reference_forward(cfg: TPModelConfig, x: torch.Tensor) -> torch.Tensor:
    """The unsharded model's output for ``x`` (eager, on ``x``'s device): what every world size computes."""
    model = TPTransformer(cfg, device=x.device, tensor_parallel=False)
    with torch.no_grad():
        return model(x)
