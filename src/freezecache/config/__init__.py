"""Typed, validated params: `params.yaml` (and every profile in `configs/`) loads into `Config`.

Every problem is reported at once, one line each, before any work starts: unknown keys, wrong
types, out-of-range values and inconsistent freeze schedules. What needs the model (its number
of blocks, its constructor's arguments) is checked where the model is built
(:mod:`freezecache.steps.model`), so that validating params imports no model file.

Defaults are the default profile's values (configs/default.yaml; a test keeps them equal), except
``data``'s subsets, whose default None means all of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from freezecache.core.choices import CODECS, CODINGS
from freezecache.core.errors import FreezecacheError
from freezecache.core.methods import BASELINES, DISCARD, method
from freezecache.core.yamlio import load_yaml

PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
Unit = Annotated[float, Field(ge=0.0, le=1.0)]
PosFloat = Annotated[float, Field(gt=0.0)]
FIRST_AFTER = "../prefix"  # a first point continues from the shared prefix run
AUTO = "auto"  # a freeze point's block or epoch decided by training


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(Section):
    """Folders inside the repository (DVC tracks them); read by dvc.yaml as ${paths.*}."""

    data: str = "data/prepared"
    weights: str = "data/weights"  # local weight files for model.checkpoint
    cache: str = "data/cache"
    runs: str = "runs"
    results: str = "results"
    checkpoints: str = ".ckpt"  # resumable epoch checkpoints (not a DVC output)


class Methods(Section):
    """Which methods run: DVC iterates each list (stages/baseline.py, the discard stages)."""

    baselines: list[Literal[BASELINES]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["normal", "freezeout"]
    )
    discard: list[Literal[DISCARD]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["discard", "discard_aug"]
    )

    @property
    def all(self) -> list[str]:
        return [*self.baselines, *self.discard]


class Data(Section):
    name: Literal["fashion_mnist", "cifar10", "cifar100", "tiny_imagenet", "imagefolder"] = (
        "fashion_mnist"
    )
    root: str | None = None
    download: bool = False
    # classes to keep, as ids (0-based, the dataset's order) or names; relabelled 0..k-1
    classes: list[NonNegInt | Annotated[str, Field(min_length=1)]] | None = None
    img_size: PosInt = 28
    channels: Literal[1, 3] | None = None
    # How images become img_size x img_size (freezecache.data.images): crop (timm's evaluation
    # transform: shorter side, centre crop), letterbox (whole image, black bars), pad (smaller
    # images centred on black unscaled: datasets published at a fixed small size).
    resize: Literal["crop", "letterbox", "pad"] = "crop"
    # crop's fraction (timm's crop_pct): null = the model's own data config (a timm model's
    # pretrained config; 1.0, the whole shorter side, for freezecache's own models)
    crop_pct: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    bad_images: Literal["error", "skip"] = "error"  # an image folder's unusable files
    test_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2  # one pool of class folders
    train_size: PosInt | None = None
    val_size: NonNegInt | None = None  # carved from the training pool, disjoint from train
    test_size: PosInt | None = None
    seed: NonNegInt = 0


class Model(Section):
    name: str = "resnet20"
    checkpoint: str | None = None  # a weights file under paths.weights
    kwargs: dict[str, Any] = Field(default_factory=dict)  # the model's own options


# model.kwargs keys that freezecache passes itself, and the param each comes from. Refused in
# model.kwargs rather than taken from there: one source each, so that the model, the data it is
# prepared for and the caches built from both cannot disagree (the pretrain stage builds the
# same model for pretrain.data, where a copy in model.kwargs would be wrong).
DERIVED_KWARGS = {
    "img_size": "data.img_size",
    "in_chans": "data.channels",
    "num_classes": "data.classes",
}
# Options that would make timm fetch weights: freezecache never downloads (model.checkpoint).
# timm_view refuses the same names for direct create_model callers (a test keeps them equal).
HUB_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path")


class Train(Section):
    epochs: PosInt = 8
    batch_size: PosInt = 64
    lr: PosFloat = 0.01
    momentum: Unit = 0.9
    weight_decay: Annotated[float, Field(ge=0.0)] = 5e-4
    crop_pad: NonNegInt = 2
    # Horizontal flips, the one setting for every method: the probability that a raw image
    # (full-model, FreezeOut and prefix training) or a cached feature map (the discard methods)
    # is mirrored. One key, so that no method flips while the one it is compared with does not.
    flip_p: Unit = 0.0
    eval_batch_size: PosInt = 500
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_checkpointing: NonNegInt = 0  # 0: off; k: recompute every k trainable blocks
    micro_batch: PosInt | None = None
    clip_grad_norm: PosFloat | None = None
    # Discard methods: after each freeze point's training, re-estimate the suffix's BatchNorm
    # statistics (one pass, no gradient) on the clean cached features ("cache") or on the raw
    # training images through the frozen prefix ("images"): training built them from
    # augmented, quantised features, the test sees features of raw images. Chosen on validation.
    bn_recalibrate: Literal["off", "cache", "images"] = "off"

    SUFFIX_ONLY: ClassVar[frozenset[str]] = frozenset({"bn_recalibrate"})  # not for raw images


class Runtime(Section):
    """Where it runs; results are the same for any thread count."""

    device: str = "auto"
    threads: PosInt | None = None


class FreezePoint(Section):
    """A freeze point: its block and epoch, either of which the first point may leave to the
    training (``auto``: :mod:`freezecache.training.decide`). Points chain by their order: point
    ``i``
    continues from the run before it (the shared prefix run for the first)."""

    block: PosInt | Literal["auto"]
    epoch: PosInt | Literal["auto"]
    _i: int = PrivateAttr(0)  # its place in freeze.points (0-based), set by Freeze

    @property
    def i(self) -> int:
        return self._i

    @property
    def auto(self) -> bool:
        return AUTO in (self.block, self.epoch)

    @property
    def name(self) -> str:
        """Its folder in a method's runs and caches (and DVC's name for its stages' item)."""
        return f"p{self._i}"

    @property
    def prev(self) -> str:
        """The run it continues from, relative to the method's folder."""
        return FIRST_AFTER if self._i == 0 else f"p{self._i - 1}"


