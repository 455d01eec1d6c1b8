"""Typed, validated params: `params.yaml` (and every profile in `configs/`) loads into `Config`.

Every problem is reported at once, one line each, before any work starts: unknown keys, wrong
types, out-of-range values and inconsistent freeze schedules. What needs the model (its number
of blocks, its constructor's arguments) is checked where the model is built
(:mod:`freezecache.steps.model`), so that validating params imports no model file.

Defaults are the default profile's values (configs/default.yaml; a test keeps them equal), except
``data``'s subsets, whose default None means all of them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from freezecache.codecs import CODECS, CODINGS
from freezecache.errors import FreezecacheError
from freezecache.methods import BASELINES, DISCARD, method

PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
Unit = Annotated[float, Field(ge=0.0, le=1.0)]
PosFloat = Annotated[float, Field(gt=0.0)]
FIRST_AFTER = "../prefix"  # a first point continues from the shared prefix run


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
        default_factory=lambda: ["normal", "freezeout", "normal_noflip"]
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
    classes: list[NonNegInt] | None = None  # source class ids to keep, relabelled 0..k-1
    img_size: PosInt = 28
    channels: Literal[1, 3] | None = None
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
    hflip: bool = True
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
    block: PosInt
    epoch: PosInt
    # The run this point continues from, relative to the method's folder (DVC chains the stages
    # with it): FIRST_AFTER for the first point, then b<block of the point before it>.
    after: str = FIRST_AFTER

    @property
    def name(self) -> str:
        """Its folder in a method's runs and caches."""
        return f"b{self.block}"


class Pretrain(Section):
    """Pre-training on another dataset or class split (Split Fashion-MNIST, CIFAR-100)."""

    data: Data
    epochs: PosInt
    lr: PosFloat = 0.1


class Freeze(Section):
    points: list[FreezePoint] = Field(default_factory=lambda: [FreezePoint(block=3, epoch=1)])


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
    flip_p: Unit = 0.5
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

    def point(self, block: int) -> tuple[int, FreezePoint]:
        """(1-based index, point) of the freeze point at ``block``."""
        for i, p in enumerate(self.points, start=1):
            if p.block == block:
                return i, p
        blocks = [p.block for p in self.points]
        raise FreezecacheError(f"--block {block}: params.yaml has freeze points at blocks {blocks}")

    def point_epochs(self, index: int) -> tuple[int, int]:
        """Epochs [start, end) that freeze point ``index`` (1-based) trains: the one place that
        says how long each freezing state lasts."""
        pts = self.points
        end = pts[index].epoch if index < len(pts) else self.train.epochs
        return pts[index - 1].epoch, end

    @property
    def prefix_epochs(self) -> int:
        """Epochs of full-model training shared by every method (up to the first point)."""
        return self.points[0].epoch if self.points else self.train.epochs


def _format_pydantic(err: ValidationError, source: str) -> list[str]:
    lines, seen = [], set()
    for e in err.errors():
        # Union types (a number or a list) report once per branch: keep the first per key.
        parts = [str(p) for p in e["loc"] if isinstance(p, int) or str(p).isidentifier()]
        key = ".".join(parts) or "<root>"
        if key in seen:
            continue
        seen.add(key)
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}' — remove it or check its spelling")
        else:
            got = e.get("input")
            lines.append(f"{source}: {key}: {e['msg']} (got {got!r})")
    return lines


def _schedule_problems(cfg: Config) -> list[str]:
    """The freeze schedule against epochs and the chain DVC builds from it (against the model's
    depth: :func:`freezecache.steps.model.model_problems`)."""
    problems = []
    points = cfg.freeze.points
    if not points and any(method(m).uses_points for m in cfg.methods.all):
        problems.append("freeze.points is empty — give at least one {block, epoch, after}")
    for i, p in enumerate(points):
        key = f"freeze.points.{i}"
        if p.epoch >= cfg.train.epochs:
            problems.append(
                f"{key}.epoch = {p.epoch} must be below train.epochs = {cfg.train.epochs}"
            )
        if i and (p.block <= points[i - 1].block or p.epoch <= points[i - 1].epoch):
            problems.append(
                f"{key} must freeze more blocks at a later epoch than the point before it"
            )
        want = FIRST_AFTER if i == 0 else points[i - 1].name
        if p.after != want:
            problems.append(
                f"{key}.after = {p.after!r}: write {want!r} — each point names the run it "
                "continues from (the shared prefix, then the point before it)"
            )
    c = cfg.cache
    if c.codec != "quant" and (c.relative or c.coding != "zstd"):
        problems.append(
            f"cache.relative and cache.coding apply to the quant codec, not {c.codec} — "
            "set cache.codec: quant or drop them"
        )
    tol = cfg.cache.tolerance
    if isinstance(tol, list) and len(tol) != len(points):
        problems.append(
            f"cache.tolerance has {len(tol)} values for {len(points)} freeze points — "
            "give one number or one per point"
        )
    return problems


