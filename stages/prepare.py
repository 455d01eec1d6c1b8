"""Stage prepare: read the dataset, take seeded stratified subsets, store uint8 under data/."""

# isort: off
import _env  # noqa: F401  (first: without the venv, one line instead of a traceback)
# isort: on

from pathlib import Path

import typer

from freezecache.pipeline.guard import Params, stage
from freezecache.steps.prepare import prepare


def main(params: Params = Path("params.yaml")) -> None:
    with stage(params) as cfg:
        meta = prepare(cfg)
        print(f"prepared {meta['name']}: {meta['train_size']} train, {meta['test_size']} test")


if __name__ == "__main__":
    typer.run(main)
