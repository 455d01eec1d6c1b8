"""Stage train_suffix: discard the frozen prefix, train the remaining blocks from the cache."""

# isort: off
import _env  # noqa: F401  (first: without the venv, one line instead of a traceback)
# isort: on

from pathlib import Path

import typer

from freezecache.guard import Block, Method, Params, Seed, stage
from freezecache.steps.suffix import train_suffix


def main(seed: Seed, method: Method, block: Block, params: Params = Path("params.yaml")) -> None:
    with stage(params, seed=seed, method=(method, "discard"), block=block) as cfg:
        train_suffix(cfg, seed, method, block)


if __name__ == "__main__":
    typer.run(main)
