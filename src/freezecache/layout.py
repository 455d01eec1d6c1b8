"""Where every artifact lives. Declared once: stages and the dvc.yaml renderer both use this.

The renderer passes `Paths` whose fields are DVC templates (`${paths.runs}`), so dvc.yaml
keeps reading the folders from params.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from freezecache.config import Paths


@dataclass(frozen=True)
class Layout:
    paths: Paths

    # data ---------------------------------------------------------------------------------
    @property
    def prepared(self) -> str:
        return self.paths.data

    @property
    def pretrain_data(self) -> str:
        return f"{self.paths.data}-pretrain"

    @property
    def pretrain(self) -> str:
        """Pre-training on another dataset, when params ask for it."""
        return f"{self.paths.runs}/pretrain"

    # runs ---------------------------------------------------------------------------------
    def seed_dir(self, seed: int) -> str:
        return f"{self.paths.runs}/s{seed}"

    def prefix(self, seed: int) -> str:
        """Full-model training up to the first freeze point (shared by every method)."""
        return f"{self.seed_dir(seed)}/prefix"

    def baseline(self, seed: int, method: str) -> str:
        return f"{self.seed_dir(seed)}/{method}"

    def point_dir(self, seed: int, variant: str, point: int) -> str:
        return f"{self.seed_dir(seed)}/{variant}/p{point}"

    def rank(self, seed: int, variant: str, point: int) -> str:
        return f"{self.point_dir(seed, variant, point)}/rank"

    def cache_file(self, seed: int, variant: str, point: int) -> str:
        return f"{self.paths.cache}/s{seed}/{variant}/p{point}.h5"

    def cache_stats(self, seed: int, variant: str, point: int) -> str:
        return f"{self.point_dir(seed, variant, point)}/cache.json"

    def suffix(self, seed: int, variant: str, point: int) -> str:
        return f"{self.point_dir(seed, variant, point)}/suffix"

    def method_result(self, seed: int, method: str, num_points: int) -> str:
        """The folder whose metrics.json holds a method's final numbers."""
        if method in ("normal", "freezeout"):
            return self.baseline(seed, method)
        return self.suffix(seed, method, num_points)

    # results ------------------------------------------------------------------------------
    @property
    def results(self) -> str:
        return self.paths.results

    def checkpoint(self, stage: str) -> Path:
        return Path(self.paths.checkpoints) / stage


# Files inside a run folder (the same in every stage that trains).
STATE = "state.pt"
METRICS = "metrics.json"
HISTORY = "history.csv"
COSTS = "costs.json"
