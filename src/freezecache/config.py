"""Typed, validated params: `params.yaml` (and every profile in `configs/`) loads into `Config`.

Every problem is reported at once, one line each, before any work starts: unknown keys, wrong
types, out-of-range values and inconsistent freeze schedules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from freezecache.errors import FreezecacheError

METHODS = ("normal", "freezeout", "discard", "discard_aug", "discard_noaug")
# Discard variants and the feature-map augmentation each one trains with (paper section 4.1).
AUGMENT_MODE = {"discard_noaug": "none", "discard": "standard", "discard_aug": "similarity"}

PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
Unit = Annotated[float, Field(ge=0.0, le=1.0)]
PosFloat = Annotated[float, Field(gt=0.0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(Section):
    data: str = "data/prepared"
    cache: str = "data/cache"
    runs: str = "runs"
    results: str = "results"
    checkpoints: str = ".ckpt"


class Data(Section):
    name: Literal["fashion_mnist", "cifar10", "cifar100", "tiny_imagenet", "imagefolder"] = (
        "fashion_mnist"
    )
    root: str | None = None
    download: bool = False
    img_size: PosInt = 28
    channels: Literal[1, 3] | None = None
    train_size: PosInt | None = None
    test_size: PosInt | None = None
    seed: NonNegInt = 0


class Model(Section):
    name: str = "resnet20"
    checkpoint: str | None = None
    kwargs: dict = Field(default_factory=dict)


class Train(Section):
    epochs: PosInt = 6
    batch_size: PosInt = 128
    lr: PosFloat = 0.1
    momentum: Unit = 0.9
    weight_decay: Annotated[float, Field(ge=0.0)] = 5e-4
    crop_pad: NonNegInt = 4
    hflip: bool = True
    eval_batch_size: PosInt = 512
    device: str = "auto"
    threads: PosInt | None = None
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_checkpointing: NonNegInt = (
        0  # 0: off; k: recompute every k trainable blocks as one segment
    )
    micro_batch: PosInt | None = None
    clip_grad_norm: PosFloat | None = None


class FreezePoint(Section):
    block: PosInt
    epoch: PosInt


class Pretrain(Section):
    """Optional pre-training stage on another dataset (the paper's CIFAR-100 -> CIFAR-10)."""

    data: Data
    epochs: PosInt
    lr: PosFloat = 0.1


class Freeze(Section):
    points: list[FreezePoint] = Field(default_factory=lambda: [FreezePoint(block=3, epoch=2)])


class Rank(Section):
    samples: PosInt = 512
    batch_size: PosInt = 128


class Cache(Section):
    codec: Literal["zfp", "quant", "none"] = "zfp"
    tolerance: PosFloat | list[PosFloat] = 1e-2
    chunk_size: PosInt = 1
    encode_workers: PosInt = 2
    loader_workers: NonNegInt = 1
    device_decode: bool = True
    in_memory: bool | Literal["auto"] = "auto"  # hold the compressed cache in host memory

    def tolerance_at(self, point: int) -> float:
        """Tolerance of freeze point `point` (1-based): one number for all, or one per point."""
        tol = self.tolerance
        return tol[point - 1] if isinstance(tol, list) else tol


class Augment(Section):
    flip_p: Unit = 0.5
    crop_pad: NonNegInt = 4  # in input pixels; scaled to each feature map's resolution
    noise_std: Annotated[float, Field(ge=0.0)] = 0.05  # relative to the batch's feature std
    blur_p: Unit = 0.0
    blur_sigma: PosFloat = 0.5
    gamma: Unit = 0.25  # fraction of flip-sensitive channels stored (CNN)
    alpha: Unit = 0.1  # fraction of least-similar augmented tokens stored (ViT)


class Config(Section):
    paths: Paths = Field(default_factory=Paths)
    seeds: Annotated[list[NonNegInt], Field(min_length=1)] = Field(default_factory=lambda: [0])
    methods: Annotated[list[Literal[METHODS]], Field(min_length=1)] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["normal", "freezeout", "discard", "discard_aug"]
    )
    data: Data = Field(default_factory=Data)
    model: Model = Field(default_factory=Model)
    train: Train = Field(default_factory=Train)
    freeze: Freeze = Field(default_factory=Freeze)
    rank: Rank = Field(default_factory=Rank)
    cache: Cache = Field(default_factory=Cache)
    augment: Augment = Field(default_factory=Augment)
    pretrain: Pretrain | None = None

    @property
    def points(self) -> list[FreezePoint]:
        return self.freeze.points

    @property
    def discard_methods(self) -> list[str]:
        return [m for m in self.methods if m in AUGMENT_MODE]


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


