"""GPU family facts the passes gate on, with the config's pretend capability taking precedence."""

from __future__ import annotations

import torch

from .config import FusionConfig

GPU_FAMILY_NAMES = {8: "Ampere/Ada", 9: "Hopper", 10: "Blackwell", 11: "Blackwell", 12: "Blackwell (consumer)"}


def device_capability(config: FusionConfig) -> tuple[int, int] | None:
    """The capability the passes should assume: the config's override, else the current CUDA device."""
    if config.device_capability is not None:
        return config.device_capability
    if torch.cuda.is_available():
        return torch.cuda.get_device_capability()
    return None


def family_name(capability: tuple[int, int] | None) -> str:
    if capability is None:
        return "no GPU"
    return f"sm{capability[0]}{capability[1]} ({GPU_FAMILY_NAMES.get(capability[0], 'unknown family')})"
