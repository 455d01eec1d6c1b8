"""Stage pretrain: the starting weights (pre-trained on the source split, a local file, or none)."""

# isort: off
import _env  # noqa: F401  (first: without the venv, one line instead of a traceback)
# isort: on

from pathlib import Path

import typer

from freezecache.pipeline.guard import Params, stage
from freezecache.steps.pretrain import pretrain


def main(params: Params = Path("params.yaml")) -> None:
    with stage(params) as cfg:
        pretrain(cfg)


if __name__ == "__main__":
    typer.run(main)