def _semantic_problems(cfg: Config, source: str, num_blocks: int | None) -> list[str]:
    """Checks that span several keys: the freeze schedule against epochs and the model depth."""
    problems = []
    points = cfg.freeze.points
    if not points and any(m != "normal" for m in cfg.methods):
        problems.append(f"{source}: freeze.points is empty — give at least one {{block, epoch}}")
    for i, p in enumerate(points):
        key = f"freeze.points.{i}"
        if p.epoch >= cfg.train.epochs:
            problems.append(
                f"{source}: {key}.epoch = {p.epoch} must be below train.epochs = {cfg.train.epochs}"
            )
        if num_blocks is not None and p.block > num_blocks:
            problems.append(
                f"{source}: {key}.block = {p.block} is past the last block of "
                f"{cfg.model.name} ({num_blocks} blocks)"
            )
        if i and (p.block <= points[i - 1].block or p.epoch <= points[i - 1].epoch):
            problems.append(
                f"{source}: {key} must freeze more blocks at a later epoch than the point before it"
            )
    if cfg.pretrain is not None and cfg.model.checkpoint:
        problems.append(
            f"{source}: model.checkpoint and pretrain are both set — give one source of weights"
        )
    tol = cfg.cache.tolerance
    if isinstance(tol, list) and len(tol) != len(points):
        problems.append(
            f"{source}: cache.tolerance has {len(tol)} values for {len(points)} freeze points — "
            "give one number or one per point"
        )
    if len(set(cfg.seeds)) != len(cfg.seeds):
        problems.append(f"{source}: seeds has duplicates ({cfg.seeds})")
    return problems


def _num_blocks(model: Model, data: Data) -> int | None:
    from freezecache.models import create_model

    try:
        net = create_model(
            model.name,
            num_classes=10,
            in_chans=data.channels or 3,
            img_size=data.img_size,
            **model.kwargs,
        )
    except FreezecacheError:
        raise
    except Exception:  # reported by the stage that builds it, with the full context
        return None
    return net.num_blocks


def parse_config(raw: object, source: str = "params.yaml", check_model: bool = True) -> Config:
    """Validates a params mapping; raises FreezecacheError listing every problem, one per line."""
    if not isinstance(raw, dict):
        raise FreezecacheError(
            f"{source}: expected a mapping of sections, got {type(raw).__name__}"
        )
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as err:
        raise FreezecacheError("\n".join(_format_pydantic(err, source))) from None
    problems = []
    num_blocks = None
    if check_model:
        try:
            num_blocks = _num_blocks(cfg.model, cfg.data)
        except FreezecacheError as err:
            problems.append(f"{source}: model.name: {err}")
    problems += _semantic_problems(cfg, source, num_blocks)
    if problems:
        raise FreezecacheError("\n".join(problems))
    return cfg


def load_config(path: str | Path = "params.yaml", check_model: bool = True) -> Config:
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
    return parse_config(raw, str(path), check_model=check_model)


def dump_config(cfg: Config) -> dict:
    """Plain mapping of a config (for profiles and hashing)."""
    return cfg.model_dump(mode="json")
