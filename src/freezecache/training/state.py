"""A run's state (what a stage hands to the next) and its epoch checkpoints.

Both are state files (:mod:`freezecache.core.states`): canonical bytes, a content digest inside,
checked on every load. A published state that fails its check stops the stage that reads it; a
checkpoint that fails it is dropped and the run goes on from the one before it, or from the
start: a run is never trained on from damaged bytes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from freezecache.core import interrupts
from freezecache.core.states import RESTORE, DamagedState, load_state, save_state

log = logging.getLogger(__name__)

DROPPED = "dropped; the run goes on from the checkpoint before it, or from the start"


@dataclass
class RunState:
    """What a stage hands to the next: weights, optimizer momentum by name, history."""

    model: dict
    momentum: dict[str, Tensor] = field(default_factory=dict)
    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def save(self, path: Path) -> None:
        save_state(self.__dict__, path)

    @classmethod
    def load(cls, path: Path, advice: str = RESTORE) -> RunState:
        """The state at ``path``, verified (:class:`DamagedState` with ``advice`` otherwise)."""
        return cls(**load_state(path, advice))


class Checkpoint:
    """A run's latest epoch checkpoint (``<key>.pt``) and the one before it (``<key>.prev.pt``),
    kept so that a damaged latest one costs an epoch, not the run."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.prev = self.path.with_name(f"{self.path.stem}.prev{self.path.suffix}")

    def save(self, state: RunState) -> None:
        """Writes ``state`` as the latest; the latest so far becomes the one before it. A
        Ctrl-C meanwhile waits until both are in place (the epoch is not lost)."""
        with interrupts.deferred():
            if self.path.exists():
                os.replace(self.path, self.prev)
            state.save(self.path)

    def load(self) -> RunState | None:
        """The newest checkpoint that passes its check, or None; each one that fails is removed
        with one warning line."""
        for path in (self.path, self.prev):
            if not path.is_file():
                continue
            try:
                return RunState.load(path, DROPPED)
            except DamagedState as err:
                log.warning("checkpoint %s", err)
                path.unlink(missing_ok=True)
        return None
