"""Stage check: validate params.yaml, the model it names included, and scan the datasets before
any other stage deletes its outputs; write what each stage reads of the freeze schedule.

Every stage depends on this stage's output, so DVC runs it first; bad params, or an image folder
with bad files or too small a class, stop the run here, with one line per problem, while every
earlier result is still in place (its own outputs are ``persist``: DVC keeps them while it runs).
DVC runs it on every `dvc repro` to fingerprint the datasets' files
(freezecache.steps.sources). ``params.ok`` never changes; each view of the schedule
(``runs/schedule_views/``) changes only when what its reader reads does, and a dataset's record
only when its files do, so a passing check reruns nothing the edit did not touch.
"""

# isort: off
import _env  # noqa: F401  (first: without the venv, one line instead of a traceback)
# isort: on

from pathlib import Path

import typer

from freezecache.pipeline.guard import Params, stage
from freezecache.steps.check import check, write
from freezecache.steps.sources import write_sources


def main(params: Params = Path("params.yaml")) -> None:
    with stage(params) as cfg:
        check(cfg, str(params))
        write_sources(cfg)
        write(cfg)


if __name__ == "__main__":
    typer.run(main)
