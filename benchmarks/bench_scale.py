"""The crossover as the training set grows (issue 27): where a discard method starts to pay.

Per epoch a discard method saves time in proportion to the training set (no frozen prefix to run
forward), while its one-off costs (a cache stage's process, setup, the prefix pass and the
encoding) grow more slowly. This runs FreezeOut and each discard method of the profile after
the shared run at several training-set sizes (``--sizes``; the validation split stays apart),
one seed, through the real stages in a project folder of its own per size (as `dvc repro` runs
them: benchmarks/_stages.py), and records each method's wall time after the shared run (every
stage process, start-up included: ``accounting.wall.method_time``) next to what the plan stage,
run on the same project before any training, predicted for it.

    python benchmarks/bench_scale.py [--sizes 2000,4000,10000,25000] [--params params.yaml]

Writes bench_scale.json, bench_scale.md (the README section), bench_scale.csv (the lead chart
of `make plots`: wall time against training-set size, the prediction as a line) and
bench_scale.svg in the results folder. A size above the training pool of the profile's classes
(less the validation split) or below one batch is refused before anything runs or is written.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import tempfile
import time
from pathlib import Path

import typer

import _stages
import benchlib as bench
from freezecache.accounting.wall import break_even, method_time
from freezecache.config import Config
from freezecache.core.errors import FreezecacheError
from freezecache.core.io import atomic_write_json, atomic_write_text, read_json
from freezecache.data.classes import select_classes
from freezecache.data.sources import open_source
from freezecache.pipeline import STAGES
from freezecache.pipeline.guard import stage
from freezecache.reporting.labels import label
from freezecache.reporting.plots import BENCH_SCALE

log = logging.getLogger("bench")

SIZES = (2000, 4000, 10000, 25000)
GOAL = 0.90  # Discard & Aug. / FreezeOut at the largest size (issue 27)


def training_pool(cfg: Config) -> int:
    """Training images of the profile's classes that a training set can take: the dataset's
    training split (its labels only are read) less the validation split."""
    d = cfg.data
    source = open_source(d.name, d.root, d.download)
    try:
        pool = source.train if d.classes is None else select_classes(source.train, d.classes)
        return len(pool.labels) - (d.val_size or 0)
    finally:
        source.close()


def parse_sizes(text: str) -> list[int]:
    """``"2000,4000"`` -> [2000, 4000] (sorted, each once); one line for anything else."""
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise FreezecacheError(
            f"--sizes {text!r}: give training-set sizes as integers separated by commas, "
            "e.g. --sizes 2000,4000,10000,25000"
        ) from None
    if not sizes:
        raise FreezecacheError("--sizes is empty — give at least one training-set size")
    return sizes


def check_sizes(cfg: Config, sizes: list[int], pool: int) -> None:
    """Every size fits the pool and holds at least one batch, or one line naming the limit."""
    batch = cfg.train.batch_size
    small = [n for n in sizes if n < batch]
    if small:
        raise FreezecacheError(
            f"--sizes {small[0]} is smaller than one batch (train.batch_size {batch}) — "
            f"give sizes of at least {batch}"
        )
    big = [n for n in sizes if n > pool]
    if big:
        classes = cfg.data.classes if cfg.data.classes is not None else "all"
        raise FreezecacheError(
            f"--sizes {big[-1]} is more than the {pool} training images of {cfg.data.name} "
            f"classes {classes} (its training split less the {cfg.data.val_size or 0} of the "
            f"validation split) — give sizes of at most {pool}"
        )


def methods(cfg: Config) -> list[str]:
    """FreezeOut and the profile's discard methods: the ones a break-even compares."""
    return ["freezeout", *cfg.methods.discard]


def starting_weights(cfg: Config, folder: Path) -> tuple[Path, str]:
    """The profile's starting weights: the pipeline's pretrain output when it exists, else the
    pretrain stage run once here (on the profile's own pretrain settings)."""
    made = STAGES["pretrain"].path("state", cfg)
    if made.is_file():
        return made, f"the pipeline's {made}"
    project = _stages.write_project(folder, cfg)
    _stages.run_stage(folder, "check")
    _stages.run_stage(folder, "pretrain")
    return STAGES["pretrain"].path("state", project), "the pretrain stage, run here"


