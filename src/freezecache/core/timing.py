"""Where a stage's time goes: named sections, timed only while a :class:`Sections` clock runs.

The training loop, the cache feed and the cache build mark their parts with :func:`section`
(the data wait, reading and decoding, augmentation, forward, backward, the optimizer step,
validation, ranking, the build's passes). Outside a clock a section costs one global lookup,
so the stages run unchanged; a benchmark (``make bench``) or a user who wants the breakdown of
their own run starts a clock around the code it measures. On CUDA a running clock synchronizes
the device at every section boundary it times, so each section's time is its own work. Every
stage runs a clock of the few coarse sections in :data:`STAGE_SECTIONS` and records them.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections import defaultdict
from collections.abc import Iterator

import torch

_clock: Sections | None = None


@contextlib.contextmanager
def section(name: str) -> Iterator[None]:
    """Times the block as ``name`` in the running clock, if any (nested sections add to their
    own name and to the enclosing one's)."""
    clock = _clock
    if clock is None or (clock.only is not None and name not in clock.only):
        yield
        return
    clock.sync()
    start = time.perf_counter()
    try:
        yield
    finally:
        clock.sync()
        clock.seconds[name] += time.perf_counter() - start
        clock.counts[name] += 1


# What every stage times of itself (guard.stage runs a clock of these): sections entered a few
# times per epoch or per stage, so that timing them costs nothing measurable, on CUDA too.
STAGE_SECTIONS = frozenset(
    {"validation", "accounting", "test", "ranking", "prefix forward", "flipped forward",
     "encode + write", "setup", "bn recalibration"}
)  # fmt: skip


class Sections:
    """A clock for :func:`section`: ``with Sections() as clock: ...`` then ``clock.seconds``
    (name -> seconds) and ``clock.counts`` (name -> times entered). ``only``: the names it
    times (the others run untimed, without synchronizing)."""

    def __init__(self, only: frozenset[str] | None = None) -> None:
        self.only = only
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self._outer: Sections | None = None

    @staticmethod
    def sync() -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def __enter__(self) -> Sections:
        global _clock
        self._outer, _clock = _clock, self
        return self

    def __exit__(self, *exc: object) -> None:
        global _clock
        _clock = self._outer

    def record(self) -> dict[str, float]:
        """The seconds per section, rounded for a JSON record."""
        return {name: round(s, 4) for name, s in sorted(self.seconds.items())}


def current() -> Sections | None:
    """The running clock (a stage's own, under :func:`freezecache.pipeline.guard.stage`)."""
    return _clock


def stage_timings(startup_s: float) -> dict[str, float]:
    """A stage's record of its own time: ``startup_s`` (the interpreter and the imports) and
    each section of the running clock as ``<name>_s`` (e.g. ``encode_write_s``)."""
    out = {"startup_s": round(startup_s, 4)}
    clock = current()
    if clock is not None:
        for name, seconds in clock.record().items():
            out[re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") + "_s"] = seconds
    return out
