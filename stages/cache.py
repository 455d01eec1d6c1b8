"""Stage cache: push the training set through the frozen prefix once, compress into HDF5."""

from pathlib import Path

import typer

from freezecache import steps
from freezecache.cli import Params, Point, Seed, Variant, stage


def main(seed: Seed, variant: Variant, point: Point, params: Params = Path("params.yaml")) -> None:
    with stage(params, seed=seed, variant=variant, point=point) as cfg:
        steps.cache_point(cfg, seed, variant, point)


if __name__ == "__main__":
    typer.run(main)