class Pretrain(Section):
    """Pre-training on another dataset or class split (Split Fashion-MNIST, CIFAR-100)."""

    data: Data
    epochs: PosInt
    lr: PosFloat = 0.1


class Criterion(Section):
    """How the full-model run decides an ``auto`` freeze point (:mod:`freezecache.training.decide`).

    Every ``interval`` training steps each block's statistic is measured; a block is ready when
    it stays below ``threshold`` for ``patience`` measurements in a row, and the front blocks
    that are all ready may freeze. Rules: ``grad_change`` (AutoFreeze, Liu et al. 2021: the
    relative change of a block's mean gradient norm between measurements), ``weight_change``
    (SlimFit-like: how far a block's weights moved per step, relative to their norm),
    ``output_change`` (one minus the cosine similarity of a block's output on a fixed probe
    batch between measurements). The run freezes by ``epoch_max`` at the latest (null: half of
    ``train.epochs``; :attr:`Config.criterion`), at a block no shallower than ``min_block``."""

    rule: Literal["grad_change", "weight_change", "output_change"] = "grad_change"
    threshold: PosFloat = 0.1
    interval: PosInt = 20
    patience: PosInt = 2
    epoch_max: PosInt | None = None
    min_block: PosInt = 1


class Freeze(Section):
    # A list of {block, epoch} or "auto" (one point, both decided); blocks count the model's
    # natural blocks. Only the first point may hold "auto".
    points: list[FreezePoint] = Field(default_factory=lambda: [FreezePoint(block=3, epoch=1)])
    criterion: Criterion = Field(default_factory=Criterion)

    @field_validator("points", mode="before")
    @classmethod
    def _auto(cls, value):
        return [{"block": AUTO, "epoch": AUTO}] if value == AUTO else value

    def model_post_init(self, context: Any) -> None:
        for i, p in enumerate(self.points):
            p._i = i


class Rank(Section):
    samples: PosInt = 1024
    batch_size: PosInt = 256
    gamma: Unit = 0.25  # fraction of flip-sensitive channels stored (CNN)
    alpha: Unit = 0.1  # fraction of least-similar augmented tokens stored (ViT)


class Cache(Section):
    codec: Literal[CODECS] = "quant"  # type: ignore[valid-type]
    tolerance: PosFloat | list[PosFloat] = 0.1
    # quant: the tolerance as a fraction of each channel's std at build time (one setting
    # carries over between depths and models); the absolute bound per channel is recorded.
    relative: bool = False
    coding: Literal[CODINGS] = "zstd"  # type: ignore[valid-type]  # quant's lossless stage
    chunk_size: PosInt = 1
    encode_workers: PosInt = 2

    def tolerance_at(self, point: int) -> float:
        """Tolerance of freeze point `point` (1-based): one number for all, or one per point."""
        tol = self.tolerance
        return tol[point - 1] if isinstance(tol, list) else tol


class Loader(Section):
    """How training reads a cache (does not change what it reads)."""

    workers: NonNegInt = 0
    device_decode: bool = True
    # Hold the cache in host memory: "codes" (unpacked once: an epoch decompresses nothing),
    # true (the compressed blobs), false, or "auto" (the codes if they fit in a quarter of the
    # free memory, else the compressed blobs if those fit).
    in_memory: bool | Literal["auto", "codes"] = "auto"


