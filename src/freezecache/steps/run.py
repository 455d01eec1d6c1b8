"""A stage's resumable training run: a trainer that resumes from the stage's checkpoint when
its key matches, logs every epoch to the stage's DVCLive folder, and publishes the stage's
files (state, costs, metrics) at the end."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import statistics
from pathlib import Path

from torch import nn

from freezecache.accounting.stats import pack_correct
from freezecache.core import interrupts, runtime
from freezecache.core.errors import FreezecacheError
from freezecache.core.io import atomic_write_json
from freezecache.core.records import Costs
from freezecache.core.timing import section, stage_timings
from freezecache.models import split
from freezecache.pipeline import start_of_point as _start_file
from freezecache.pipeline.keys import run_key
from freezecache.steps.context import Context
from freezecache.training import distributed
from freezecache.training.live import EpochLog
from freezecache.training.schedule import Phase
from freezecache.training.state import Checkpoint, RunState
from freezecache.training.train import Trainer, TrainSpec

log = logging.getLogger(__name__)

# Per-epoch measurements of this machine, not results: kept in checkpoints (a resumed stage
# replays them into its curves) but not in the published state, whose hash the next stages
# depend on, so a rerun that trains the same weights changes nothing downstream.
TIMINGS = ("epoch_time_s", "samples_per_s", "data_wait_frac", "cuda_peak_mb")


def stage_key(ctx: Context) -> str:
    """Identity of a stage's work (:func:`freezecache.pipeline.keys.run_key`: its declared
    params and the contents of its data deps). A checkpoint or spool is resumed only when this
    matches, so an edited param never resumes a stale run."""
    return run_key(ctx.params, ctx.stage.name, ctx.item)


def checkpoint_dir(ctx: Context) -> Path:
    return Path(ctx.cfg.paths.checkpoints) / ctx.name


def clear_checkpoints(ctx: Context) -> None:
    """Once the stage is done: its checkpoint folder goes, with the run just published and
    whatever other params or inputs left there (no current params can resume those). Run at
    the stage's success (:func:`freezecache.core.interrupts.at_success`): an interrupted one
    keeps them, so that its rerun resumes."""
    shutil.rmtree(checkpoint_dir(ctx), ignore_errors=True)


class Run:
    """One stage's training: ``start`` (the state it continues from, or None for a fresh run)
    unless the stage's checkpoint under its current key (:func:`stage_key`) says it got
    further."""

    def __init__(self, ctx: Context, model: nn.Module, start: RunState | None):
        self.ctx = ctx
        self.model = model
        ckpt = Checkpoint(checkpoint_dir(ctx) / f"{stage_key(ctx)}.pt")
        resumed = ckpt.load() if ctx.main else None  # damaged ones dropped, one line each
        if resumed is not None:
            log.info("resuming %s from its checkpoint at epoch %d", ctx.name, resumed.epoch)
        # Every rank resumes from rank 0's reading of the checkpoint: the same epoch everywhere.
        resumed = distributed.broadcast_object(resumed)
        self.first_epoch = (start or RunState(model={})).epoch  # the epochs before this stage
        self.trainer = Trainer(
            model,
            ctx.cfg.train,
            seed=ctx.seed,
            device=ctx.device,
            state=start if resumed is None else resumed,
            checkpoint=ckpt.path,
            sync_batchnorm=ctx.cfg.distributed.sync_batchnorm,
        )
        self.live = None
        if ctx.main:
            folder = ctx.out("metrics").parent
            curves = "plots" in ctx.stage.outs
            self.live = EpochLog(folder, self.trainer.state.history, curves=curves)
            self.trainer.on_epoch = self.live.log
        ctx.live = self.live

    @property
    def state(self) -> RunState:
        return self.trainer.state

    def fit(self, spec: TrainSpec) -> None:
        self.trainer.fit(spec)

    def finish(self, costs: Costs | dict, *, final: bool = False) -> None:
        """Writes state.pt and the summary; a method's last stage also measures test accuracy
        (once per run: every choice is made on the validation split). Every rank calls it (the
        test accuracy is reduced over ranks); rank 0 writes."""
        ctx, trainer = self.ctx, self.trainer
        summary = {
            "epochs": trainer.state.epoch,
            "stage_wall_s": runtime.process_seconds(),
            "peak_rss_mb": runtime.peak_rss_mb(),
        }
        if final:
            with section("test"):
                test = ctx.evaluate(self.model, "test", per_sample=True)
            correct = test.pop("test_correct")
            summary.update(test)
            trainer.state.extra["test"] = {
                **test,
                "correct": pack_correct(correct),  # per image: the report's paired intervals
                "images": len(correct),
            }
        if ctx.main:
            record = costs if isinstance(costs, dict) else costs.to_json()
            record.update(stage_wall_s=summary["stage_wall_s"], peak_rss_mb=summary["peak_rss_mb"])
            record["timings"] = self.timings()
            with interrupts.deferred():  # all of the stage's files, or (interrupted before) none
                atomic_write_json(ctx.out("costs"), record)
                published(trainer.state).save(ctx.out("state"))
                self.live.finish(summary)
            interrupts.at_success(lambda: clear_checkpoints(ctx))
        distributed.barrier()  # the stage ends on every rank once its outputs exist

    def timings(self) -> dict:
        """Where this stage's process spent its time: start-up (interpreter and imports), the
        epochs it trained (their sum, and the median: an epoch without the first one's warm-up),
        and the stage's coarse sections (validation, accounting, test)."""
        rows = [r for r in self.state.history if r["epoch"] > self.first_epoch]
        times = [r["epoch_time_s"] for r in rows if "epoch_time_s" in r]
        return {
            **stage_timings(self.ctx.startup_s),
            "epochs": len(rows),
            "train_s": round(sum(times), 4),
            "epoch_median_s": round(statistics.median(times), 4) if times else 0.0,
        }


def published(state: RunState) -> RunState:
    """The run state without machine timings (see TIMINGS) and without a criterion monitor's
    working state (its weight snapshots: checkpoints need them, later stages do not)."""
    history = [{k: v for k, v in row.items() if k not in TIMINGS} for row in state.history]
    extra = {k: v for k, v in state.extra.items() if k != "monitor"}
    return dataclasses.replace(state, history=history, extra=extra)


def start_of_point(ctx: Context, point) -> tuple[Path, RunState]:
    """The run a freeze point continues from: the shared prefix, or the point before it."""
    path = _start_file(ctx.cfg, ctx.seed, ctx.item["method"], point)
    if not path.is_file():
        raise FreezecacheError(f"{path}: missing — run `dvc repro` to produce it")
    return path, RunState.load(path)


def image_spec(ctx: Context, model, phase: Phase, train=None) -> TrainSpec:
    """Training on raw images in ``phase``: the whole model, or (frozen states) the blocks after
    the phase's position, the frozen prefix running forward without a graph (FreezeOut).

    Validation runs the whole model every epoch, as FreezeOut does: computing the frozen
    prefix's outputs once and reusing them is the discard methods' idea (their suffix stage
    validates that way, :meth:`Context.evaluator`), not FreezeOut's."""
    full = phase.state == "full"
    prefix, suffix = (None, model) if full else split(model, phase.position)
    return TrainSpec(
        phase=phase,
        forward=suffix,
        frozen=prefix,
        batches=ctx.image_batches(train),
        steps_per_epoch=ctx.image_steps,
        evaluate=lambda: ctx.evaluate(model),
    )