def model_kwargs_problems(kwargs: dict[str, Any]) -> list[str]:
    """model.kwargs keys that freezecache sets itself, one line each naming where they belong
    (what only the built model can tell is checked by :func:`freezecache.steps.model.check_model`).
    """
    problems = []
    for key in kwargs:
        if key in DERIVED_KWARGS:
            where = DERIVED_KWARGS[key]
            problems.append(
                f"model.kwargs.{key}: freezecache passes {key} itself, from {where} — remove it "
                f"from model.kwargs and set {where} instead"
            )
        elif key in HUB_KWARGS:
            problems.append(
                f"model.kwargs.{key}: would have timm fetch weights, which freezecache never "
                "does — remove it and set model.checkpoint to a weights file under paths.weights"
            )
    return problems


def _class_problems(key: str, d: Data) -> list[str]:
    from freezecache.data.classes import class_problems
    from freezecache.data.sources import known_num_classes

    return class_problems(
        d.classes, known_num_classes(d.name), key=f"{key}.classes", dataset=d.name
    )


def _path_problems(cfg: Config, repo: Path) -> list[str]:
    """Paths DVC tracks must lie inside the repository (DVC 3 cannot track external outputs)."""
    problems = []
    for name, value in cfg.paths.model_dump().items():
        if name == "checkpoints":
            continue
        full = os.path.normpath(os.path.join(repo, os.path.expanduser(value)))
        if os.path.commonpath([repo, full]) != str(repo):
            problems.append(
                f"paths.{name} = {value!r} is outside the repository, where DVC cannot track "
                "outputs — use a relative path inside it (a symlinked folder works for big disks)"
            )
    ckpt = cfg.model.checkpoint
    if ckpt is not None:
        weights = os.path.normpath(cfg.paths.weights)
        if os.path.commonpath([weights, os.path.normpath(ckpt)]) != weights:
            problems.append(
                f"model.checkpoint = {ckpt!r} must be a file under paths.weights ({weights}/), "
                "where DVC tracks it — copy it there"
            )
    return problems


def _semantic_problems(cfg: Config, source: str, repo: Path | None) -> list[str]:
    """Checks that span several keys, each reported as one line."""
    problems = _schedule_problems(cfg) + model_kwargs_problems(cfg.model.kwargs)
    if repo is not None:
        problems += _path_problems(cfg, repo)
    problems += _class_problems("data", cfg.data)
    if cfg.pretrain is not None:
        problems += _class_problems("pretrain.data", cfg.pretrain.data)
        src, dst = cfg.pretrain.data, cfg.data
        if src.name == dst.name and src.root == dst.root and src.classes and dst.classes:
            overlap = sorted(set(src.classes) & set(dst.classes))
            if overlap:
                problems.append(
                    f"pretrain.data.classes and data.classes overlap ({overlap}) — pre-train and "
                    "fine-tune on disjoint class sets"
                )
    if cfg.pretrain is not None and cfg.model.checkpoint:
        problems.append("model.checkpoint and pretrain are both set — give one source of weights")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        problems.append(f"seeds has duplicates ({cfg.seeds})")
    for kind in ("baselines", "discard"):
        names = getattr(cfg.methods, kind)
        if len(set(names)) != len(names):
            problems.append(f"methods.{kind} has duplicates ({names})")
    if not cfg.methods.all:
        problems.append("methods: both lists are empty — name at least one method")
    return [f"{source}: {p}" for p in problems]


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
        raise FreezecacheError("\n".join(_format_pydantic(err, source))) from None
    problems = _semantic_problems(cfg, source, repo)
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
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise FreezecacheError(f"{path}:{where}: not valid YAML — fix the syntax") from None
    return parse_config(raw, str(path), repo=path.resolve().parent)


def dump_config(cfg: Config) -> dict:
    """Plain mapping of a config (for profiles and hashing)."""
    return cfg.model_dump(mode="json")
