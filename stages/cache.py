"""Stage cache: rank flip-sensitive channels/tokens if the method stores them, then push the
training set once through the frozen prefix into a compressed HDF5 cache."""

# isort: off
import _env  # noqa: F401  (first: without the venv, one line instead of a traceback)
# isort: on

from pathlib import Path

import typer

from freezecache.pipeline.guard import Method, Params, Point, Seed, stage
from freezecache.steps.cache import cache_point


def main(seed: Seed, method: Method, point: Point, params: Params = Path("params.yaml")) -> None:
    with stage(params, seed=seed, method=(method, "discard"), point=point) as cfg:
        cache_point(cfg, seed, method, point)


if __name__ == "__main__":
    typer.run(main)
