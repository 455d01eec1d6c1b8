"""Stage train_suffix: discard the prefix, train the remaining blocks from the cache."""

from pathlib import Path

import typer

from freezecache import steps
from freezecache.cli import stage


def main(
    seed: int = typer.Option(...),
    variant: str = typer.Option(..., help="discard, discard_aug or discard_noaug"),
    point: int = typer.Option(..., help="freeze point, 1-based"),
    params: Path = Path("params.yaml"),
) -> None:
    with stage(params) as cfg:
        steps.check_point(cfg, variant, point)
        steps.train_suffix(cfg, seed, variant, point)


if __name__ == "__main__":
    typer.run(main)
