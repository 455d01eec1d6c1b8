"""Stage train_suffix: discard the frozen prefix, train the remaining blocks from the cache."""

# isort: off
import _env  # noqa: F401  (first: without the venv, one line instead of a traceback)
# isort: on

from pathlib import Path

import typer

from freezecache.pipeline.guard import Method, Params, Point, Seed, stage
from freezecache.steps.suffix import train_suffix


def main(seed: Seed, method: Method, point: Point, params: Params = Path("params.yaml")) -> None:
    with stage(params, seed=seed, method=(method, "discard"), point=point) as cfg:
        train_suffix(cfg, seed, method, point)


if __name__ == "__main__":
    typer.run(main)
