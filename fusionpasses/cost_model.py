"""When does fusing a collective into its GEMM pay off? A small, calibrated cost model.

Unfused, the collective and the GEMM run back to back:

    t_unfused = t_gemm(M) + moved_bytes / collective_rate + latency

Fused, the GEMM runs in ws row chunks overlapped with peer copies. Chunking changes the GEMM's own
speed (cuBLAS picks other kernels for M / ws rows), copies compete with it for memory bandwidth, and
the pipeline is issued from Python, so small problems are bound by host time:

    t_fused = max(t_host, a[kind, side] * t_gemm(M) + b[kind, side], moved_bytes / link_rate + t_gemm(M) / ws)

The constants were fitted by scripts/fit_async_tp_cost_model.py to scripts/bench_async_tp.py runs on
2x and 4x H200 (torch 2.11, NVLink, multicast off, 2026-11-22; docs/benchmarks.md), one fit per world
size, each GEMM kind on the pipeline schedule it uses (kernels/_symm_mem_pipeline.py): (a, b) is a
line through fused time against GEMM-alone time over the grid's shapes with GEMMs >= 0.15 ms, with b
raised to the 90th percentile of the residuals so that mid-size shapes, where chunked cuBLAS kernels
vary most, are not overrated; t_host is the smallest host time of a fused call (its Python pipeline;
the benchmark queues every call ahead of the GPU to time the device alone, and times the host on the
side). Under CUDA graphs the host term does not apply, so the model errs towards keeping small GEMMs
unfused. ``FusionConfig.async_tp_min_speedup`` adds a margin for run-to-run noise.
A group of a world size with no fit of its own takes the fit of the largest size below it. That errs
towards fusing: the 2-rank fit rated 4-rank fused ops up to 22% too high (and fused one shape that ran
at 0.97x), which is why TP4 has its own; TP8 has none yet (no 8-GPU machine here), so there raise
``async_tp_min_speedup``. The unfused side's NCCL rate is not refitted per size, so predicted speedups
of large shapes still run high at TP4 (1.37x predicted, 1.14x measured, at the worst); the gate's
decisions on the 4-rank grid lose nothing (every fused shape measured >= 1.0x).
Re-fit on other hardware with the same two scripts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .config import FusionConfig


@dataclass(frozen=True)
class ChunkingFit:
    """What chunking and the Python pipeline cost at one world size (fit_async_tp_cost_model.py)."""

    host_us: float
    """Fastest fused call's host time: its Python pipeline (chunking, buffers, handshakes, one GEMM per chunk)."""
    chunked: dict[tuple[str, str], tuple[float, float]]
    """(a, b): fused time = a * unchunked GEMM time + b us when the copies hide, by (kind, "ag" | "rs")."""


@dataclass(frozen=True)
class GpuProfile:
    name: str
    fp8_tflops: float
    """Achieved dense FP8 GEMM rate at large sizes (TFLOP/s)."""
    bf16_tflops: float
    """Achieved dense bf16 GEMM rate at large sizes (TFLOP/s)."""
    collective_gbps: float
    """NCCL all_gather / reduce_scatter rate per GPU over the bytes each GPU receives, multicast off (GB/s)."""
    collective_latency_us: float
    link_gbps: float
    """Peer copy rate over NVLink through SymmetricMemory buffers (GB/s)."""
    call_us: dict[str, float]
    """Launch cost of one GEMM call by kind, beyond its arithmetic."""
    fits: dict[int, ChunkingFit] = field(default_factory=dict)
    """By the world size it was measured at."""

    def fit_for(self, world_size: int) -> tuple[int, ChunkingFit]:
        """The fit of the largest measured world size <= ``world_size`` (the smallest one if none is)."""
        sizes = sorted(self.fits)
        size = max((s for s in sizes if s <= world_size), default=sizes[0])
        return size, self.fits[size]


HOPPER = GpuProfile(
    name="Hopper (H100/H200)",
    fp8_tflops=1350.0,
    bf16_tflops=690.0,
    collective_gbps=200.0,
    collective_latency_us=15.0,
    link_gbps=300.0,
    call_us={"mm": 8.0, "scaled_mm": 10.0, "bmm_fp8": 12.0},
    fits={
        2: ChunkingFit(host_us=210.0, chunked={
            ("bmm_fp8", "ag"): (1.06, 16.0), ("bmm_fp8", "rs"): (1.04, 53.0),
            ("scaled_mm", "ag"): (0.99, 51.0), ("scaled_mm", "rs"): (1.06, 66.0),
            ("mm", "ag"): (0.95, 133.0), ("mm", "rs"): (1.03, 71.0),
        }),
        4: ChunkingFit(host_us=310.0, chunked={
            ("bmm_fp8", "ag"): (1.03, 56.0), ("bmm_fp8", "rs"): (1.08, 88.0),
            ("scaled_mm", "ag"): (1.07, 77.0), ("scaled_mm", "rs"): (1.14, 62.0),
            ("mm", "ag"): (0.96, 107.0), ("mm", "rs"): (1.02, 122.0),
        }),
    },
)

# Blackwell: not measured here. Faster GEMMs shrink the window a copy can hide in; the Hopper
# chunking costs are kept, which the faster links (NVLink 5) do not make worse.
BLACKWELL = replace(
    HOPPER,
    name="Blackwell (B200/B300)",
    fp8_tflops=2600.0,
    bf16_tflops=1400.0,
    collective_gbps=400.0,
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
    whole gathered (or reduce-scattered) tensor; ``reduce`` selects the reduce-scatter side."""
    moved = comm_bytes * (world_size - 1) / world_size
    gemm = _gemm_us(profile, kind, m, k, n)
    unfused = gemm + moved / (profile.collective_gbps * 1e3) + profile.collective_latency_us
    _, fit = profile.fit_for(world_size)
    a, b = fit.chunked[(kind, "rs" if reduce else "ag")]
    fused = max(fit.host_us, a * gemm + b, moved / (profile.link_gbps * 1e3) + gemm / world_size)
    return Estimate(m=m, unfused_us=unfused, fused_us=fused)


def estimate_benchmark_row(profile: GpuProfile, row: dict, world_size: int | None = None) -> Estimate:
    """:func:`estimate` for one result of scripts/bench_async_tp.py's JSON, whose all_gathers move A
    (one byte per element for the FP8 kinds, two for bf16 ``mm``) and whose reduce_scatters a bf16 output."""
    kind, m, k, n = row["kind"], row["M"], row["K"], row["N"]
    reduce = row["side"] == "rs"
    comm_bytes = m * n * 2 if reduce else m * k * (2 if kind == "mm" else 1)
    return estimate(profile, kind, m, k, n, world_size or row["world_size"], comm_bytes, reduce=reduce)
