"""Stage baseline_{normal,freezeout}: continue the shared prefix run without discarding."""

from pathlib import Path

import typer

from freezecache import steps
from freezecache.cli import Params, Seed, fail, stage


def main(
    seed: Seed,
    method: str = typer.Option(..., help="normal or freezeout"),
    params: Params = Path("params.yaml"),
) -> None:
    if method not in ("normal", "freezeout"):
        fail(f"--method {method!r}: choose normal or freezeout")
    with stage(params, seed=seed) as cfg:
        steps.baseline(cfg, seed, method)


if __name__ == "__main__":
    typer.run(main)
