"""Stage plan: cache sizes and savings per candidate block, measured on a real batch; refuses a
freeze schedule whose caches would not fit on the disk, before any training."""

# isort: off
import _env  # noqa: F401  (first: without the venv, one line instead of a traceback)
# isort: on

from pathlib import Path

import typer

from freezecache.pipeline.guard import Params, stage
from freezecache.reporting.provenance import record_stage
from freezecache.steps.plan import plan


def main(params: Params = Path("params.yaml")) -> None:
    with stage(params) as cfg:
        print(plan(cfg))
        record_stage("plan", cfg, params)


if __name__ == "__main__":
    typer.run(main)
