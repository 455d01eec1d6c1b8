"""Stage train_prefix: train the full model up to the first freeze point (shared by all methods)."""

from pathlib import Path

import typer

from freezecache import steps
from freezecache.cli import Params, Seed, stage


def main(seed: Seed, params: Params = Path("params.yaml")) -> None:
    with stage(params, seed=seed) as cfg:
        steps.train_prefix(cfg, seed)


if __name__ == "__main__":
    typer.run(main)
