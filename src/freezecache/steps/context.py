"""What every stage shares: its config, seed and matrix item, the device, the prepared data as
tensors on it, the model, and the paths of its outputs and inputs."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from freezecache import data
from freezecache.config import Config, Train
from freezecache.core import runtime
from freezecache.models import BlockModel, feature_shape, split
from freezecache.pipeline import STAGES, Stage
from freezecache.steps.model import build_model, check_schedule, load_start
from freezecache.training import distributed
from freezecache.training.train import Features, Images, RunState, evaluate

# Validation features of a frozen prefix are held on the device when they take at most this.
FEATURES_BUDGET = 1 << 30


class Context:
    """Device, data and model for one seed of one stage, built once per stage."""

    def __init__(
        self,
        cfg: Config,
        seed: int,
        stage: str,
        prepared: Path | None = None,
        params: Config | None = None,
        **item,
    ) -> None:
        self.startup_s = runtime.process_seconds()  # the interpreter and the imports
        self.cfg = cfg
        # The config as params.yaml gives it (``cfg`` may be derived from it, e.g. a decided
        # auto point): what the stage's resume key is computed from, as `freezecache gc` does.
        self.params = params or cfg
        self.seed = seed
        self.stage: Stage = STAGES[stage]
        self.item = {"seed": seed, **item}  # the matrix item this stage runs for
        self.name = self.stage.item_name(self.item)
        runtime.set_threads(cfg.runtime.threads)
        runtime.seed_everything(seed)
        # Under torchrun with several processes: this rank's device, in the process group.
        self.device = distributed.setup(
            cfg.distributed.backend, runtime.pick_device(cfg.runtime.device)
        )
        self.main = distributed.is_main()  # rank 0 writes the outputs
        self.data_dir = prepared or STAGES["prepare"].path("data", cfg)
        train, test, self.meta = data.load_prepared(self.data_dir)
        val = data.load_val(self.data_dir)
        self.train = Images.from_split(train, self.meta, self.device)
        self.test = Images.from_split(test, self.meta, self.device)
        self.val = Images.from_split(val, self.meta, self.device) if val is not None else None
        self.live = None  # this stage's DVCLive log, once a run opens it (steps.run)

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
        torch.manual_seed(runtime.derive_seed(self.seed, "init"))
        model = build_model(self.cfg.model, self.meta)
        check_schedule(self.cfg, model)
        if self.stage.name != "pretrain":
            load_start(model, RunState.load(self.stage_path("pretrain", "state")).model)
        return model.to(self.device)

    # -- data ---------------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, split: str = "val", per_sample: bool = False) -> dict:
        """``{split}_loss`` / ``{split}_acc`` on raw images (``per_sample``: ``{split}_correct``
        too); {} when there is no such split."""
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
            per_sample=per_sample,
        )

    def evaluator(self, model: BlockModel, position: int = 0) -> Callable[[], dict]:
        """Per-epoch validation of ``model`` with the first ``position`` blocks frozen: their
        output on the validation images is computed once here and only the rest runs each epoch
        (the same numbers as the whole model; tested), unless those features would take more
        than :data:`FEATURES_BUDGET` bytes."""
        if position <= 0 or self.val is None:
            return lambda: self.evaluate(model)
        shape = feature_shape(model, position)
        if Features.nbytes(self.val, shape) > FEATURES_BUDGET:
            return lambda: self.evaluate(model)
        prefix, suffix = split(model, position)
        t = self.cfg.train
        shard = (distributed.rank(), distributed.world_size())

        def run(part, x):
            with (
                runtime.eval_mode(part),
                torch.no_grad(),
                runtime.autocast(t.precision, self.device),
            ):
                return part(x)

        feats = Features.of(self.val, prefix, t.eval_batch_size, shard, run)
        return lambda: evaluate(
            suffix, feats, batch_size=t.eval_batch_size, precision=t.precision,
            device=self.device, prefix="val", shard=shard,
        )  # fmt: skip

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
