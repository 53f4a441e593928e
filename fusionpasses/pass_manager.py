"""PassManager: the one Inductor ``CustomGraphPass`` that runs the enabled passes in order."""

from __future__ import annotations

import hashlib
import importlib
import logging
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from . import envs
from .config import FusionConfig
from .inspection import PassStats, format_report
from .passes import PASS_ORDER, FusionPass

log = logging.getLogger("fusionpasses")

_PACKAGE_DIRS = (Path(__file__).resolve().parent,)


def _source_files() -> list[Path]:
    # Every source file of fusionpasses and of the kernel backend: a pass's behaviour depends on its
    # patterns and on the fake impls of the ops it emits, so any of them changing must miss the cache.
    import fusionpasses.kernels as kernels_pkg

    dirs = [*_PACKAGE_DIRS, Path(kernels_pkg.__file__).resolve().parent]
    return sorted({p for d in dirs for p in d.rglob("*.py")})


class PassManager(CustomGraphPass):
    """Runs the passes that ``config`` enables, in the documented order of ``PASS_ORDER``.

    Register one instance per compile (torch 2.11 accepts one pass object per hook)::

        torch.compile(model, options={"post_grad_custom_post_pass": PassManager(cfg)})

    or ``torch.compile(model, options=fusionpasses.compile_options(cfg))``.
    """

    def __init__(self, config: FusionConfig | None = None) -> None:
        self.config = config or FusionConfig()
        dump_dir = self.config.dump_dir or envs.dump_dir()
        # Import the kernel backend so every op a pass may emit is registered before it is traced.
        import fusionpasses.kernels  # noqa: F401

        self.passes: list[FusionPass] = []
        for switch, module, cls_name in PASS_ORDER:
            if getattr(self.config, switch):
                cls = getattr(importlib.import_module(f"fusionpasses.passes.{module}"), cls_name)
                self.passes.append(cls(self.config, dump_dir=dump_dir))
        self._disabled: dict[str, str] = {}
        for p in self.passes:
            reason = p.disabled_reason()
            if reason is not None:
                self._disabled[p.name] = reason
                p.note(f"pass off: {reason}")
        self._uuid: str | None = None

    def __call__(self, graph: fx.Graph) -> None:
        for p in self.passes:
            if p.name not in self._disabled:
                p(graph)

    def uuid(self) -> str:
        """Changes with the config, any source file of fusionpasses or its kernels, and torch's version."""
        if self._uuid is None:
            h = hashlib.sha256()
            h.update(torch.__version__.encode())
            h.update(self.config.fingerprint().encode())
            for path in _source_files():
                h.update(path.name.encode())
                h.update(path.read_bytes())
            self._uuid = h.hexdigest()
        return self._uuid

    # -- inspection -------------------------------------------------------------------------
    def pass_by_name(self, name: str) -> FusionPass:
        for p in self.passes:
            if p.name == name:
                return p
        raise KeyError(f"no enabled pass named {name!r}; enabled: {[p.name for p in self.passes]}")

    def stats(self) -> list[PassStats]:
        return [p.stats for p in self.passes]

    def report(self) -> str:
        return format_report(self.stats())

    def reset_stats(self) -> None:
        for p in self.passes:
            p.stats.reset()


def compile_options(config: FusionConfig | None = None, **inductor_options: Any) -> dict[str, Any]:
    """The ``options`` dict for ``torch.compile`` that installs a PassManager for ``config``.

    Extra keyword arguments are passed through as Inductor options (scoped to this compile).
    """
    return {"post_grad_custom_post_pass": PassManager(config), **inductor_options}
