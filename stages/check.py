"""Stage check: validate params.yaml before any other stage deletes its outputs.

Every stage depends on this stage's output, so DVC runs it first; bad params stop the run here,
with one line per problem, while every earlier result is still in place. The output's content
never changes, so a passing check reruns nothing downstream.
"""

# isort: off
import _env  # noqa: F401  (first: without the venv, one line instead of a traceback)
# isort: on

from pathlib import Path

import typer

from freezecache.core.io import atomic_write_text
from freezecache.pipeline import STAGES, check_rendered
from freezecache.pipeline.guard import Params, stage


def main(params: Params = Path("params.yaml")) -> None:
    with stage(params) as cfg:
        check_rendered(cfg)
        atomic_write_text(STAGES["check"].path("ok", cfg), "params.yaml is valid\n")


if __name__ == "__main__":
    typer.run(main)
