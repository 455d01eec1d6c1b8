"""Where a method's run spends its time after the shared prefix run, and from when a discard
run overtakes FreezeOut: read from what each stage recorded of itself (``timings`` in costs.json
and cache.json: start-up, epochs trained with their seconds, validation, accounting, ranking,
the cache build)."""

from __future__ import annotations

from freezecache.config import Config
from freezecache.core.io import read_json
from freezecache.pipeline import method_runs


def method_time(cfg: Config, seed: int, name: str) -> dict:
    """Method ``name``'s stages after the shared prefix, for one seed: ``wall_s`` (their
    processes), ``epochs`` trained, ``epoch_s`` (training and validation per epoch) and
    ``one_off_s`` (the rest: start-up, setup, cache builds, accounting, the test).

    An epoch's training is the median of the stage's epochs (``epoch_median_s``): the first
    epoch's warm-up (kernels, allocators, the fused decode's compiled code) is paid once, so
    it counts in the one-off, and the break-even extrapolates from a steady epoch. Records
    without the median (older runs) count the mean."""
    wall = per_epochs = 0.0
    epochs = 0
    for stage, item in method_runs(cfg, seed, name):
        if stage.name == "train_prefix":
            continue
        record = read_json(stage.path("stats" if stage.name == "cache" else "costs", cfg, **item))
        wall += record["stage_wall_s"]
        t = record.get("timings", {})
        if stage.name != "cache":
            n = t.get("epochs", 0)
            train = n * t["epoch_median_s"] if "epoch_median_s" in t else t.get("train_s", 0.0)
            epochs += n
            per_epochs += train + t.get("validation_s", 0.0)
    return {
        "wall_s": wall,
        "epochs": epochs,
        "epoch_s": per_epochs / epochs if epochs else 0.0,
        "one_off_s": wall - per_epochs,
    }


def break_even(method: dict, freezeout: dict) -> float | None:
    """Epochs after the freeze point from which ``method`` (a :func:`method_time`) is done
    sooner than ``freezeout``: its extra one-off seconds over what it saves per epoch; None
    when it saves nothing per epoch."""
    saved = freezeout["epoch_s"] - method["epoch_s"]
    if saved <= 0:
        return None
    return max(0.0, (method["one_off_s"] - freezeout["one_off_s"]) / saved)
