"""The `freezecache` command: what users run by hand (check, profile, readme, ...)."""

from __future__ import annotations

import shutil
from pathlib import Path

import typer

from freezecache.guard import setup_logging, fail, stage

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
PROFILES = Path("configs")


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

    setup_logging()
    if check_only:
        if pipeline.render_text() != (pipeline.ROOT / "dvc.yaml").read_text():
            fail(
                "dvc.yaml is out of date with src/freezecache/pipeline.py — run `freezecache pipeline`"
            )
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
