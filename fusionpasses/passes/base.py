"""FusionPass: what every pass shares (logger, stats, declines, timing, dumps, idempotence)."""

from __future__ import annotations

import abc
import logging
import time
from typing import ClassVar

import torch.fx as fx

from ..config import FusionConfig
from ..inspection import PassRun, PassStats, snapshot, write_dump


class FusionPass(abc.ABC):
    """Base of every pass. Subclasses set ``name`` and implement :meth:`run`.

    A pass is called once per graph Inductor compiles: the forward and the backward graph and every
    ``torch.cond`` branch (branches first, then the graph that holds them). ``run`` must therefore be
    idempotent: after a rewrite the pattern is gone, so a second call finds nothing to do.
    A pass never raises on a graph it does not understand: it declines the candidate with a reason.
    """

    name: ClassVar[str] = "pass"

    def __init__(self, config: FusionConfig, dump_dir: str | None = None) -> None:
        self.config = config
        self.dump_dir = dump_dir
        self.log = logging.getLogger(f"fusionpasses.{self.name}")
        self.stats = PassStats(self.name)
        self._graph_index = 0

    # -- what subclasses implement ----------------------------------------------------------
    @abc.abstractmethod
    def run(self, graph: fx.Graph) -> None:
        """Rewrite ``graph`` in place: fuse what is provably safe, decline the rest with a reason."""

    def disabled_reason(self) -> str | None:
        """Why this pass must not run at all under its config (None when it may run)."""
        return None

    # -- what subclasses call -----------------------------------------------------------------
    def matched(self, pattern: str, node: fx.Node | str) -> None:
        self.stats.pattern(pattern).matched += 1
        self.log.debug("%s: fused at %s", pattern, _node_name(node))

    def decline(self, pattern: str, node: fx.Node | str, reason: str) -> None:
        from ..inspection import Decline

        self.stats.pattern(pattern).declined.append(Decline(pattern, _node_name(node), reason))
        self.log.debug("%s: declined at %s: %s", pattern, _node_name(node), reason)

    def note(self, message: str) -> None:
        if message not in self.stats.notes:
            self.stats.notes.append(message)
            self.log.info(message)

    # -- what the pass manager calls --------------------------------------------------------
    def __call__(self, graph: fx.Graph) -> None:
        index = self._graph_index
        self._graph_index += 1
        record = self.config.record_graphs
        before = snapshot(graph) if record else None
        if self.dump_dir:
            write_dump(self.dump_dir, index, self.name, "before", graph)
        start = time.perf_counter()
        self.run(graph)
        graph.lint()
        elapsed = time.perf_counter() - start
        after = snapshot(graph) if record else None
        if self.dump_dir:
            write_dump(self.dump_dir, index, self.name, "after", graph)
        self.stats.runs.append(PassRun(graph_index=index, seconds=elapsed, before=before, after=after))


def _node_name(node: fx.Node | str) -> str:
    return node if isinstance(node, str) else node.name
