"""Whether SymmetricMemory can carry the fused collective ops for a process group.

On torch 2.11 and 2.13 the pipelines need the group registered through the deprecated
``enable_symm_mem_for_group`` (torch >= 2.14 drops that requirement). ``setup_symm_mem`` does it
once per group, without the FutureWarning, and never allocates or rendezvouses: the workspace is
allocated collectively by the first fused op that runs, on every rank alike.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from .config import FusionConfig

_setup_groups: set[str] = set()


def _group_name(group: dist.ProcessGroup | str) -> str:
    return group if isinstance(group, str) else group.group_name


def setup_symm_mem(group: dist.ProcessGroup | str) -> str:
    """Register ``group`` for SymmetricMemory (idempotent). Returns the group's name."""
    from torch.distributed import _symmetric_memory as sm

    name = _group_name(group)
    if name not in _setup_groups:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            sm.enable_symm_mem_for_group(name)
        _setup_groups.add(name)
    return name


def unavailable_reason(group_name: str, config: FusionConfig) -> str | None:
    """None when the fused ops can run on ``group_name``, else why not (used as a decline reason)."""
    if config.symm_mem == "off":
        return "FusionConfig.symm_mem='off'"
    if config.symm_mem == "assume":
        return None
    if not torch.cuda.is_available():
        return "no CUDA device: SymmetricMemory needs GPUs with peer access (FusionConfig.symm_mem='assume' shows the rewrite anyway)"
    if not dist.is_available() or not dist.is_initialized():
        return "torch.distributed is not initialized"
    try:
        group = dist.distributed_c10d._resolve_process_group(group_name)
    except (KeyError, ValueError, RuntimeError) as e:
        return f"process group {group_name!r} does not resolve: {e}"
    from torch.distributed import _symmetric_memory as sm

    backend = sm.get_backend(torch.device("cuda"))
    if backend not in (None, "CUDA"):
        return f"the fused ops' workspace needs the CUDA SymmetricMemory backend, this process uses {backend}"
    local = torch.cuda.device_count()
    if group.size() > 1 and local < group.size():
        return f"group {group_name!r} spans {group.size()} ranks but this host has {local} GPUs: peers must share a host"
    current = torch.cuda.current_device()
    for peer in range(min(local, group.size())):
        if peer != current and not torch.cuda.can_device_access_peer(current, peer):
            return f"GPU {current} has no peer access to GPU {peer}"
    setup_symm_mem(group_name)
    return None