class Augment(Section):
    """How the discard methods augment cached features (flips: ``train.flip_p``)."""

    crop_pad: NonNegInt = 2  # in input pixels; scaled to each feature map's resolution
    noise_std: Annotated[float, Field(ge=0.0)] = 0.05  # relative to the batch's feature std
    blur_p: Unit = 0.0
    blur_sigma: PosFloat = 0.5


class Distributed(Section):
    """torchrun data parallelism: processes per node and nodes; one process runs as before."""

    nproc_per_node: PosInt = 1
    nnodes: PosInt = 1
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on CUDA, gloo on CPU
    sync_batchnorm: bool = False

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


class Config(Section):
    paths: Paths = Field(default_factory=Paths)
    seeds: Annotated[list[NonNegInt], Field(min_length=1)] = Field(
        default_factory=lambda: [0, 1, 2]
    )
    methods: Methods = Field(default_factory=Methods)
    data: Data = Field(default_factory=Data)
    pretrain: Pretrain | None = None
    model: Model = Field(default_factory=Model)
    train: Train = Field(default_factory=Train)
    runtime: Runtime = Field(default_factory=Runtime)
    freeze: Freeze = Field(default_factory=Freeze)
    rank: Rank = Field(default_factory=Rank)
    cache: Cache = Field(default_factory=Cache)
    loader: Loader = Field(default_factory=Loader)
    augment: Augment = Field(default_factory=Augment)
    distributed: Distributed = Field(default_factory=Distributed)

    @property
    def points(self) -> list[FreezePoint]:
        return self.freeze.points

    def point(self, i: int) -> FreezePoint:
        """Freeze point ``i`` (0-based, the ``--point`` of the stages)."""
        if not 0 <= i < len(self.points):
            raise FreezecacheError(
                f"--point {i}: params.yaml has {len(self.points)} freeze points (0.."
                f"{len(self.points) - 1}) — run `freezecache pipeline` after changing their number"
            )
        return self.points[i]

    def point_epochs(self, i: int) -> tuple[int, int]:
        """Epochs [start, end) that freeze point ``i`` (0-based) trains: the one place that says
        how long each freezing state lasts (the points must be decided: not ``auto``)."""
        pts = self.points
        end = pts[i + 1].epoch if i + 1 < len(pts) else self.train.epochs
        return pts[i].epoch, end

    @property
    def prefix_epochs(self) -> int:
        """Epochs of full-model training shared by every method (up to the first point)."""
        return self.points[0].epoch if self.points else self.train.epochs

    @property
    def criterion(self) -> Criterion:
        """``freeze.criterion`` with its ``epoch_max`` filled in (null: half the epochs)."""
        crit = self.freeze.criterion
        if crit.epoch_max is not None:
            return crit
        return crit.model_copy(update={"epoch_max": max(1, self.train.epochs // 2)})

    @property
    def auto(self) -> bool:
        """Whether the first freeze point is decided by training (``auto``)."""
        return bool(self.points) and self.points[0].auto

    def stores_flips(self, name: str) -> bool:
        """Whether method ``name`` ranks and stores flipped views (channels or tokens) at its
        freeze points: it repairs flips (Discard & Aug.) and its feature augmentation flips at
        all (``train.flip_p`` > 0). A stored view is read only for a flipped sample, so with
        nothing flipped the method ranks nothing, runs no flipped pass and stores nothing: its
        cache holds what Discard's does and it trains as Discard does."""
        return method(name).needs_ranking and self.train.flip_p > 0


def parse_config(raw: object, source: str = "params.yaml", repo: Path | None = None) -> Config:
    """Validates a params mapping; raises FreezecacheError listing every problem, one per line.

    ``repo``: the repository the params belong to; its paths must then lie inside it."""
    if not isinstance(raw, dict):
        raise FreezecacheError(
            f"{source}: expected a mapping of sections, got {type(raw).__name__}"
        )
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as err:
        from freezecache.config.checks import format_pydantic

        raise FreezecacheError("\n".join(format_pydantic(err, source))) from None
    from freezecache.config.checks import semantic_problems

    problems = semantic_problems(cfg, source, repo)
    if problems:
        raise FreezecacheError("\n".join(problems))
    return cfg


def load_config(path: str | Path = "params.yaml") -> Config:
    """Reads and validates a params file."""
    path = Path(path)
    if not path.is_file():
        raise FreezecacheError(
            f"{path}: no such params file — run from the project root or pass --params"
        )
    raw = load_yaml(path)  # as DVC reads it (YAML 1.2), duplicate keys refused
    if raw == {}:
        raise FreezecacheError(f"{path}: empty — copy a profile (`freezecache profile default`)")
    return parse_config(raw, str(path), repo=path.resolve().parent)


def dump_config(cfg: Config) -> dict:
    """Plain mapping of a config (for profiles and hashing)."""
    return cfg.model_dump(mode="json")
