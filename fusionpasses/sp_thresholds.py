"""When sequence parallelism pays off: a per-GPU-family table and the token count it implies.

SP trades one all_reduce for a reduce_scatter and an all_gather, and runs the norm on 1/ws of the
tokens. By itself that wins little; it pays through the AsyncTP fusions it enables, which need large
enough GEMMs to hide their pipeline overhead. So SP is gated on the activation size per GPU:

    min_tokens = floor(min_per_gpu_mib * 2**20 * world_size / (hidden * dtype size))

and is off for hidden sizes below the family's minimum. The table (keyed by the major compute
capability, so sm100, sm103 and the rest of sm10x share the Blackwell row):

    family            min hidden   MiB per GPU   e.g. hidden 8192 bf16: TP2 / TP4 / TP8
    9  (Hopper)          8192           8             1024 / 2048 / 4096
    10 (Blackwell)       8192          32             4096 / 8192 / 16384

Other families are off unless ``FusionConfig.sp_thresholds`` adds them or ``sp_min_tokens`` is set;
``sp_min_tokens`` replaces the computed minimum (and skips the table, so it works without a GPU).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .config import FusionConfig, SPThreshold
from .platform import device_capability, family_name

DEFAULT_SP_THRESHOLDS: Mapping[int, SPThreshold] = {
    9: SPThreshold(min_hidden_size=8192, min_per_gpu_mib=8.0),
    10: SPThreshold(min_hidden_size=8192, min_per_gpu_mib=32.0),
}


def threshold_table(config: FusionConfig) -> Mapping[int, SPThreshold]:
    """The config's table when it sets one, else the built-in one."""
    return dict(config.sp_thresholds) if config.sp_thresholds is not None else DEFAULT_SP_THRESHOLDS


def min_tokens_for(threshold: SPThreshold, hidden: int, world_size: int, itemsize: int) -> int | None:
    """The smallest global token count that pays off, or None when ``hidden`` is below the minimum."""
    if hidden < threshold.min_hidden_size:
        return None
    return int(threshold.min_per_gpu_mib * (1 << 20) * world_size // (hidden * itemsize))


@dataclass(frozen=True)
class MinTokens:
    """The minimum token count for one (hidden, world size, dtype), or why SP is off for all of them."""

    value: int | None
    source: str
    """Where the value comes from, or why there is none."""


def resolve_min_tokens(config: FusionConfig, hidden: int, world_size: int, itemsize: int) -> MinTokens:
    if config.sp_min_tokens is not None:
        return MinTokens(config.sp_min_tokens, f"sp_min_tokens={config.sp_min_tokens}")
    capability = device_capability(config)
    if capability is None:
        return MinTokens(
            None,
            "no GPU to pick a threshold for (no CUDA device, config.device_capability unset); "
            "set device_capability or sp_min_tokens",
        )
    family = family_name(capability)
    threshold = threshold_table(config).get(capability[0])
    if threshold is None:
        return MinTokens(None, f"no SP threshold for {family}; set sp_thresholds or sp_min_tokens")
    value = min_tokens_for(threshold, hidden, world_size, itemsize)
    if value is None:
        return MinTokens(
            None, f"hidden size {hidden} < {threshold.min_hidden_size}, the minimum on {family}: the norm is too cheap"
        )
    return MinTokens(
        value,
        f"{family}: {threshold.min_per_gpu_mib:g} MiB/GPU at hidden {hidden}, {itemsize}-byte dtype, ws {world_size}",
    )


@dataclass(frozen=True)
class TokenDecision:
    applies: bool
    reason: str


def decide_tokens(
    config: FusionConfig, min_tokens: MinTokens, static_tokens: int | None, hint: int | None = None
) -> TokenDecision:
    """Whether the token count reaches ``min_tokens``.

    ``static_tokens`` is the count of a static shape; for a dynamic one (None) the decision uses the
    whole ``config.token_range`` when declared, else ``hint`` (the size Inductor compiles for), and the
    reason says which.
    """
    if min_tokens.value is None:
        return TokenDecision(False, min_tokens.source)
    need = min_tokens.value
    if static_tokens is not None:
        ok = static_tokens >= need
        relation = ">=" if ok else "<"
        return TokenDecision(ok, f"{static_tokens} tokens {relation} min_tokens {need} ({min_tokens.source})")
    if config.token_range is not None:
        lo, hi = config.token_range
        ok = lo >= need
        return TokenDecision(
            ok,
            f"dynamic token count, declared token_range ({lo}, {hi}) "
            f"{'starts at or above' if ok else 'reaches below'} min_tokens {need} ({min_tokens.source})",
        )
    if hint is None:
        return TokenDecision(False, f"dynamic token count without a size hint or token_range; min_tokens {need}")
    ok = hint >= need
    return TokenDecision(
        ok,
        f"dynamic token count, decided on its size hint {hint} {'>=' if ok else '<'} min_tokens {need} "
        f"(no token_range declared) ({min_tokens.source})",
    )
