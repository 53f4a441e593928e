"""When does fusing a collective into its GEMM pay off? A small, calibrated cost model.

Unfused, the collective and the GEMM run back to back:

    t_unfused = t_gemm(M) + t_collective(bytes)

Fused, the GEMM runs in ws row chunks overlapped with peer copies, but the pipeline is issued from
Python (chunking, peer buffers, barriers, one GEMM call per chunk), so small problems are bound by
that host time instead:

    t_fused = max(t_host(kind, ws), max(ws * t_gemm(M / ws), t_copy(bytes)) + ws * t_step)

with t_gemm(M) = 2·M·K·N / rate(dtype) + t_call(kind). The constants are calibrated from measurements
on 2×H200 (torch 2.11, NVLink, multicast off; shared/research/torch_micro_tp.md §2.8 and
device_measurements_h200.md): torch's fused _scaled_mm is 0.56× at 4096³ and 1.19× at 8192³, and the
fused path with FlashInfer's public bmm_fp8 has a ~0.7 ms floor. docs/benchmarks.md has the latest
measurements of this project's ops; ``GpuProfile`` fields can be overridden through the config.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .config import FusionConfig


@dataclass(frozen=True)
class GpuProfile:
    name: str
    fp8_tflops: float
    """Achieved dense FP8 GEMM rate at large sizes (TFLOP/s)."""
    bf16_tflops: float
    """Achieved dense bf16 GEMM rate at large sizes (TFLOP/s)."""
    collective_gbps: float
    """NCCL all_gather / reduce_scatter bus rate per GPU, multicast off (GB/s)."""
    collective_latency_us: float
    link_gbps: float
    """Peer copy rate over NVLink through SymmetricMemory buffers (GB/s)."""
    step_us: float
    """GPU-side cost of one pipeline step (barrier + copy launch)."""
    hbm_gbps: float
    """Device memory rate (read + write), for the local reduction of reduce_scatter partials (GB/s)."""
    host_us: dict[str, float]
    """Host time to issue one fused call, by GEMM kind: the floor of the fused path without CUDA graphs."""
    call_us: dict[str, float]
    """Launch cost of one GEMM call by kind, beyond its arithmetic."""


HOPPER = GpuProfile(
    name="Hopper (H100/H200)",
    fp8_tflops=1300.0,
    bf16_tflops=700.0,
    collective_gbps=270.0,
    collective_latency_us=15.0,
    link_gbps=300.0,
    step_us=10.0,
    hbm_gbps=4000.0,
    host_us={"mm": 280.0, "scaled_mm": 280.0, "bmm_fp8": 280.0, "bmm_fp8_public": 750.0},
    call_us={"mm": 8.0, "scaled_mm": 10.0, "bmm_fp8": 12.0, "bmm_fp8_public": 86.0},
)

# Blackwell: faster GEMMs shrink the window a copy can hide in; kept conservative until measured.
BLACKWELL = replace(
    HOPPER,
    name="Blackwell (B200/B300)",
    fp8_tflops=2600.0,
    bf16_tflops=1400.0,
    collective_gbps=500.0,
    link_gbps=600.0,
)

PROFILES = {9: HOPPER, 10: BLACKWELL}


@dataclass(frozen=True)
class Estimate:
    m: int
    unfused_us: float
    fused_us: float

    @property
    def speedup(self) -> float:
        return self.unfused_us / self.fused_us


def profile_for(capability: tuple[int, int] | None, config: FusionConfig) -> GpuProfile | None:
    if capability is None:
        return None
    profile = PROFILES.get(capability[0])
    if profile is not None and config.link_gbps is not None:
        profile = replace(profile, link_gbps=config.link_gbps)
    return profile


def _gemm_us(profile: GpuProfile, kind: str, m: float, k: int, n: int) -> float:
    rate = profile.bf16_tflops if kind == "mm" else profile.fp8_tflops
    return 2.0 * m * k * n / (rate * 1e6) + profile.call_us[kind]


def estimate(
    profile: GpuProfile, kind: str, m: int, k: int, n: int, world_size: int, comm_bytes: int, reduce: bool = False
) -> Estimate:
    """Predicted times for one fused op. ``m`` is the global row count, ``comm_bytes`` the bytes of the
    whole gathered (or reduce-scattered) tensor; ``reduce`` adds the local sum of the ws partials."""
    moved = comm_bytes * (world_size - 1) / world_size
    unfused = (
        _gemm_us(profile, kind, m, k, n)
        + moved / (profile.collective_gbps * 1e3)
        + profile.collective_latency_us
    )
    overlapped = max(world_size * _gemm_us(profile, kind, m / world_size, k, n), moved / (profile.link_gbps * 1e3))
    local_reduce = (comm_bytes + comm_bytes / world_size) / (profile.hbm_gbps * 1e3) if reduce else 0.0
    fused = max(profile.host_us[kind], overlapped + world_size * profile.step_us + local_reduce)
    return Estimate(m=m, unfused_us=unfused, fused_us=fused)