def one_size(cfg: Config, folder: Path, n: int, seed: int, weights: Path) -> dict:
    """Every method after the shared run at ``n`` training images, and the plan's prediction."""
    changes = {"data": {"train_size": n}, "seeds": [seed]}
    changes["methods"] = {"baselines": ["freezeout"], "discard": cfg.methods.discard}
    project = _stages.write_project(folder, cfg, **changes)
    _stages.copy_weights(weights, project)
    for name in ("check", "prepare", "plan"):
        _stages.run_stage(folder, name)
    _stages.run_stage(folder, "train_prefix", "--seed", str(seed))
    measured, loads = {}, {}
    for name in methods(project):
        _stages.run_method(folder, project, seed, name)
        measured[name] = method_time(project, seed, name)
        loads[name] = os.getloadavg()[0]
        log.info("%d images, %s: %.1f s after the shared run", n, name, measured[name]["wall_s"])
    plan = read_json(STAGES["plan"].path("json", project))
    block = project.points[0].block
    predicted = plan["schedule_time"]  # the configured schedule, every point
    fo = measured["freezeout"]
    return {
        "train_size": n,
        "block": block,
        "epochs_after": project.train.epochs - project.points[0].epoch,
        "measured": measured,
        "predicted_s": predicted["method_s"],
        "break_even": {
            m: {
                "measured": break_even(measured[m], fo),
                "predicted": predicted["break_even_epochs"][m],
            }
            for m in project.methods.discard
        },
        "load_avg_1m": loads,
    }


def run(cfg: Config, sizes: list[int], seed: int, workdir: Path | None) -> dict:
    """Every size in turn, smallest first, in ``workdir`` (kept) or a temporary folder."""
    started = time.perf_counter()
    machine = bench.machine_info(_device(cfg))
    with tempfile.TemporaryDirectory(prefix="freezecache-scale-") as tmp:
        root = workdir or Path(tmp)
        weights, source = starting_weights(cfg, root / "pretrain")
        rows = [one_size(cfg, root / f"n{n}", n, seed, weights) for n in sizes]
    machine["load_avg_1m_end"] = os.getloadavg()[0]
    return {
        "machine": machine,
        "setup": {
            "model": cfg.model.name,
            "dataset": cfg.data.name,
            "classes": cfg.data.classes,
            "val_size": cfg.data.val_size,
            "epochs": cfg.train.epochs,
            "points": [{"block": p.block, "epoch": p.epoch} for p in cfg.points],
            "seed": seed,
            "methods": methods(cfg),
            "weights": source,
        },
        "sizes": rows,
        "goal": {"method": "discard_aug", "vs": "freezeout", "at_most": GOAL},
        "minutes": (time.perf_counter() - started) / 60,
    }


def _device(cfg: Config):
    from freezecache.core import runtime

    return runtime.pick_device(cfg.runtime.device)


def ratio(row: dict, name: str, base: str = "freezeout") -> float:
    """``name``'s wall time after the shared run over ``base``'s at one size."""
    m = row["measured"]
    return m[name]["wall_s"] / m[base]["wall_s"]


def csv_rows(result: dict) -> list[dict]:
    """The lead chart's table: per size and method the measured wall time and the predicted."""
    rows = []
    for r in result["sizes"]:
        for name, t in r["measured"].items():
            rows.append(
                {
                    "train_size": r["train_size"],
                    "method": label(name),
                    "kind": "measured",
                    "wall_s": round(t["wall_s"], 3),
                }
            )
            predicted = r["predicted_s"].get(name)
            if predicted is not None:
                rows.append(
                    {
                        "train_size": r["train_size"],
                        "method": label(name),
                        "kind": "predicted (plan)",
                        "wall_s": round(predicted, 3),
                    }
                )
    return rows


def to_csv(result: dict) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, ["train_size", "method", "kind", "wall_s"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_rows(result))
    return buf.getvalue()


def chart_spec(result: dict) -> dict:
    """Vega-Lite: wall time after the shared run against the training-set size per method,
    measured as points, the plan's prediction as a dashed line."""
    return {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
        "title": "Wall time after the shared run (points; dashed: the plan's prediction)",
        "data": {"values": csv_rows(result)},
        "width": 420,
        "height": 300,
        "encoding": {
            "x": {"field": "train_size", "type": "quantitative", "title": "training images"},
            "y": {
                "field": "wall_s",
                "type": "quantitative",
                "title": "wall time after the shared run (s)",
            },
            "color": {"field": "method", "type": "nominal"},
        },
        "layer": [
            {
                "transform": [{"filter": "datum.kind != 'measured'"}],
                "mark": {"type": "line", "strokeDash": [5, 4], "point": {"filled": False}},
            },
            {
                "transform": [{"filter": "datum.kind == 'measured'"}],
                "mark": {"type": "point", "filled": True, "size": 70},
            },
        ],
    }


