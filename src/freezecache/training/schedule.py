"""Each method's run as a sequence of freezing states, from the freeze points.

A phase is ``(state, position, start, end)``: epochs [start, end) in freezing state ``full``
(everything trains), ``freeze`` at a block position (FreezeOut: the prefix still runs forward)
or ``discard`` (the prefix is gone; the rest trains from the cache). The epoch ranges come from
:meth:`freezecache.config.Config.point_epochs`, the one place that computes them.
"""

from __future__ import annotations

from typing import NamedTuple

from freezecache.config import Config
from freezecache.core.methods import method


class Phase(NamedTuple):
    state: str
    position: int
    start: int
    end: int

    @property
    def epochs(self) -> int:
        return self.end - self.start


def phases(cfg: Config, name: str) -> list[Phase]:
    """The phases of method ``name`` over the whole run, the shared prefix included."""
    m = method(name)
    total = cfg.train.epochs
    if not m.uses_points or not cfg.points:
        return [Phase("full", 0, 0, total)]
    state = "discard" if m.kind == "discard" else "freeze"
    out = [Phase("full", 0, 0, cfg.prefix_epochs)]
    for i, p in enumerate(cfg.points):
        out.append(Phase(state, p.block, *cfg.point_epochs(i)))
    return out
