"""Stage train_prefix: train the whole model up to the first freeze point (shared by methods)."""

# isort: off
import _env  # noqa: F401  (first: without the venv, one line instead of a traceback)
# isort: on

from pathlib import Path

import typer

from freezecache.pipeline.guard import Params, Seed, stage
from freezecache.steps.baselines import train_prefix


def main(seed: Seed, params: Params = Path("params.yaml")) -> None:
    with stage(params, seed=seed) as cfg:
        train_prefix(cfg, seed)


if __name__ == "__main__":
    typer.run(main)