def markdown(result: dict) -> str:
    """bench_scale.md: the table per size, the ratio at the largest against the goal."""
    s, m = result["setup"], result["machine"]
    names = s["methods"]
    discard = [n for n in names if n != "freezeout"]
    points = ", ".join(f"block {p['block']} at epoch {p['epoch']}" for p in s["points"])
    head = ["Training images"]
    for n in names:
        head += [f"{label(n)} (s)", "predicted"]
    head += [f"{label(n)} / {label('freezeout')}" for n in discard]
    head += [f"{label(n)} break-even (epochs): measured, predicted" for n in discard]
    lines = [
        "### The crossover as the training set grows (`make bench-scale`)",
        "",
        f"Measured on {m['cpu']} ({m['cpu_count']} cores, training device `{m['device']}`, "
        f"torch {m['torch']}; load average {m['load_avg_1m']:.2f} at the start, "
        f"{m['load_avg_1m_end']:.2f} at the end; {result['minutes']:.0f} min). {s['model']} on "
        f"{s['dataset']} classes {s['classes']}, the profile's recipe ({s['epochs']} epochs, "
        f"{points}), seed {s['seed']}; the validation split ({s['val_size']} images) apart. "
        f"Starting weights: {s['weights']}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in result["sizes"]:
        cells = [str(r["train_size"])]
        for n in names:
            predicted = r["predicted_s"].get(n)
            cells += [
                f"{r['measured'][n]['wall_s']:.1f}",
                "–" if predicted is None else f"{predicted:.1f}",
            ]
        cells += [f"{ratio(r, n):.3f}" for n in discard]
        for n in discard:
            be = r["break_even"][n]
            cells.append(
                " / ".join(
                    "never" if v is None else f"{v:.1f}" for v in (be["measured"], be["predicted"])
                )
            )
        lines.append("| " + " | ".join(cells) + " |")
    last = result["sizes"][-1]
    goal = result["goal"]
    got = ratio(last, goal["method"], goal["vs"])
    verdict = "met" if got <= goal["at_most"] else "NOT met"
    lines += [
        "",
        "Wall time: every stage process of the method after the shared run up to the freeze "
        "point (start-up, setup, the cache stage, every epoch with its validation, accounting "
        "and the test), as each stage records it (`accounting.wall.method_time`, the report's "
        "figures); predicted: the plan stage on the same project before any training. "
        "Break-even: epochs after the freeze point from which the discard method's run is "
        "shorter than FreezeOut's.",
        "",
        f"At {last['train_size']} training images {label(goal['method'])} takes {got:.3f} of "
        f"{label(goal['vs'])}'s wall time after the shared run (goal <= {goal['at_most']:.2f}: "
        f"{verdict}).",
        "",
        f"![Wall time after the shared run against the training-set size]"
        f"(results/{BENCH_SCALE.replace('.csv', '.svg')})",
        "",
    ]
    return "\n".join(lines)


def write(result: dict, out: Path) -> list[Path]:
    """bench_scale.json, .md, .csv and (with vl-convert) .svg in ``out``."""
    stem = out / BENCH_SCALE
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md"), stem]
    atomic_write_json(paths[0], result)
    atomic_write_text(paths[1], markdown(result))
    atomic_write_text(paths[2], to_csv(result))
    svg = bench.svg(chart_spec(result))
    if svg is not None:
        paths.append(stem.with_suffix(".svg"))
        atomic_write_text(paths[-1], svg)
    return paths


def main(
    sizes: str = typer.Option(",".join(map(str, SIZES)), help="training-set sizes, e.g. 2000,4000"),
    params: Path = typer.Option(Path("params.yaml"), help="params file (the default profile)"),
    seed: int = typer.Option(None, help="the seed (default: the profile's first)"),
    out: Path = typer.Option(None, help="folder for the files (default: paths.results)"),
    workdir: Path = typer.Option(None, help="keep the projects here (default: a temp folder)"),
) -> None:
    with stage(params) as cfg:
        wanted = parse_sizes(sizes)
        check_sizes(cfg, wanted, training_pool(cfg))  # before anything runs or is written
        seed = cfg.seeds[0] if seed is None else seed
        result = run(cfg, wanted, seed, workdir)
        written = write(result, out or Path(cfg.paths.results))
        from freezecache.tooling.results import stamp

        stamp(__file__, [written[1], written[0], *written[2:]], params)  # .md names the record
        print(markdown(result))
        print("wrote " + ", ".join(map(str, written)))


if __name__ == "__main__":
    typer.run(main)
