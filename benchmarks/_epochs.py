"""One training epoch of each method, side by side, and where its time goes (issue 19).

Every setting trains the model the way its stage does, through the stage's own functions: the
raw-image epochs of Normal and FreezeOut (``steps.run.image_spec``), the cache epochs of Discard
and Discard & Aug. (``steps.suffix.cached_features`` and ``suffix_spec``: the public
``CachedFeatures.batches``), each with the stage's per-epoch validation. The epochs run in
turn, several rounds, under a :class:`freezecache.core.timing.Sections` clock that splits them
into reading, decoding, augmenting, forward, backward, the optimizer step and validation. Two
more settings time the timed discard method's cache read from the file and its features held
decoded in memory (P1).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import logging
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

import benchlib as bench
from freezecache.accounting.flops import part_flops
from freezecache.cache import iter_cache
from freezecache.cache.features import CachedFeatures
from freezecache.core import runtime
from freezecache.core.io import atomic_write_text
from freezecache.core.timing import Sections
from freezecache.reporting.labels import label
from freezecache.steps import suffix
from freezecache.steps.context import Context
from freezecache.steps.run import image_spec
from freezecache.training import distributed
from freezecache.training.augment import augment_features
from freezecache.training.schedule import Phase
from freezecache.training.train import Trainer, TrainSpec

log = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parents[1]
# Sections of a training epoch, in the order the breakdown lists them; "data" is the trainer's
# whole wait for a batch, the others split it (or are compute).
DATA_PARTS = ("read + unpack", "decode", "augment", "decode + augment (fused)")
COMPUTE_PARTS = ("forward", "backward", "optimizer step")
# the timed method's other runs: P1's three, and the public CachedFeatures through a DataLoader
API_LOADER = "CachedFeatures in a DataLoader"
VARIANTS = ("compressed in RAM", "cache file", "features in RAM", API_LOADER)


@dataclasses.dataclass
class Setting:
    """One timed setting: a trainer and the spec of one epoch, as the stage would build them."""

    trainer: Trainer
    spec: TrainSpec
    setup_s: float  # building the model copy, the loader and the validation features


class RamFeed:
    """The cached features decoded into float32 on the device, augmented by torch as the feed's
    device path does: the P1 baseline (the cache's read and decode left out). It stands in for
    a :class:`CachedFeatures` in ``steps.suffix.suffix_spec`` (its ``batches``)."""

    def __init__(self, features: CachedFeatures, batch_size: int):
        self.feed, self.info = features.feed(batch_size), features.info
        self.batch_size = batch_size
        parts: dict[str, list] = {}
        for batch in iter_cache(features.path, features.info):
            for key, value in batch.items():
                if key != "index":
                    parts.setdefault(key, []).append(value)
        self.arrays = {k: torch.cat(v).to(self.feed.device) for k, v in parts.items()}

    def num_batches(self, batch_size: int) -> int:
        return len(self.feed)

    def batches(self, batch_size: int, *, seed: int, epoch: int) -> Iterator[tuple]:
        """The epoch's batches as ``CachedFeatures.batches`` gives them (order and draws)."""
        g = runtime.generator(*distributed.stream(seed, epoch, "features"))
        orders = bench.batch_orders(
            self.info.num_samples, self.info.chunk_size, self.batch_size, seed, epoch
        )
        for ids in orders:
            idx = torch.from_numpy(ids).to(self.feed.device)
            b = {k: v.index_select(0, idx) for k, v in self.arrays.items()}
            draws = self.feed.aug.draw(len(ids), g, self.feed.bank, self.feed.numel)
            where = b.get("extra_pos", self.feed._where)
            x = augment_features(b["x"], self.feed.aug, draws, self.feed.bank, extra=b.get("extra"),
                                 where=where)  # fmt: skip
            yield x, b["y"]


class LoaderFeed:
    """``CachedFeatures`` as a user's loop reads it: a map-style dataset in a ``DataLoader``
    (shuffled samples, batches decoded and augmented by ``__getitems__``, the loader params'
    workers), standing in for its ``batches`` in ``steps.suffix.suffix_spec``."""

    def __init__(self, features: CachedFeatures, batch_size: int, workers: int):
        self.device = features.device
        self.g = torch.Generator()
        self.loader = torch.utils.data.DataLoader(
            features, batch_size=batch_size, shuffle=True, num_workers=workers,
            generator=self.g, persistent_workers=workers > 0,
            pin_memory=features.device.type == "cuda",
        )  # fmt: skip

    def num_batches(self, batch_size: int) -> int:
        return len(self.loader)

    def batches(self, batch_size: int, *, seed: int, epoch: int) -> Iterator[tuple]:
        self.g.manual_seed(runtime.derive_seed(seed, epoch, "api loader"))
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def _timed(build: Callable[[], Setting]) -> Setting:
    start = time.perf_counter()
    setting = build()
    setting.setup_s = time.perf_counter() - start
    return setting


def settings(ctx: Context, model, block: int, caches: dict[str, Path], timed: str) -> dict:
    """setting name -> :class:`Setting`: each method's epoch after the freeze point, plus the
    timed discard method from the cache file and from decoded features in memory."""
    cfg, out = ctx.cfg, {}

    def trainer(m) -> Trainer:
        return Trainer(m, cfg.train, seed=ctx.seed, device=ctx.device)

    for name, state in (("normal", "full"), ("freezeout", "freeze")):

        def image(name=name, state=state) -> Setting:
            m = copy.deepcopy(model)
            phase = Phase(state, 0 if state == "full" else block, 0, 1)
            return Setting(trainer(m), image_spec(ctx, m, phase), 0.0)

        out[name] = _timed(image)

    def cached(name: str, path: Path, in_memory=None, ram: bool = False, api=False) -> Setting:
        m = copy.deepcopy(model)
        loader = {} if in_memory is None else {"in_memory": in_memory}
        features = suffix.cached_features(ctx, path, name, m, block, **loader)
        source = RamFeed(features, cfg.train.batch_size) if ram else features
        if api:
            source = LoaderFeed(features, cfg.train.batch_size, cfg.loader.workers)
        return Setting(trainer(m), suffix.suffix_spec(ctx, m, block, source, (0, 1)), 0.0)

    for name, path in caches.items():
        out[name] = _timed(lambda n=name, p=path: cached(n, p))
    path = caches[timed]
    out[f"{timed}, compressed in RAM"] = _timed(lambda: cached(timed, path, in_memory=True))
    out[f"{timed}, cache file"] = _timed(lambda: cached(timed, path, in_memory=False))
    out[f"{timed}, features in RAM"] = _timed(lambda: cached(timed, path, ram=True))
    out[f"{timed}, {API_LOADER}"] = _timed(lambda: cached(timed, path, api=True))
    return out


def epoch_of(setting: Setting, epoch: int) -> dict:
    """Train ``setting`` for epoch ``epoch`` (validation included) under a clock: its history
    row (``epoch_time_s``: the training loop alone) with the seconds of every section."""
    setting.trainer.state.epoch = epoch
    phase = setting.spec.phase._replace(start=epoch, end=epoch + 1)
    with bench.OtherLoad() as other, Sections() as clock:
        setting.trainer.fit(dataclasses.replace(setting.spec, phase=phase))
    row = dict(setting.trainer.state.history[-1])
    row["sections"] = dict(clock.seconds)
    row["other_cores"] = other.cores
    return row


def time_settings(runs: dict[str, Setting], rounds: int) -> dict:
    """One warm-up epoch of every setting, then ``rounds`` rounds of one epoch each in turn;
    per setting the fastest round's breakdown and every round's epoch time."""
    for s in runs.values():  # kernels, allocators, numba's compilation, loader workers
        epoch_of(s, 0)
    rows = {name: [] for name in runs}
    for r in range(1, rounds + 1):
        for name, s in runs.items():
            row = epoch_of(s, r)
            rows[name].append(row)
            log.info("epochs round %d: %s %.2fs", r, name, row["epoch_time_s"])
    return {name: summarize(got, runs[name]) for name, got in rows.items()}


def summarize(rows: list[dict], setting: Setting) -> dict:
    """The fastest round's breakdown (seconds per part of one epoch) and all rounds' times."""
    best = min(rows, key=lambda r: r["epoch_time_s"])
    sec = best["sections"]
    parts = {k: sec.get(k, 0.0) for k in (*DATA_PARTS, *COMPUTE_PARTS)}
    data = sec.get("data", 0.0)
    parts["data, other"] = max(0.0, data - sum(sec.get(k, 0.0) for k in DATA_PARTS))
    parts["loop, other"] = max(
        0.0, best["epoch_time_s"] - data - sum(sec.get(k, 0.0) for k in COMPUTE_PARTS)
    )
    return {
        "epoch_s": best["epoch_time_s"],
        "epochs_s": [r["epoch_time_s"] for r in rows],
        "validation_s": sec.get("validation", 0.0),
        "data_s": data,
        "parts_s": {k: v for k, v in parts.items() if v > 0},
        "setup_s": setting.setup_s,
        "steps": setting.spec.steps_per_epoch,
        "other_cores": best["other_cores"],
    }


def step_flops(ctx: Context, model, block: int) -> dict:
    """FLOPs of one training step per method at ``block`` (a trained part costs 3x its forward;
    FreezeOut also runs the frozen prefix forward)."""
    meta = ctx.meta
    part = part_flops(model, block, (meta["channels"], meta["img_size"], meta["img_size"]))
    n = ctx.cfg.train.batch_size
    return {
        "normal": 3 * part["full_fwd"] * n,
        "freezeout": (3 * part["suffix_fwd"] + part["prefix_fwd"]) * n,
        "discard": 3 * part["suffix_fwd"] * n,
        "discard_aug": 3 * part["suffix_fwd"] * n,
    }


def startup_s(script: str, repeats: int = 3) -> float:
    """A stage process's start: the interpreter and the stage's imports (``--help``), median."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "stages" / script), "--help"],
                       check=True, capture_output=True, cwd=ROOT)  # fmt: skip
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fixed_costs(epochs: dict, builds: dict[str, dict]) -> dict:
    """The one-off costs of each method's stages after the shared prefix run: process start-up
    and setup of its training stage, and for the discard methods their cache stage (start-up,
    ranking, the build's forward passes, encoding)."""
    train_start = startup_s("baseline.py")
    suffix_start = startup_s("train_suffix.py")
    cache_start = startup_s("cache.py")
    out = {}
    for name in ("normal", "freezeout"):
        out[name] = {"start-up": train_start, "setup": epochs[name]["setup_s"]}
    for name, stats in builds.items():
        t = stats.get("timings", {})
        out[name] = {
            "start-up": suffix_start + cache_start,
            "setup": epochs[name]["setup_s"],
            "ranking (its passes kept for the build)": t.get("ranking_s", 0.0),
            "cache build: prefix forward": t.get("prefix_forward_s", 0.0),
            "cache build: flipped pass": t.get("flipped_forward_s", 0.0),
            "cache build: encode + write": t.get("encode_write_s", 0.0),
        }
    return out


def break_even(epochs: dict, fixed: dict, name: str) -> float | None:
    """Epochs after the freeze point from which ``name`` overtakes FreezeOut: its extra one-off
    costs over the time it saves per epoch (training and validation); None if it saves none."""
    per_epoch = {m: epochs[m]["epoch_s"] + epochs[m]["validation_s"] for m in ("freezeout", name)}
    saved = per_epoch["freezeout"] - per_epoch[name]
    extra = sum(fixed[name].values()) - sum(fixed["freezeout"].values())
    if saved <= 0:
        return None
    return max(0.0, extra / saved)


def breakdown(ctx, model, block: int, caches: dict[str, Path], builds: dict, timed: str,
              rounds: int, fixed: dict | None = None) -> dict:  # fmt: skip
    """The epoch breakdown of every method, the per-epoch goal ratios and the break-even.

    ``fixed``: each method's one-off seconds by part as its real stage processes paid them
    (benchmarks/_stages.py); without it, estimated here (:func:`fixed_costs`)."""
    runs = settings(ctx, model, block, caches, timed)
    epochs = time_settings(runs, rounds)
    flops = step_flops(ctx, model, block)
    fixed = fixed_costs(epochs, builds) if fixed is None else fixed
    goals = {}
    for name in caches:
        time_ratio = epochs[name]["epoch_s"] / epochs["freezeout"]["epoch_s"]
        flops_ratio = flops[name] / flops["freezeout"]
        data = epochs[name]["data_s"]
        compute = sum(epochs[name]["parts_s"].get(k, 0.0) for k in COMPUTE_PARTS)
        goals[name] = {
            "epoch_vs_freezeout": time_ratio,
            "flops_vs_freezeout": flops_ratio,
            "epoch_goal": 1.05 * flops_ratio,
            "epoch_goal_met": time_ratio <= 1.05 * flops_ratio,
            "data_vs_compute": data / compute,  # the fallback goal: <= 0.05
            "break_even_epochs": break_even(epochs, fixed, name),
        }
    labels = {n: label(n) for n in ("normal", "freezeout", *caches)}
    for extra in VARIANTS:
        extra = f"{timed}, {extra}"
        labels[extra] = extra.replace(timed, label(timed))
    return {"epochs": epochs, "step_flops": flops, "fixed_s": fixed, "goals": goals,
            "labels": labels, "rounds": rounds}  # fmt: skip


def p1(result: dict, timed: str) -> dict:
    """P1 from the breakdown: the timed method's epoch from the cache (in memory and from the
    file) over the same epoch from its features decoded in memory."""
    e = result["epochs"]
    ram = e[f"{timed}, features in RAM"]["epoch_s"]
    return {
        "p1_cache_vs_ram": e[timed]["epoch_s"] / ram,
        "p1_file_cache_vs_ram": e[f"{timed}, cache file"]["epoch_s"] / ram,
        # the public reader through a user's DataLoader against the stage's own epoch
        "api_loader_vs_stage": e[f"{timed}, {API_LOADER}"]["epoch_s"] / e[timed]["epoch_s"],
    }


def breakdown_rows(result: dict) -> list[dict]:
    """The breakdown as a long table: seconds of one epoch per part (validation last), one
    row per setting and part, in the breakdown's order (`make plots` stacks them)."""
    rows = []
    for name, e in result["epochs"].items():
        for part, seconds in {**e["parts_s"], "validation": e["validation_s"]}.items():
            rows.append({"setting": result["labels"][name], "part": part, "seconds": seconds})
    return rows


# An older bench.json (before the breakdown) timed the timed method's epoch three ways and the
# full model's, and split each only into the wait for data and the rest.
_OLD_SETTINGS = {"cache in memory": ", compressed in RAM", "cache file": ", cache file",
                 "ram": ", features in RAM", "full": None}  # fmt: skip


def bench_breakdown_rows(bench_json: dict) -> list[dict]:
    """:func:`breakdown_rows` of a bench.json; an older one without the breakdown gives two
    parts per setting, the wait for data and the rest of the epoch (not split further)."""
    p1p2 = bench_json["p1_p2"]
    if "breakdown" in p1p2:
        return breakdown_rows(p1p2["breakdown"])
    timed = label(bench_json["setup"]["method"])
    rows = []
    for key, e in p1p2["epochs"].items():
        suffix = _OLD_SETTINGS[key]
        setting = label("normal") + " (full model)" if suffix is None else timed + suffix
        wait = e["data_wait_frac"] * e["min_s"]
        rows += [{"setting": setting, "part": "data wait", "seconds": wait},
                 {"setting": setting, "part": "rest (not split in this bench.json)",
                  "seconds": e["min_s"] - wait}]  # fmt: skip
    return rows


def write_breakdown_csv(bench_json: dict, path: Path) -> Path:
    """:func:`bench_breakdown_rows` as CSV (setting, part, seconds) at ``path``."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["setting", "part", "seconds"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(bench_breakdown_rows(bench_json))
    atomic_write_text(path, buf.getvalue())
    return path


def stacked_bar_spec(result: dict) -> dict:
    """A Vega-Lite stacked bar: seconds of one epoch per part, one bar per setting."""
    rows = breakdown_rows(result)
    return {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
        "title": "One epoch after the freeze point, by part",
        "data": {"values": rows},
        "mark": "bar",
        "width": 420,
        "encoding": {
            "y": {"field": "setting", "type": "nominal", "sort": None, "title": None},
            "x": {
                "field": "seconds",
                "type": "quantitative",
                "aggregate": "sum",
                "title": "seconds per epoch",
            },  # fmt: skip
            "color": {"field": "part", "type": "nominal"},
        },
    }


def np_free(x):  # a JSON-friendly copy (numpy scalars to floats)
    if isinstance(x, dict):
        return {k: np_free(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [np_free(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x
