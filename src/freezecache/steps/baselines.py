"""Stages train_prefix and baseline: training on raw images.

train_prefix trains the whole model up to the first freeze point, once per seed, and every
method with a shared prefix continues from it. A baseline then trains to the end: Normal keeps
everything trainable; FreezeOut freezes the blocks up to each point (still running them
forward); a control such as Normal without flips trains from the starting weights on its own.
"""

from __future__ import annotations

from freezecache.config import Config
from freezecache.costs import method_costs
from freezecache.methods import method
from freezecache.models import split
from freezecache.schedule import phases
from freezecache.steps.context import Context
from freezecache.train import RunState


def train_prefix(cfg: Config, seed: int) -> None:
    ctx = Context(cfg, seed, "train_prefix")
    model = ctx.new_model()
    until = cfg.prefix_epochs
    trainer = ctx.trainer(
        model, None, ctx.data_dir / "train.npz", ctx.stage_path("pretrain", "state")
    )
    trainer.fit(
        state="full",
        position=0,
        start=0,
        end=until,
        total_epochs=cfg.train.epochs,
        batches=ctx.image_batches(),
        forward=model,
        steps_per_epoch=ctx.image_steps,
        evaluate=lambda: ctx.evaluate(model),
    )
    schedule, history = [("full", 0, until)], trainer.state.history
    costs = method_costs(ctx, model, "normal", history, schedule=schedule) if ctx.main else {}
    ctx.finish(trainer, model, costs)


def baseline(cfg: Config, seed: int, name: str) -> None:
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
    trainer = ctx.trainer(model, start, ctx.data_dir / "train.npz", *inputs)
    for ph in todo:
        prefix, suffix = split(model, ph.position)
        full = ph.state == "full"
        trainer.fit(
            state=ph.state,
            position=ph.position,
            start=max(ph.start, cfg.prefix_epochs if m.shared_prefix else 0),
            end=ph.end,
            total_epochs=cfg.train.epochs,
            batches=ctx.image_batches(train),
            forward=model if full else suffix,
            frozen=None if full else prefix,  # FreezeOut: runs forward, without a graph
            steps_per_epoch=ctx.image_steps,
            evaluate=lambda: ctx.evaluate(model),
        )
    costs = method_costs(ctx, model, name, trainer.state.history) if ctx.main else {}
    ctx.finish(trainer, model, costs, final=True)
