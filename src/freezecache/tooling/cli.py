"""The `freezecache` command: what users run by hand (check, profile, readme, ...)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import typer

from freezecache.pipeline.guard import fail, setup_logging, stage, stage_free
from freezecache.tooling import render

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
PROFILES = Path("configs")


@app.command()
def check(params: Path = typer.Option(Path("params.yaml"), help="params file to validate")) -> None:
    """Validate a params file, the model it names included, and scan its datasets (an image
    folder's bad files, classes too small for the splits): every problem reported at once. Like
    the check stage it refreshes the datasets' fingerprints, so `dvc status` then shows whether
    `prepare` must rerun."""
    from freezecache.steps.model import check_model
    from freezecache.steps.sources import write_sources

    with stage(params) as cfg:
        model = check_model(cfg, str(params))
        records = write_sources(cfg)
        print(f"{params}: ok ({cfg.model.name}: {model.num_blocks} blocks, layout {model.layout})")
        for key, r in records.items():
            if r is not None:
                print(f"{key}: {r['name']} at {r['root'] or 'its default folder'}, "
                      f"fingerprint {str(r['fingerprint'])[:12]}")  # fmt: skip


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
        if params.resolve() == (render.ROOT / "params.yaml").resolve():  # its freeze points
            print("dvc.yaml: " + ("rendered" if render.write() else "up to date"))


@app.command(name="pipeline")
def render_pipeline(
    check_only: bool = typer.Option(False, "--check", help="fail if dvc.yaml is out of date"),
) -> None:
    """Render dvc.yaml from the stage declarations and params.yaml's number of freeze points:
    needed after changing that number (`freezecache profile` and `make repro` run it) or a
    stage's declaration; other params edits never need it."""
    setup_logging()
    if check_only:
        if render.render_text() != (render.ROOT / "dvc.yaml").read_text():
            fail(
                "dvc.yaml is older than src/freezecache/pipeline/__init__.py — run "
                "`freezecache pipeline`"
            )
        print("dvc.yaml: up to date")
    else:
        print("dvc.yaml: " + ("rendered" if render.write() else "up to date"))


@app.command()
def blocks(
    name: str = typer.Argument(..., help="a registered model or any timm model name"),
    img_size: int = typer.Option(32, help="input size"),
    in_chans: int = typer.Option(3, help="input channels"),
    num_classes: int = typer.Option(10, help="classes"),
    kwarg: list[str] = typer.Option(
        [], "--kwarg", "-k", help="a model option KEY=VALUE, as in model.kwargs (repeatable)"
    ),
) -> None:
    """List a model's freeze positions: block name, index and output shape."""
    from freezecache.models import create_model, describe_blocks

    with stage_free():
        options = _model_options(kwarg)
        model = create_model(
            name, num_classes=num_classes, in_chans=in_chans, img_size=img_size, **options
        )
        print(f"{name}: {model.num_blocks} blocks, layout {model.layout}")
        print(f"{'position':>8}  {'name':<28} {'type':<24} output shape")
        for r in describe_blocks(model):
            shape = "x".join(map(str, r["shape"]))
            print(f"{r['position']:>8}  {r['name']:<28} {r['type']:<24} {shape}")


def _model_options(pairs: list[str]) -> dict[str, object]:
    """``KEY=VALUE`` pairs as model.kwargs (values read as params.yaml's are)."""
    from freezecache.config import DERIVED_KWARGS
    from freezecache.core.errors import FreezecacheError
    from freezecache.core.yamlio import parse_value

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise FreezecacheError(f"--kwarg {pair!r}: write KEY=VALUE, e.g. -k patch_size=4")
        if key in DERIVED_KWARGS:
            raise FreezecacheError(f"--kwarg {key}: give it as --{key.replace('_', '-')}")
        options[key] = parse_value(value, f"--kwarg {key}")
    return options


@app.command()
def plan(params: Path = typer.Option(Path("params.yaml"), help="params file")) -> None:
    """Where to freeze: cache size and savings per block, for the configured schedule (printed
    only: `make plan` runs the plan stage, whose results/plan.* DVC tracks)."""
    from freezecache.steps.plan import plan as make

    with stage(params) as cfg:
        print(make(cfg, write=False))


@app.command()
def sweep(
    collect_only: bool = typer.Option(False, "--collect", help="only gather finished runs"),
    results: Path = typer.Option(Path("results"), help="where codec_sweep.* go"),
    only: list[str] = typer.Option(
        [], "--only", help="run (or gather) only this entry of the grid, e.g. rel-0.25; repeatable"
    ),
) -> None:
    """Run the current params over a grid of codecs and tolerances (queued DVC experiments)
    and write results/codec_sweep.{csv,json,md,svg}."""
    from freezecache.tooling import sweep as sw
    from freezecache.tooling.results import stamp

    with stage_free():
        grid = sw.entries(only)
        if not collect_only:
            print("queued: " + ", ".join(sw.queue(grid)))
            sw.run_queue()
        rows = sw.collect(grid)
        written = sw.write(rows, results)
        if collect_only:  # runs made earlier, by code this command cannot vouch for
            print("no provenance written (--collect): `make sweep` records it")
        else:
            stamp(sw.__file__, written, Path("params.yaml"))
        print(sw.render_markdown(rows))


@app.command(name="ensure-data")
def ensure_data(params: Path = typer.Option(Path("params.yaml"))) -> None:
    """Make sure the embedded dataset is present (installs Debian's package when root)."""
    from freezecache.tooling.debian import ensure_fashion_mnist

    with stage(params) as cfg:
        if cfg.data.name == "fashion_mnist" and cfg.data.root is None:
            print(ensure_fashion_mnist())


@app.command()
def plots(out: Path = typer.Option(Path("results/plots"), help="folder for index.html")) -> None:
    """Render `dvc plots show` to HTML that works offline (Vega bundled, no CDN)."""
    from freezecache.reporting.plots import render

    with stage_free():
        page, empty = render(out)
        for name in empty:
            print(f"warning: the lead chart {name} has no data (the page says what writes it)")
        print(f"{page}: open it in a browser (no network needed)")


@app.command()
def doctor(
    params: Path = typer.Option(Path("params.yaml"), help="the profile to check"),
    measure: bool = typer.Option(
        True, "--measure/--no-measure", help="the ~20 s epoch measurement on the profile"
    ),
    samples: int = typer.Option(512, min=64, help="training images of the measurement"),
    json_out: Path = typer.Option(None, "--json", help="also write the checks to this file"),
) -> None:
    """Check this environment for the profile: packages, device(s), CUDA/NCCL, the quant decode
    on the device, free disk, and one suffix epoch against one FreezeOut epoch. Exit status 1
    when the setup is broken."""
    from freezecache.core.errors import FreezecacheError
    from freezecache.core.io import atomic_write_json
    from freezecache.tooling import doctor as doc

    setup_logging()
    logging.getLogger().setLevel(logging.ERROR)  # one screen: the checks say what logs would
    try:
        cfg, source = doc.load_profile(params)
    except FreezecacheError as err:
        fail(str(err))
    checks = doc.run_checks(cfg, measure_epochs=measure, samples=samples)
    print(doc.render(checks, source, cfg))
    if json_out is not None:
        atomic_write_json(json_out, doc.to_json(checks, source))
    if any(c.status == "fail" for c in checks):
        raise typer.Exit(1)


@app.command()
def gc(
    params: Path = typer.Option(Path("params.yaml"), help="the params whose work to keep"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list what would go, remove nothing"),
) -> None:
    """Free what earlier params left under paths.checkpoints: epoch checkpoints and cache spools
    no current stage can resume, with their sizes (what params.yaml's stages resume is kept)."""
    from freezecache.tooling import gc as collect

    with stage(params) as cfg:
        entries = collect.scan(cfg)
        if not dry_run:
            collect.free(entries)
        print(collect.render(entries, dry_run))


# README section -> the generated file it shows (between `<!-- name:start -->` markers).
README_SECTIONS = {
    "search": "results/schedule_search.md",
    "recipe": "results/recipe_search.md",
    "adaptive": "results/adaptive.md",
    "flips": "results/flip_symmetry.md",
    "results": "results/report.md",
    "scratch": "results/scratch/report.md",
    "timm": "results/timm/report.md",
    "plan": "results/plan.md",
    "sweep": "results/codec_sweep.md",
    "bench": "results/bench.md",
    "scale": "results/bench_scale.md",
    "scaling": "results/bench_scaling.md",
    "gpu": "results/gpu/gpu_check.md",
}
# README sections whose file a profile's run writes, and that profile: a file another profile's
# run wrote there (the smoke profile writes where the default does) is refused, not shown.
SECTION_PROFILES = {"results": "default", "plan": "default", "scratch": "scratch",
                    "timm": "timm_regnet"}  # fmt: skip


@app.command()
def readme(target: Path = typer.Option(Path("README.md"))) -> None:
    """Regenerate the README's generated sections from the results/ files, each with one line of
    its provenance (and marked stale when `freezecache results status` says so; refused when a
    profile's section would show another profile's run), and its API reference from the public
    names' docstrings."""
    from freezecache.reporting.report import update_readme
    from freezecache.tooling.api_doc import reference
    from freezecache.tooling.results import readme_notes

    with stage_free():
        _refuse_foreign_results()
        sources = {k: Path(v) for k, v in README_SECTIONS.items()}
        update_readme({**sources, "api": reference()}, target, notes=readme_notes(sources))
        print(f"{target}: sections updated from " + ", ".join(README_SECTIONS.values())
              + " and the API reference from the docstrings")  # fmt: skip


def _refuse_foreign_results() -> None:
    """One line per section whose results were written by a run of other params than its
    profile's (e.g. after `freezecache profile smoke && dvc repro`)."""
    from freezecache.config import parse_config
    from freezecache.core.errors import FreezecacheError
    from freezecache.core.io import read_json
    from freezecache.core.yamlio import load_yaml
    from freezecache.reporting.report import foreign_run

    problems = []
    for section, name in SECTION_PROFILES.items():
        record = Path(README_SECTIONS[section]).with_suffix(".json")
        if not record.is_file():
            continue
        profile = PROFILES / f"{name}.yaml"
        differs = foreign_run(read_json(record), parse_config(load_yaml(profile), str(profile)))
        if differs:
            problems.append(
                f"{record} is not the {name} profile's run ({'; '.join(differs[:3])}) — restore "
                f"it (`git checkout {record.parent}`) or rerun that profile (`freezecache profile "
                f"{name} && dvc repro`), then `freezecache readme`"
            )
    if problems:
        raise FreezecacheError("\n".join(problems))


results_app = typer.Typer(no_args_is_help=True, help="Where each committed result came from.")
app.add_typer(results_app, name="results")


@results_app.command("status")
def results_status(
    name: list[str] = typer.Argument(None, help="results to check (default: every one)"),
) -> None:
    """Every committed result: current, or stale with what changed since it was made (params,
    code, the profile file), one line each. Exit status 1 when any is stale."""
    from freezecache.tooling import results as res

    with stage_free():
        states = res.status(names=_known(name))
        print("\n".join(res.status_lines(states)))
    if any(s.stale for s in states):
        raise typer.Exit(1)


@results_app.command("run")
def results_run(
    name: list[str] = typer.Argument(None, help="results to regenerate (default: every one)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="only say what would run, in order"),
) -> None:
    """Regenerate every stale result, in dependency order, a progress line per job with its
    expected duration (`make results`). Rerun after a kill: it continues where it stopped."""
    from freezecache.tooling.remake import run_stale

    with stage_free():
        ran = run_stale(names=_known(name), dry_run=dry_run)
        print(f"{ran} job(s) to run" if dry_run else f"{ran} job(s) ran; what they made is current")


def _known(names: list[str] | None) -> list[str] | None:
    from freezecache.core.errors import FreezecacheError
    from freezecache.tooling.results import RESULTS

    unknown = [n for n in names or [] if n not in RESULTS]
    if unknown:
        raise FreezecacheError(
            f"no result {', '.join(unknown)} — choose among: {', '.join(RESULTS)}"
        )
    return names or None


if __name__ == "__main__":
    app()
