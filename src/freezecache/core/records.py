"""Typed records that stages hand to each other as JSON files.

``costs.json`` (:class:`Costs`): what a method costs over its whole schedule, written by every
training stage (a method's last stage therefore holds the method's numbers) and read by the
report. The ``version`` field says what the file holds; a reader refuses another version with
one line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from freezecache.core.errors import FreezecacheError
from freezecache.core.io import read_json

COSTS_VERSION = 1


@dataclass
class StateCost:
    """One freezing state of a method's schedule: its epochs and what a step of it holds."""

    state: str  # full, freeze or discard
    position: int  # blocks frozen (0 for full)
    epochs: int
    accounted_memory_mb: float
    memory_breakdown_mb: dict[str, float] = field(default_factory=dict)
    cuda_peak_mb: float | None = None
    cache_in_ram_mb: float = 0.0  # the compressed cache held in host memory in this state


@dataclass
class Costs:
    """What a method costs (Appendix A.1 of the paper): accounted memory per freezing state, its
    average and minimum, training FLOPs with their breakdown, and the stage's own process."""

    avg_memory_mb: float | None = None
    min_memory_mb: float | None = None
    train_flops: float | None = None
    cuda_avg_memory_mb: float | None = None
    cuda_min_memory_mb: float | None = None
    states: list[StateCost] = field(default_factory=list)
    flops: dict = field(default_factory=dict)  # training_flops' breakdown
    parts: dict = field(default_factory=dict)  # per block position: prefix/suffix FLOPs
    source: str | None = None  # pretrain: where the starting weights came from
    stage_wall_s: float | None = None  # this stage's process, start-up included
    peak_rss_mb: float | None = None
    timings: dict = field(default_factory=dict)  # where the stage's time went (steps.run.Run)
    version: int = COSTS_VERSION

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: dict, source: str = "a costs record") -> Costs:
        if raw.get("version") != COSTS_VERSION:
            raise FreezecacheError(
                f"{source} has costs version {raw.get('version')}, this freezecache reads "
                f"{COSTS_VERSION} — rerun `dvc repro` for the stage that writes it"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        values["states"] = [StateCost(**s) for s in raw.get("states", [])]
        return cls(**values)

    @classmethod
    def load(cls, path: Path) -> Costs:
        return cls.from_json(read_json(path), str(path))
