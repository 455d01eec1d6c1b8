"""Stages train_prefix and baseline: training on raw images.

train_prefix trains the whole model up to the first freeze point, once per seed, and every
method with a shared prefix continues from it. A baseline then trains to the end: Normal keeps
everything trainable; FreezeOut freezes the blocks up to each point (still running them
forward); a control such as Normal without flips trains from the starting weights on its own.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from freezecache.accounting.costs import method_costs, require_counter
from freezecache.config import AUTO, Config
from freezecache.core.io import atomic_write_json, read_json
from freezecache.core.methods import method
from freezecache.steps.context import Context
from freezecache.steps.run import Run, image_spec
from freezecache.training.decide import Monitor, Watch, allowed_from, resolve
from freezecache.training.schedule import Phase, phases
from freezecache.training.train import RunState


def train_prefix(cfg: Config, seed: int) -> None:
    """The whole model up to the first freeze point: its given epoch, or (auto) the epoch and
    block its criterion decides (:mod:`freezecache.training.decide`); writes the decision either
    way,
    and the criterion's statistics per block as curves."""
    require_counter()
    ctx = Context(cfg, seed, "train_prefix")
    model = ctx.new_model()
    allowed_file = ctx.stage_path("plan", "allowed")
    run = Run(ctx, model, None)
    point = cfg.points[0] if cfg.points else None
    watch = _watch(ctx, model, run, point, allowed_file)
    until = cfg.prefix_epochs if not cfg.auto else (
        point.epoch if point.epoch != AUTO else cfg.criterion.epoch_max
    )  # fmt: skip
    run.fit(replace(image_spec(ctx, model, Phase("full", 0, 0, until)), monitor=watch))
    if ctx.main:
        # given points: where this run stopped, no block (it reads none: a block moved elsewhere
        # leaves this run and every stage reading its decision as they are)
        decision = watch.decision if cfg.auto else {"epoch": point.epoch, "why": "freeze.points"}
        # every measurement with it: benchmarks/adaptive_search.py replays other thresholds
        atomic_write_json(ctx.out("decision"), {**decision, "rows": watch.monitor.record()})
        _curves(ctx.out("criterion").parents[1], watch.monitor, cfg.criterion.threshold)
    schedule, history = [("full", 0, run.state.epoch)], run.state.history
    costs = method_costs(ctx, model, "normal", history, schedule=schedule) if ctx.main else {}
    run.finish(costs)


def _watch(ctx: Context, model, run: Run, point, allowed_file) -> Watch:
    """The criterion's monitor of the run (deciding when the first point is auto)."""
    cfg = ctx.cfg
    crit = cfg.criterion
    probe = None
    if crit.rule == "output_change":  # a fixed batch, the same on every rank and resume
        probe, _ = next(iter(ctx.train.batches(min(64, len(ctx.train)))))
    allowed = lambda block, epoch: True  # noqa: E731 (a fixed schedule decides nothing)
    if cfg.auto:
        allowed = allowed_from(read_json(allowed_file), cfg.train.epochs)
    monitor = Monitor(model, crit, probe)
    return Watch(monitor, point, allowed, cfg.auto, run.state.extra)


def _curves(folder, monitor: Monitor, threshold: float) -> None:
    """The criterion's statistic per block over training steps, as DVCLive curves."""
    from dvclive import Live

    live = Live(dir=str(folder), resume=False, report=None, save_dvc_exp=False, dvcyaml=None)
    for row in monitor.rows:
        live.step = row["step"]
        for b, value in enumerate(row["values"], start=1):
            if not math.isnan(value):
                live.log_metric(f"block{b}", value)
        live.log_metric("threshold", threshold)
    (Path(folder) / "plots" / "metrics").mkdir(parents=True, exist_ok=True)  # none measured yet


def baseline(params: Config, seed: int, name: str) -> None:
    cfg = resolve(params, seed)
    require_counter()
    ctx = Context(cfg, seed, "baseline", params=params, method=name)
    m = method(name)
    model = ctx.new_model()
    train = cfg.train if m.flips else cfg.train.model_copy(update={"flip_p": 0.0})
    todo = phases(cfg, name)
    stopped = 0  # where the shared run stopped, read from it: Normal reads no freeze point
    if m.shared_prefix:
        start = RunState.load(ctx.stage_path("train_prefix", "state"))
        stopped = start.epoch
        todo = [ph for ph in todo if ph.end > stopped]
    else:
        start = None
    run = Run(ctx, model, start)
    for ph in todo:
        begin = max(ph.start, stopped)
        run.fit(image_spec(ctx, model, ph._replace(start=begin), train))
    costs = method_costs(ctx, model, name, run.state.history) if ctx.main else {}
    run.finish(costs, final=True)
