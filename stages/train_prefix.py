"""Stage train_prefix: train the full model up to the first freeze point (shared by all methods)."""

from pathlib import Path

import typer

from freezecache import steps
from freezecache.cli import stage


def main(seed: int = typer.Option(...), params: Path = Path("params.yaml")) -> None:
    with stage(params) as cfg:
        steps.train_prefix(cfg, seed)


if __name__ == "__main__":
    typer.run(main)
