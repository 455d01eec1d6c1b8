"""The `freezecache` command: what users run by hand, and the guard every stage runs under."""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from freezecache.config import Config, load_config
from freezecache.errors import FreezecacheError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
PROFILES = Path("configs")

# Options shared by the stage commands in stages/.
Seed = Annotated[int, typer.Option(help="one of params.yaml's seeds")]
Method = Annotated[str, typer.Option(help="a method of params.yaml's methods lists")]
Block = Annotated[int, typer.Option(help="the block of one of params.yaml's freeze points")]
Params = Annotated[Path, typer.Option(help="params file")]


def _setup_logging(verbose: bool = False) -> None:
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
    block: int | None = None,
) -> Iterator[Config]:
    """Loads and validates params, checks the stage's arguments against them, and turns user
    errors into one line and exit status 2. ``method`` is (name, list it must be in)."""
    _setup_logging()
    try:
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
        if block is not None:
            cfg.point(block)
        yield cfg
    except FreezecacheError as err:
        fail(str(err))
    except OSError as err:  # a full disk, a read-only folder: say which file, no traceback
        fail(f"{err.filename or ''}: {err.strerror} — free space or fix permissions, then rerun")


@app.command()
def check(params: Path = typer.Option(Path("params.yaml"), help="params file to validate")) -> None:
    """Validate a params file: every problem reported at once."""
    with stage(params):
        print(f"{params}: ok")


@app.command()
def profile(
    name: str = typer.Argument(..., help="profile in configs/ (default, scratch, smoke, paper_*)"),
    params: Path = typer.Option(Path("params.yaml"), help="where to write it"),
) -> None:
    """Copy a named profile to params.yaml (validated first)."""
    src = PROFILES / f"{name}.yaml"
    if not src.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILES.glob("*.yaml")))
        fail(f"no profile '{name}' in {PROFILES}/ — choose one of: {known}")
    with stage(src):
        shutil.copyfile(src, params)
        print(f"{src} -> {params}")


@app.command(name="pipeline")
def render_pipeline(
    check_only: bool = typer.Option(False, "--check", help="fail if dvc.yaml is out of date"),
) -> None:
    """Render dvc.yaml from the stage declarations (for developers; params never need it)."""
    from freezecache import pipeline

    _setup_logging()
    if check_only:
        if pipeline.render_text() != (pipeline.ROOT / "dvc.yaml").read_text():
            fail("dvc.yaml is out of date with src/freezecache/pipeline.py — run `freezecache pipeline`")
        print("dvc.yaml: up to date")
    else:
        print("dvc.yaml: " + ("rendered" if pipeline.write() else "up to date"))


@app.command(name="ensure-data")
def ensure_data(params: Path = typer.Option(Path("params.yaml"))) -> None:
    """Make sure the embedded dataset is present (installs Debian's package when root)."""
    from freezecache.debian import ensure_fashion_mnist

    with stage(params) as cfg:
        if cfg.data.name == "fashion_mnist" and cfg.data.root is None:
            print(ensure_fashion_mnist())


@app.command()
def readme(
    report: Path = typer.Option(Path("results/report.md")),
    bench: Path = typer.Option(Path("results/bench.md")),
    target: Path = typer.Option(Path("README.md")),
) -> None:
    """Regenerate the README's results and benchmark sections from results/*.md."""
    from freezecache.report import update_readme

    with stage():
        update_readme({"results": report, "bench": bench}, target)
        print(f"{target}: sections updated from {report} and {bench}")


if __name__ == "__main__":
    app()
