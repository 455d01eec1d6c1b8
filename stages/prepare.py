"""Stage prepare: read the dataset, take seeded stratified subsets, store uint8 under data/."""

from pathlib import Path

import typer

from freezecache import steps
from freezecache.cli import stage


def main(params: Path = Path("params.yaml")) -> None:
    with stage(params) as cfg:
        meta = steps.prepare(cfg)
        print(f"prepared {meta['name']}: {meta['train_size']} train, {meta['test_size']} test")


if __name__ == "__main__":
    typer.run(main)
