"""Real stage processes in a project folder of their own, run as `dvc repro` runs them (``python
-m freezecache.pipeline.launch stages/<stage>.py ...``), for the benchmarks that time what a user's
run pays: every process's start-up, setup and one-off costs included, read back from what each
stage records of itself (``accounting.wall.method_time``, DVCLive's epoch times).

A project is a folder with a params.yaml (the profile with a few sections changed, its paths
inside the folder) and the profile's starting weights copied in; the prepared data set is the
project's own (the prepare stage) or a link to the profile's.
"""

from __future__ import annotations

import csv
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

from freezecache.accounting.wall import method_time
from freezecache.config import Config, parse_config
from freezecache.core.errors import FreezecacheError
from freezecache.core.io import read_json
from freezecache.core.methods import method
from freezecache.pipeline import STAGES, method_runs
from freezecache.steps.run import published

ROOT = Path(__file__).resolve().parents[1]
# The paths of a project, relative to its folder (as the default profile spells them).
PATHS = ("data", "weights", "cache", "runs", "results", "checkpoints")


def write_project(folder: Path, cfg: Config, **sections: object) -> Config:
    """Writes ``folder``/params.yaml: ``cfg`` with ``sections`` updated (a mapping updates the
    section's keys, anything else replaces it) and every path inside ``folder``; returns the
    config with those paths absolute (for reading the project's outputs from here)."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = cfg.model_dump(mode="json")
    raw["paths"] = {k: getattr(Config().paths, k) for k in PATHS}
    for name, values in sections.items():
        raw[name] = {**(raw[name] or {}), **values} if isinstance(values, dict) else values
    (folder / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    raw["paths"] = {k: str(folder / v) for k, v in raw["paths"].items()}
    return parse_config(raw, str(folder / "params.yaml"))


def link_data(src: Config, project: Config) -> None:
    """The project reads ``src``'s prepared data set (a link: nothing is copied)."""
    target = Path(project.paths.data)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(Path(src.paths.data).resolve(), target)


def copy_weights(src: Path, project: Config) -> None:
    """The starting weights (a pretrain stage's state.pt) where the project's stages read them."""
    target = STAGES["pretrain"].path("state", project)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, target)


def run_stage(folder: Path, name: str, *args: str) -> None:
    """Runs stage ``name`` in ``folder`` through the launcher, as dvc.yaml's command does;
    FreezecacheError with the stage's last lines when it fails."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    script = str(ROOT / "stages" / f"{name}.py")
    cmd = [sys.executable, "-m", "freezecache.pipeline.launch", script, *args]
    done = subprocess.run(
        [*cmd, "--params", "params.yaml"], cwd=folder, env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-12:])
        raise FreezecacheError(f"stage {name} {' '.join(args)} failed in {folder}:\n{tail}")


def stage_args(stage: str, item: dict) -> list[str]:
    """The arguments dvc.yaml gives ``stage`` for one matrix item."""
    args = ["--seed", str(item["seed"])]
    if "method" in item:
        args += ["--method", item["method"]]
    if "p" in item:
        args += ["--point", str(item["p"].i)]
    return args


def run_method(folder: Path, project: Config, seed: int, name: str) -> None:
    """Method ``name``'s stages after the shared run (train_prefix has run), in order."""
    for stage, item in method_runs(project, seed, name):
        if stage.name != "train_prefix":
            run_stage(folder, stage.name, *stage_args(stage.name, item))


def epoch_times(project: Config, seed: int, name: str) -> list[float]:
    """The training seconds of each epoch method ``name``'s stages after the shared run logged
    to DVCLive (``epoch_time_s``: the training loop, validation apart), in order."""
    out = []
    shared = project.prefix_epochs if method(name).shared_prefix else 0
    for stage, item in method_runs(project, seed, name):
        if stage.name == "train_prefix" or "plots" not in stage.outs:
            continue
        tsv = STAGES[stage.name].path("plots", project, **item) / "epoch_time_s.tsv"
        with tsv.open(newline="") as f:
            rows = csv.DictReader(f, delimiter="\t")
            out += [float(r["epoch_time_s"]) for r in rows if int(r["step"]) > shared]
    return out


def median_epoch(project: Config, seed: int, name: str) -> float:
    """The median of :func:`epoch_times`: the first epoch's warm-up and other load aside."""
    return statistics.median(epoch_times(project, seed, name))


# What a stage records of its time (``timings`` in costs.json and cache.json) -> the one-off part
# it is shown as; the rest of the one-off (building the context, the model, the cache's loader,
# the validation features, saving the outputs) is "setup and the rest".
ONE_OFF_PARTS = {
    "startup_s": "start-up",
    "ranking_s": "ranking",
    "prefix_forward_s": "cache build: prefix forward",
    "flipped_forward_s": "cache build: flipped pass",
    "encode_write_s": "cache build: encode + write",
    "accounting_s": "accounting",
    "test_s": "test",
    "bn_recalibration_s": "bn recalibration",
}
REST = "setup and the rest"


def one_off_parts(project: Config, seed: int, name: str) -> dict[str, float]:
    """Method ``name``'s one-off seconds after the shared run (``method_time``'s ``one_off_s``:
    its stages' wall time less their epochs) split into what its stages recorded, summed over
    them; :data:`REST` is what no section covers."""
    parts = dict.fromkeys(ONE_OFF_PARTS.values(), 0.0)
    for stage, item in method_runs(project, seed, name):
        if stage.name == "train_prefix":
            continue
        record = read_json(
            stage.path("stats" if stage.name == "cache" else "costs", project, **item)
        )
        for key, part in ONE_OFF_PARTS.items():
            parts[part] += record.get("timings", {}).get(key, 0.0)
    parts = {k: v for k, v in parts.items() if v > 0}
    parts[REST] = method_time(project, seed, name)["one_off_s"] - sum(parts.values())
    return parts


def side_by_side(cfg: Config, folder: Path, seed: int, weights: Path, prefix, names) -> dict:
    """Methods ``names`` after the shared run as the pipeline runs them, one after another in a
    project at ``folder`` on ``cfg``'s prepared data, from the starting ``weights`` (a state
    file) and the shared run's state ``prefix`` (a RunState): per method its wall time,
    epochs, one-off (``method_time``), its one-off's parts and its epochs' training times."""
    project = write_project(
        folder,
        cfg,
        seeds=[seed],
        methods={
            "baselines": [n for n in names if method(n).kind == "baseline"],
            "discard": [n for n in names if method(n).kind == "discard"],
        },
    )
    link_data(cfg, project)
    copy_weights(weights, project)
    published(prefix).save(STAGES["train_prefix"].path("state", project, seed=seed))
    out = {}
    for name in names:
        run_method(folder, project, seed, name)
        epochs = epoch_times(project, seed, name)
        out[name] = {
            **method_time(project, seed, name),
            "epochs_s": epochs,
            "median_epoch_s": statistics.median(epochs),
            "fastest_epoch_s": min(epochs),
            "one_off_parts_s": one_off_parts(project, seed, name),
        }
    return out
