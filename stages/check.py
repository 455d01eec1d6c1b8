"""Stage check: validate params.yaml and scan the datasets before any other stage deletes its
outputs.

Every stage depends on this stage's output, so DVC runs it first; bad params, or an image
folder with bad files or too small a class, stop the run here, with one line per problem, while
every earlier result is still in place. DVC runs it on every `dvc repro` to fingerprint the
datasets' files (freezecache.steps.sources): params.ok never changes, and a dataset's record
only when its files do, so a passing check reruns nothing else.
"""

# isort: off
import _env  # noqa: F401  (first: without the venv, one line instead of a traceback)
# isort: on

from pathlib import Path

import typer

from freezecache.core.io import atomic_write_text
from freezecache.pipeline import STAGES, check_rendered
from freezecache.pipeline.guard import Params, stage
from freezecache.steps.sources import write_sources


def main(params: Params = Path("params.yaml")) -> None:
    with stage(params) as cfg:
        check_rendered(cfg)
        write_sources(cfg)
        atomic_write_text(STAGES["check"].path("ok", cfg), "params.yaml is valid\n")


if __name__ == "__main__":
    typer.run(main)
