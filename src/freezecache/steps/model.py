"""The model a stage trains: built from the params and the prepared data's metadata
(:func:`freezecache.config.model.build_model`, the one place that does it), its starting
weights, the hash of its frozen prefix, and what the params ask of it that only the model can
check (its depth, its constructor's arguments)."""

from __future__ import annotations

import torch
from torch import nn

from freezecache.config import Config
from freezecache.config.model import build_model
from freezecache.core.errors import FreezecacheError
from freezecache.models import BlockModel, list_models, prefix_digest, split

__all__ = ["build_model", "check_model", "check_schedule", "load_start", "prefix_hash"]


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


def check_schedule(cfg: Config, model: BlockModel) -> None:
    """Refuse freeze points past the model's last block, in one line each."""
    problems = [
        f"freeze.points.{i}.block = {p.block} is past the last block of {cfg.model.name} "
        f"({model.num_blocks} blocks)"
        for i, p in enumerate(cfg.points)
        if p.block != "auto" and p.block > model.num_blocks
    ]
    crit = cfg.criterion
    if cfg.auto and crit.min_block >= model.num_blocks:
        problems.append(
            f"freeze.criterion.min_block = {crit.min_block} leaves no block to freeze at in "
            f"{cfg.model.name} ({model.num_blocks} blocks: 1..{model.num_blocks - 1})"
        )
    if problems:
        raise FreezecacheError("\n".join(problems))


def check_model(cfg: Config, source: str = "params.yaml") -> BlockModel:
    """What only the model can tell (the check stage and ``freezecache check``; the stages that
    build the model check it too): it builds from ``model`` for ``data`` (a known name, options
    its constructor takes, patches that tile the image), and the freeze points fit its depth.
    Returns it, without weights: a registered model is built on the meta device (no memory, no
    initialisation); a timm model on the CPU, as its view checks itself against the model's own
    forward (timm's constructors also read values, which meta tensors do not have)."""
    meta = {
        "num_classes": len(cfg.data.classes) if cfg.data.classes else 10,
        "channels": cfg.data.channels or 3,
        "img_size": cfg.data.img_size,
    }
    device = "meta" if cfg.model.name in list_models() else "cpu"
    try:
        with torch.device(device):
            model = build_model(cfg.model, meta)
        check_schedule(cfg, model)
    except FreezecacheError as err:
        lines = (f"{source}: {line}" for line in str(err).splitlines())
        raise FreezecacheError("\n".join(lines)) from None
    except Exception as err:  # noqa: BLE001 (a builder's own check refused an option's value)
        why = " ".join(f"{type(err).__name__}: {err}".split())
        raise FreezecacheError(
            f"{source}: model: {cfg.model.name} cannot be built with these params ({why}) — "
            "fix model.name or model.kwargs"
        ) from None
    return model


def prefix_hash(model: nn.Module, position: int) -> str:
    """Content hash of the frozen prefix a cache was built with."""
    return prefix_digest(split(model, position)[0])
