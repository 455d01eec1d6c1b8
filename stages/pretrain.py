"""Stage pretrain: train the model on another dataset first (e.g. CIFAR-100 before CIFAR-10)."""

from pathlib import Path

import typer

from freezecache import steps
from freezecache.cli import stage


def main(params: Path = Path("params.yaml")) -> None:
    with stage(params) as cfg:
        steps.pretrain(cfg)


if __name__ == "__main__":
    typer.run(main)
