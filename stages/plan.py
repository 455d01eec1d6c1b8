"""Stage plan: cache sizes and savings per candidate block, measured on a real batch; refuses a
freeze schedule whose caches would not fit on the disk, before any training."""

from pathlib import Path

import typer

import _env  # noqa: F401
from freezecache.guard import Params, stage
from freezecache.steps.plan import plan


def main(params: Params = Path("params.yaml")) -> None:
    with stage(params) as cfg:
        print(plan(cfg))


if __name__ == "__main__":
    typer.run(main)
