"""Per-layer FP8 scales of Q/K/V for vision-encoder attention, and the attention entry point using them.

Both sources answer ``scales.qkv_scales(layer, q, k, v)`` with three float32 one-element tensors on
the device of ``q``: dequantization multipliers (real ≈ fp8 * scale), what ``fusionpasses.qkv_fp8_quant``
and ``fusionpasses.fp8_attention`` take.

- :class:`StaticFP8AttentionScales`: fixed scales from a JSON file, ``{"layer": {"q": .., "k": .., "v": ..}}``,
  optionally nested under ``"layers"``; ``q_scale``/``k_scale``/``v_scale`` are accepted as key names.
- :class:`DynamicFP8AttentionScales` (the default when there is no file): each layer keeps the amax of
  its last 16 Q, K and V on the GPU; scale = max(history) / 448. Every step is device work only: no
  host synchronisation, and under ``torch.compile`` no recompilation as the history moves.
  With ``save_path``, once the first layer's history has wrapped around, every layer's current scales
  times ``save_margin`` are written to a JSON file that :class:`StaticFP8AttentionScales` loads: one
  host synchronisation, once per process. Every process writes its own file: under tensor
  parallelism give each rank its own path (or a save_path on one rank only).

:func:`fp8_vit_attention` gates on sequence length (FP8 pays off only for long sequences), then
quantizes Q/K/V with the fused kernel and runs ``fusionpasses.fp8_attention``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

import fusionpasses.kernels  # noqa: F401  (registers the ops)
from fusionpasses.kernels.fp8_attention import use_fp8_attention, varlen_attention

FP8_E4M3_MAX = 448.0
AMAX_HISTORY_LEN = 16
SCALES_FORMAT = "fusionpasses.fp8_attention_scales/1"

# Saved scales are calibrated on a few steps; headroom of 1.5x keeps larger activations from being
# clipped later. It costs little: e4m3 keeps 3 mantissa bits across its whole normal range, so the
# shift only pushes values that were within 1.5x of the smallest normal into subnormals.
DEFAULT_SAVE_MARGIN = 1.5

# A floor for amax so an all-zero tensor gives a tiny positive scale (0 / tiny = 0), never 0 / 0.
_MIN_AMAX = 1e-12

log = logging.getLogger("fusionpasses.fp8_attention_scales")


@dataclass(frozen=True)
class QKVScales:
    """One layer's dequantization scales."""

    q: float
    k: float
    v: float


class FP8AttentionScales(Protocol):
    def qkv_scales(
        self, layer: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The (q, k, v) scales to quantize this step's ``q``, ``k`` and ``v`` of ``layer`` with."""
        ...


# ---------------------------------------------------------------------------------------------
# JSON files
# ---------------------------------------------------------------------------------------------


def _scale_value(source: str, layer: str, entry: Mapping[str, object], tensor: str) -> float:
    names = [n for n in (tensor, f"{tensor}_scale") if n in entry]
    if not names:
        raise ValueError(f"{source}: layer {layer!r} has no {tensor!r} (or {tensor + '_scale'!r}) scale")
    values = [entry[n] for n in names]
    if len(values) == 2 and values[0] != values[1]:
        raise ValueError(
            f"{source}: layer {layer!r} gives two different {tensor} scales: {values[0]!r} and {values[1]!r}"
        )
    value = values[0]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"{source}: layer {layer!r}: the {tensor} scale must be a positive finite number, got {value!r}"
        )
    return float(value)


