"""Stages train_prefix and baseline: training on raw images.

train_prefix trains the whole model up to the first freeze point, once per seed, and every
method with a shared prefix continues from it. A baseline then trains to the end: Normal keeps
everything trainable; FreezeOut freezes the blocks up to each point (still running them
forward); a control such as Normal without flips trains from the starting weights on its own.
"""

from __future__ import annotations

from freezecache.config import Config
from freezecache.costs import method_costs, require_counter
from freezecache.methods import method
from freezecache.schedule import Phase, phases
from freezecache.steps.context import Context
from freezecache.steps.run import Run, image_spec
from freezecache.train import RunState


def train_prefix(cfg: Config, seed: int) -> None:
    require_counter()
    ctx = Context(cfg, seed, "train_prefix")
    model = ctx.new_model()
    until = cfg.prefix_epochs
    run = Run(ctx, model, None, ctx.data_dir / "train.npz", ctx.stage_path("pretrain", "state"))
    run.fit(image_spec(ctx, model, Phase("full", 0, 0, until)))
    schedule, history = [("full", 0, until)], run.state.history
    costs = method_costs(ctx, model, "normal", history, schedule=schedule) if ctx.main else {}
    run.finish(costs)


def baseline(cfg: Config, seed: int, name: str) -> None:
    require_counter()
    ctx = Context(cfg, seed, "baseline", method=name)
    m = method(name)
    model = ctx.new_model()
    train = cfg.train if m.hflip else cfg.train.model_copy(update={"hflip": False})
    todo = phases(cfg, name)
    if m.shared_prefix:
        start_file = ctx.stage_path("train_prefix", "state")
        start = RunState.load(start_file)
        todo = [ph for ph in todo if ph.end > cfg.prefix_epochs]
        inputs = (start_file,)
    else:
        start, inputs = None, (ctx.stage_path("pretrain", "state"),)
    run = Run(ctx, model, start, ctx.data_dir / "train.npz", *inputs)
    for ph in todo:
        begin = max(ph.start, cfg.prefix_epochs if m.shared_prefix else 0)
        run.fit(image_spec(ctx, model, ph._replace(start=begin), train))
    costs = method_costs(ctx, model, name, run.state.history) if ctx.main else {}
    run.finish(costs, final=True)
