"""What every training stage shares: device, data and model for one seed, resumable trainers
with their DVCLive folder, and the files a training stage writes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from freezecache import data, distributed, runtime
from freezecache.config import Config, Train, dump_config
from freezecache.errors import FreezecacheError
from freezecache.io import atomic_write_json, file_digest
from freezecache.live import EpochLog
from freezecache.models import create_model
from freezecache.pipeline import STAGES, START, Stage, fill
from freezecache.train import Images, RunState, Trainer, evaluate

log = logging.getLogger(__name__)


class Context:
    """Device, data and model for one seed of one stage, built once per stage."""

    def __init__(
        self, cfg: Config, seed: int, stage: str, prepared: Path | None = None, **item
    ) -> None:
        self.cfg = cfg
        self.seed = seed
        self.stage: Stage = STAGES[stage]
        self.item = {"seed": seed, **item}  # the matrix item this stage runs for
        self.name = "@".join([stage, "-".join(str(v) for v in _item_names(self.item))])
        runtime.set_threads(cfg.runtime.threads)
        runtime.seed_everything(seed)
        # Under torchrun with several processes: this rank's device, in the process group.
        self.device = distributed.setup(
            cfg.distributed.backend, runtime.pick_device(cfg.runtime.device)
        )
        self.main = distributed.is_main()  # rank 0 writes the outputs
        self.data_dir = prepared or STAGES["prepare"].path("data", cfg)
        splits = data.load_prepared(self.data_dir)
        train, test, self.meta = splits[0], splits[1], splits[2]
        val = data.load_val(self.data_dir)
        self.train = Images.from_split(train, self.meta, self.device)
        self.test = Images.from_split(test, self.meta, self.device)
        self.val = Images.from_split(val, self.meta, self.device) if val is not None else None

    # -- paths --------------------------------------------------------------------------------
    def out(self, role: str) -> Path:
        """This stage's output ``role``, as pipeline.py declares it."""
        return self.stage.path(role, self.cfg, **self.item)

    def stage_path(self, stage: str, role: str, **item) -> Path:
        """Output ``role`` of another stage (an input of this one)."""
        return STAGES[stage].path(role, self.cfg, **{**self.item, **item})

    # -- model --------------------------------------------------------------------------------
    def new_model(self) -> nn.Module:
        """The model with the starting weights (pretrain stage), or seeded random init."""
        cfg = self.cfg
        torch.manual_seed(runtime.derive_seed(self.seed, "init"))
        model = create_model(
            cfg.model.name,
            num_classes=self.meta["num_classes"],
            in_chans=self.meta["channels"],
            img_size=self.meta["img_size"],
            **cfg.model.kwargs,
        )
        if self.stage.name != "pretrain":
            load_start(model, RunState.load(self.stage_path("pretrain", "state")).model)
        return model.to(self.device)

    # -- data ---------------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, split: str = "val") -> dict:
        """``{split}_loss`` / ``{split}_acc`` on raw images; {} when there is no such split."""
        images = self.val if split == "val" else self.test
        if images is None:
            return {}
        t = self.cfg.train
        return evaluate(
            model,
            images,
            batch_size=t.eval_batch_size,
            precision=t.precision,
            device=self.device,
            prefix=split,
            shard=(distributed.rank(), distributed.world_size()),
        )

    def image_batches(self, train: Train | None = None):
        """Per-epoch augmented, shuffled batches of the training images."""
        aug = train or self.cfg.train

        world = distributed.world_size()
        distributed.check_batch(self.cfg.train.batch_size, "samples")

        def batches(epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
            g = runtime.generator(self.seed, epoch, "images")  # the order: one for all ranks
            own = runtime.generator(*distributed.stream(self.seed, epoch, "images"))
            return self.train.batches(
                self.cfg.train.batch_size,
                g=g,
                train_aug=aug,
                shard=(distributed.rank(), world),
                aug_g=own if world > 1 else None,  # augmentation: this rank's own draws
            )

        return batches

    @property
    def image_steps(self) -> int:
        return math.ceil(len(self.train) / self.cfg.train.batch_size)

    # -- resumable training -------------------------------------------------------------------
    def run_key(self, *inputs: Path) -> str:
        """Identity of this stage's work: config + input contents. A checkpoint is resumed only
        when this matches, so an edited param never resumes a stale run."""
        h = hashlib.sha256(self.name.encode())
        h.update(json.dumps(dump_config(self.cfg), sort_keys=True).encode())
        for p in inputs:
            h.update(file_digest(p).encode())
        return h.hexdigest()[:16]

    def checkpoint_dir(self) -> Path:
        return Path(self.cfg.paths.checkpoints) / self.name

    def trainer(self, model: nn.Module, start: RunState | None, *inputs: Path) -> Trainer:
        """A trainer that resumes from this stage's checkpoint when its key matches, and logs
        every epoch to this stage's DVCLive folder."""
        ckpt = self.checkpoint_dir() / f"{self.run_key(*inputs)}.pt"
        resumed = None
        if self.main and ckpt.is_file():
            resumed = RunState.load(ckpt)
            log.info("resuming %s from its checkpoint at epoch %d", self.name, resumed.epoch)
        # Every rank resumes from rank 0's reading of the checkpoint: the same epoch everywhere.
        resumed = distributed.broadcast_object(resumed)
        state = start if resumed is None else resumed
        trainer = Trainer(
            model,
            self.cfg.train,
            seed=self.seed,
            device=self.device,
            state=state,
            checkpoint=ckpt,
            sync_batchnorm=self.cfg.distributed.sync_batchnorm,
        )
        self.live = (
            EpochLog(
                self.out("metrics").parent,
                trainer.state.history,
                curves="plots" in self.stage.outs,
            )
            if self.main
            else None
        )
        trainer.on_epoch = self.live.log if self.live else None
        return trainer

    def finish(
        self, trainer: Trainer, model: nn.Module, costs: dict, *, final: bool = False
    ) -> None:
        """Writes state.pt and the summary; a method's last stage also measures test accuracy
        (once per run: every choice is made on the validation split). Every rank calls it (the
        test accuracy is reduced over ranks); rank 0 writes."""
        summary = {
            "epochs": trainer.state.epoch,
            "stage_wall_s": runtime.process_seconds(),
            "peak_rss_mb": runtime.peak_rss_mb(),
        }
        if final:
            summary.update(self.evaluate(model, "test"))
            trainer.state.extra["test"] = {k: summary[k] for k in ("test_acc", "test_loss")}
        if self.main:
            costs.update(stage_wall_s=summary["stage_wall_s"], peak_rss_mb=summary["peak_rss_mb"])
            atomic_write_json(self.out("costs"), costs)
            published(trainer.state).save(self.out("state"))
            self.live.finish(summary)
            for f in self.checkpoint_dir().glob("*.pt"):
                f.unlink()
        distributed.barrier()  # the stage ends on every rank once its outputs exist


# Per-epoch measurements of this machine, not results: kept in checkpoints (a resumed stage
# replays them into its curves) but not in the published state, whose hash the next stages
# depend on, so a rerun that trains the same weights changes nothing downstream.
TIMINGS = ("epoch_time_s", "samples_per_s", "data_wait_frac", "cuda_peak_mb")


def published(state: RunState) -> RunState:
    """The run state without machine timings (see TIMINGS)."""
    history = [{k: v for k, v in row.items() if k not in TIMINGS} for row in state.history]
    return dataclasses.replace(state, history=history)


def load_start(model: nn.Module, weights: dict) -> None:
    """Loads the pretrain stage's weights (empty: keep the random init). They were saved for
    this architecture without a classifier, so the head stays fresh for the target classes."""
    if not weights:
        return
    missing, unexpected = model.load_state_dict(weights, strict=False)
    body = [k for k in missing if not k.startswith("head.")]
    if body or unexpected:
        raise FreezecacheError(
            f"the pretrain stage's weights do not fit {model.name} (missing {body[:3]}, "
            f"unexpected {unexpected[:3]}) — rerun `dvc repro pretrain`"
        )


def _item_names(item: dict) -> list[object]:
    """How DVC names a matrix item in stage names: values, and p<index> for freeze points."""
    return [v if not hasattr(v, "block") else f"b{v.block}" for v in item.values()]


def start_of_point(ctx: Context, point) -> tuple[Path, RunState]:
    """The run a freeze point continues from: the shared prefix, or the point before it."""
    path = fill(START, ctx.cfg, seed=ctx.seed, method=ctx.item["method"], p=point)
    if not path.is_file():
        raise FreezecacheError(f"{path}: missing — run `dvc repro` to produce it")
    return path, RunState.load(path)
