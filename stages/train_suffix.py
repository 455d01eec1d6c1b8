"""Stage train_suffix: discard the prefix, train the remaining blocks from the cache."""

from pathlib import Path

import typer

from freezecache import steps
from freezecache.cli import Params, Point, Seed, Variant, stage


def main(seed: Seed, variant: Variant, point: Point, params: Params = Path("params.yaml")) -> None:
    with stage(params, seed=seed, variant=variant, point=point) as cfg:
        steps.train_suffix(cfg, seed, variant, point)


if __name__ == "__main__":
    typer.run(main)
