"""FusionConfig: the one frozen description of what the passes do.

The pass manager hashes this object into its ``uuid()``, so every field must be a plain value
(bool, int, float, str, tuple, None): a change of any field invalidates Inductor's FX graph cache.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

SymmMemMode = Literal["auto", "assume", "off"]
AsyncTPGating = Literal["cost_model", "always"]


@dataclass(frozen=True)
class SPThreshold:
    """When sequence parallelism pays off on one GPU family."""

    min_hidden_size: int
    """Hidden sizes below this are left alone: the norm is too cheap to be worth sharding."""

    min_per_gpu_mib: float
    """Activation MiB per GPU (tokens * hidden * dtype size / world size) below which SP is off."""


@dataclass(frozen=True)
class FusionConfig:
    """Which passes run and with which knobs. Pass it to :class:`fusionpasses.PassManager`."""

    # ---- pass switches (the pass manager runs them in the order of PASS_ORDER) -------------
    batch_invariant: bool = False
    """Rewrite FP8 GEMMs (``aten._scaled_mm``, ``fusionpasses.bmm_fp8``) onto the batch-invariant GEMM,
    and turn the collective passes off (with a logged reason) since they would reorder reductions."""

    sequence_parallel: bool = False
    """Rewrite ``all_reduce -> RMSNorm`` into ``reduce_scatter -> RMSNorm on the token shard -> all_gather``."""

    async_tp: bool = False
    """Fuse ``all_gather -> GEMM`` and ``GEMM -> reduce_scatter`` onto pipelined SymmetricMemory ops."""

    fp8_attention_quant: bool = False
    """Rewrite the traced per-tensor FP8 quantization + head_dim pad of Q/K/V onto the fused kernel."""

    nvfp4_pad_fold: bool = False
    """Fold ``pad(nvfp4_quant(x))`` (values and block scales along K) into the quant kernel's padded output."""

    cond_padding: bool = False
    """Turn unconditional pad -> aligned op -> slice into ``torch.cond(M % align != 0, padded, direct)``."""

    # ---- collectives ----------------------------------------------------------------------
    group_names: tuple[str, ...] | None = None
    """Process-group names the collective passes may rewrite; None means any group in the graph."""

    symm_mem: SymmMemMode = "auto"
    """How AsyncTP decides SymmetricMemory is usable: "auto" checks the group is enabled (see
    :func:`fusionpasses.setup_symm_mem`) and on CUDA; "assume" skips the check (inspection on CPU with a
    fake process group, where the rewrite is shown but cannot run); "off" declines every AsyncTP match."""

    # ---- shapes -------------------------------------------------------------------------
    token_range: tuple[int, int] | None = None
    """Declared (min, max) of the global token count M when it is dynamic. Gating uses the whole range;
    without it, gating falls back to the size hint and says so in its decision."""

    # ---- AsyncTP gating ---------------------------------------------------------------------
    async_tp_gating: AsyncTPGating = "cost_model"
    """"cost_model": fuse only where the model predicts a win; "always": fuse every safe match."""

    async_tp_min_speedup: float = 1.05
    """Predicted unfused/fused time ratio a match must reach to be fused under the cost model. The
    default is a margin of the run-to-run noise (about 5%, docs/benchmarks.md): on the recorded 90-shape
    grids (2x and 4x H200) every shape it fuses measured >= 1.06x at ws=2 and >= 1.02x at ws=4, while a
    margin of 1.0 would have fused one that ran at 0.97x at ws=4. A wider margin gives up the largest
    GEMMs, where a few percent of the GEMM's time is a whole all_gather hidden."""

    link_gbps: float | None = None
    """Per-GPU peer bandwidth (GB/s) for the cost model; None uses the calibrated value for the GPU."""

    # ---- sequence parallelism thresholds ---------------------------------------------------
    sp_thresholds: tuple[tuple[int, SPThreshold], ...] | None = None
    """Override of the per-family table as ((major capability, threshold), ...); None = built-in table
    (Hopper 9: 8192 / 8 MiB, Blackwell 10: 8192 / 32 MiB, other families off)."""

    sp_min_tokens: int | None = None
    """Override of the computed minimum token count; 0 means SP applies whenever M divides."""

    # ---- hardware -------------------------------------------------------------------------
    device_capability: tuple[int, int] | None = None
    """Pretend this compute capability (e.g. (9, 0) for H100/H200, (10, 0) for B200); None reads the
    current CUDA device, and on a machine without one the capability-gated decisions decline."""

    # ---- inspection -------------------------------------------------------------------------
    dump_dir: str | None = None
    """Write each pass's graph before and after to this directory (also FUSIONPASSES_DUMP_DIR)."""

    record_graphs: bool = False
    """Keep a snapshot of every graph before and after each pass in the stats (for the HTML report)."""

    extra: tuple[tuple[str, Any], ...] = field(default=())
    """Free-form (key, value) pairs a pass may read; part of the cache key like every other field."""

    def __post_init__(self) -> None:
        if self.symm_mem not in ("auto", "assume", "off"):
            raise ValueError(f"symm_mem must be 'auto', 'assume' or 'off', got {self.symm_mem!r}")
        if self.async_tp_gating not in ("cost_model", "always"):
            raise ValueError(f"async_tp_gating must be 'cost_model' or 'always', got {self.async_tp_gating!r}")
        if self.async_tp_min_speedup <= 0:
            raise ValueError(f"async_tp_min_speedup must be positive, got {self.async_tp_min_speedup}")
        if self.link_gbps is not None and self.link_gbps <= 0:
            raise ValueError(f"link_gbps must be positive, got {self.link_gbps}")
        if self.token_range is not None:
            lo, hi = self.token_range
            if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
                raise ValueError(f"token_range must be (min, max) with 1 <= min <= max, got {self.token_range}")
        if self.sp_min_tokens is not None and self.sp_min_tokens < 0:
            raise ValueError(f"sp_min_tokens must be >= 0, got {self.sp_min_tokens}")
        if self.sp_thresholds is not None:
            for entry in self.sp_thresholds:
                if not (len(entry) == 2 and isinstance(entry[0], int) and isinstance(entry[1], SPThreshold)):
                    raise ValueError(f"sp_thresholds entries must be (major, SPThreshold), got {entry!r}")
        if self.device_capability is not None and (
            len(self.device_capability) != 2 or not all(isinstance(v, int) for v in self.device_capability)
        ):
            raise ValueError(f"device_capability must be (major, minor), got {self.device_capability!r}")
        if self.group_names is not None and not all(isinstance(g, str) for g in self.group_names):
            raise ValueError(f"group_names must be a tuple of strings, got {self.group_names!r}")

    def replace(self, **changes: Any) -> FusionConfig:
        return dataclasses.replace(self, **changes)

    def extra_value(self, key: str, default: Any = None) -> Any:
        return dict(self.extra).get(key, default)

    def fingerprint(self) -> str:
        """A stable text form of every field, for the cache key."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, default=repr)

    def allows_group(self, group_name: str) -> bool:
        return self.group_names is None or group_name in self.group_names
