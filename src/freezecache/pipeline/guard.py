"""The guard every stage command runs under: params validated, arguments checked, user errors
as one line and exit status 2 (no traceback). Kept apart from the `freezecache` command so a
stage's code deps stay its own."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from freezecache.config import Config, load_config
from freezecache.core import interrupts
from freezecache.core.errors import FreezecacheError
from freezecache.core.timing import STAGE_SECTIONS, Sections

# Options shared by the stage commands in stages/.
Seed = Annotated[int, typer.Option(help="one of params.yaml's seeds")]
Method = Annotated[str, typer.Option(help="a method of params.yaml's methods lists")]
Point = Annotated[int, typer.Option(help="a freeze point of params.yaml: 0 for its first")]
Params = Annotated[Path, typer.Option(help="params file")]


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )


def fail(message: str) -> None:
    """One clear error line per problem on stderr, exit status 2, no traceback."""
    for line in message.splitlines():
        print(f"error: {line}", file=sys.stderr)
    raise SystemExit(2)


@contextlib.contextmanager
def stage(
    params: Path = Path("params.yaml"),
    *,
    seed: int | None = None,
    method: tuple[str, str] | None = None,
    point: int | None = None,
) -> Iterator[Config]:
    """Loads and validates params, checks the stage's arguments against them, and turns user
    errors into one line and exit status 2. ``method`` is (name, list it must be in)."""
    setup_logging()
    try:
        # SIGINT/SIGTERM: one clean stop (core.interrupts); what the stage records of its time
        with interrupts.stopping(), Sections(STAGE_SECTIONS):
            yield _load(params, seed, method, point)
    except BaseException as err:
        if isinstance(err, interrupts.Interrupted) or (
            interrupts.pending() and not isinstance(err, SystemExit)
        ):  # what a signal caused, whatever it raised on its way (e.g. a DataLoader worker's)
            stopped(interrupts.raised_or(err))
        if isinstance(err, FreezecacheError):
            fail(str(err))
        if isinstance(err, OSError):  # a full disk, a read-only folder: which file, no traceback
            fail(
                f"{err.filename or ''}: {err.strerror} — free space or fix permissions, then rerun"
            )
        raise


def stopped(err: interrupts.Interrupted) -> None:
    """One line for a stage stopped by a signal, exit status 128 + its number."""
    print(
        f"error: interrupted by {err.name}: the stage did not finish (DVC records nothing) — "
        "rerun `dvc repro` to resume from its checkpoints",
        file=sys.stderr,
    )
    raise SystemExit(err.status)


def _load(params: Path, seed, method, point) -> Config:
    """Loads params and checks the stage's arguments against them."""
    cfg = load_config(params)
    if seed is not None and seed not in cfg.seeds:
        raise FreezecacheError(f"--seed {seed} is not among params.yaml's seeds {cfg.seeds}")
    if method is not None:
        name, kind = method
        names = getattr(cfg.methods, kind)
        if name not in names:
            raise FreezecacheError(
                f"--method {name!r} is not in params.yaml's methods.{kind} ({names})"
            )
    if point is not None:
        cfg.point(point)
    return cfg


@contextlib.contextmanager
def stage_free() -> Iterator[None]:
    """The same error handling for commands that read no params."""
    setup_logging()
    try:
        yield
    except FreezecacheError as err:
        fail(str(err))
