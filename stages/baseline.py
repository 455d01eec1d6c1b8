"""Stage baseline: Normal, FreezeOut or a control, trained on raw images to the last epoch."""

# isort: off
import _env  # noqa: F401  (first: without the venv, one line instead of a traceback)
# isort: on

from pathlib import Path

import typer

from freezecache.pipeline.guard import Method, Params, Seed, stage
from freezecache.steps.baselines import baseline


def main(seed: Seed, method: Method, params: Params = Path("params.yaml")) -> None:
    with stage(params, seed=seed, method=(method, "baselines")) as cfg:
        baseline(cfg, seed, method)


if __name__ == "__main__":
    typer.run(main)