def parse_fp8_attention_scales(data: object, source: str = "scales") -> dict[str, QKVScales]:
    """Per-layer scales from decoded JSON; raises ValueError naming the layer for any bad entry."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object of layers, got {type(data).__name__}")
    layers = data["layers"] if isinstance(data.get("layers"), dict) else data
    table = {}
    for layer, entry in layers.items():
        if not isinstance(entry, dict):
            raise ValueError(f"{source}: layer {layer!r} must map to an object with q/k/v scales, got {entry!r}")
        table[layer] = QKVScales(*(_scale_value(source, layer, entry, t) for t in ("q", "k", "v")))
    if not table:
        raise ValueError(f"{source}: no layers")
    return table


def load_fp8_attention_scales(path: str | os.PathLike[str]) -> dict[str, QKVScales]:
    with open(path) as f:
        return parse_fp8_attention_scales(json.load(f), source=str(path))


def save_fp8_attention_scales(
    path: str | os.PathLike[str], table: Mapping[str, QKVScales], margin: float = 1.0
) -> None:
    """Write ``table`` (already multiplied by ``margin``, recorded for the reader) atomically."""
    payload = {
        "format": SCALES_FORMAT,
        "margin": margin,
        "layers": {name: {"q": s.q, "k": s.k, "v": s.v} for name, s in table.items()},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------
# Static scales
# ---------------------------------------------------------------------------------------------


class StaticFP8AttentionScales:
    """Fixed per-layer scales; the device tensors are made once per (layer, device)."""

    def __init__(self, table: Mapping[str, QKVScales], source: str = "the given table") -> None:
        self.table = dict(table)
        self.source = source
        self._tensors: dict[tuple[str, torch.device], torch.Tensor] = {}

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> StaticFP8AttentionScales:
        table = load_fp8_attention_scales(path)
        log.info("loaded FP8 attention scales of %d layers from %s", len(table), path)
        return cls(table, source=str(path))

    def qkv_scales(
        self, layer: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = (layer, q.device)
        scales = self._tensors.get(key)
        if scales is None:
            if layer not in self.table:
                known = ", ".join(sorted(self.table)[:5])
                raise KeyError(
                    f"no FP8 attention scales for layer {layer!r} in {self.source} "
                    f"(it has {len(self.table)} layers: {known}, ...)"
                )
            s = self.table[layer]
            scales = self._tensors[key] = torch.tensor([s.q, s.k, s.v], dtype=torch.float32, device=q.device)
        return scales[0:1], scales[1:2], scales[2:3]


# ---------------------------------------------------------------------------------------------
# Dynamic scales
# ---------------------------------------------------------------------------------------------


def _amax(x: torch.Tensor) -> torch.Tensor:
    # The inf-norm reads a strided view once, without materialising |x|.
    return torch.linalg.vector_norm(x, float("inf")).float()


class DynamicFP8AttentionScales:
    """Amax history per layer on the device; scale = max(last ``history_len`` amaxes) / 448.

    The current step's amax is part of the history before the scale is taken, so this step never
    saturates. A non-finite amax (a NaN/Inf activation) is recorded as 0 so that it cannot poison the
    next ``history_len`` steps; the bad values still propagate through this step's quantization.

    Under ``torch.compile`` a layer's first step creates its history (one recompilation); later steps
    are device work in the graph. While a save is pending, the host-side step count is a graph break.
    """

    def __init__(
        self,
        history_len: int = AMAX_HISTORY_LEN,
        save_path: str | os.PathLike[str] | None = None,
        save_margin: float = DEFAULT_SAVE_MARGIN,
    ) -> None:
        if history_len < 1:
            raise ValueError(f"history_len must be >= 1, got {history_len}")
        if not (math.isfinite(save_margin) and save_margin > 0):
            raise ValueError(f"save_margin must be a positive number, got {save_margin}")
        self.history_len = history_len
        self.save_path = None if save_path is None else Path(save_path)
        self.save_margin = save_margin
        self.history: dict[str, torch.Tensor] = {}  # layer -> (3, history_len) float32, newest first
        self._updates: dict[str, int] = {}

    def qkv_scales(
        self, layer: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        history = self.history.get(layer)
        if history is None:
            history = self.history[layer] = torch.zeros((3, self.history_len), dtype=torch.float32, device=q.device)
        amax = torch.stack([_amax(q), _amax(k), _amax(v)])
        amax = torch.where(torch.isfinite(amax), amax, torch.zeros_like(amax))
        # Shift by one and put the newest first: device work only, no position counter to sync on.
        history.copy_(torch.cat([amax[:, None], history[:, :-1]], dim=1))
        scales = self._scales(history)
        if self.save_path is not None:
            self._count_update(layer)
        return scales[0:1], scales[1:2], scales[2:3]

    @staticmethod
    def _scales(history: torch.Tensor) -> torch.Tensor:
        return history.amax(dim=1).clamp_min(_MIN_AMAX) / FP8_E4M3_MAX

    def current_scales(self) -> dict[str, QKVScales]:
        """Every layer's current scales, read to the host (one synchronisation)."""
        names = list(self.history)
        if not names:
            return {}
        values = torch.stack([self._scales(self.history[n]) for n in names]).tolist()
        return {n: QKVScales(*row) for n, row in zip(names, values)}

    @torch.compiler.disable
    def _count_update(self, layer: str) -> None:
        # Host-side bookkeeping, only while a save is pending; a graph break under torch.compile
        # until the file is written, then never again.
        count = self._updates.get(layer, 0) + 1
        self._updates[layer] = count
        if count >= self.history_len:
            self.save()

    def save(self) -> None:
        """Write every layer's current scales x ``save_margin`` to ``save_path``, then stop saving."""
        if self.save_path is None:
            raise RuntimeError("DynamicFP8AttentionScales.save: no save_path was given")
        path, self.save_path = self.save_path, None
        table = {
            n: QKVScales(s.q * self.save_margin, s.k * self.save_margin, s.v * self.save_margin)
            for n, s in self.current_scales().items()
        }
        save_fp8_attention_scales(path, table, self.save_margin)
        log.info("saved FP8 attention scales of %d layers to %s (margin %.3g)", len(table), path, self.save_margin)


def fp8_attention_scales(
    scale_path: str | os.PathLike[str] | None = None,
    *,
    save_path: str | os.PathLike[str] | None = None,
    save_margin: float = DEFAULT_SAVE_MARGIN,
    history_len: int = AMAX_HISTORY_LEN,
) -> StaticFP8AttentionScales | DynamicFP8AttentionScales:
    """Static scales when a file is given, else dynamic ones (optionally saved for later static use)."""
    if scale_path is not None:
        if save_path is not None:
            raise ValueError("save_path applies to dynamic scales; with scale_path the scales are static")
        return StaticFP8AttentionScales.from_json(scale_path)
    return DynamicFP8AttentionScales(history_len=history_len, save_path=save_path, save_margin=save_margin)


# ---------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------


def fp8_vit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    layer: str,
    scales: FP8AttentionScales,
    softmax_scale: float | None = None,
    min_fp8_seqlen: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Non-causal attention of packed (T, H, D) bf16/fp16 sequences (strided views are fine), in FP8
    when the longest sequence reaches ``min_fp8_seqlen`` (default: the measured crossover,
    ``fusionpasses.kernels.fp8_attention.FP8_ATTENTION_MIN_SEQLEN``), else in the input dtype.
    Returns (T, H, D) in the input dtype."""
    if not use_fp8_attention(max_seqlen, min_fp8_seqlen):
        return varlen_attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale)
    q_scale, k_scale, v_scale = scales.qkv_scales(layer, q, k, v)
    ops = torch.ops.fusionpasses
    q8, k8, v8 = (ops.qkv_fp8_quant(t, s) for t, s in ((q, q_scale), (k, k_scale), (v, v_scale)))
    return ops.fp8_attention(
        q8, k8, v8, q_scale, k_scale, v_scale, cu_seqlens, max_seqlen, q.shape[-1], q.dtype, softmax_scale, backend
    )
