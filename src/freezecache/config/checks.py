"""The checks of params that span several keys (:func:`freezecache.config.parse_config` runs
them): the freeze schedule against itself and the epochs, class splits, paths DVC can track,
model options freezecache sets itself; and pydantic's own errors as one line each."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from freezecache.config import AUTO, DERIVED_KWARGS, HUB_KWARGS, Config, Data
from freezecache.core.methods import method

FLIP_KEYS = ("train.hflip", "augment.flip_p")  # before flips were one setting


def format_pydantic(err: ValidationError, source: str) -> list[str]:
    lines, seen = [], set()
    for e in err.errors():
        # Union types (a number or a list) report once per branch: keep the first per key.
        parts = [str(p) for p in e["loc"] if isinstance(p, int) or str(p).isidentifier()]
        key = ".".join(parts) or "<root>"
        if key in seen:
            continue
        seen.add(key)
        if e["type"] == "extra_forbidden" and key.endswith(".after"):
            lines.append(
                f"{source}: {key} is no longer needed (points chain by their order) — remove it"
            )
        elif e["type"] == "extra_forbidden" and key in FLIP_KEYS:
            lines.append(
                f"{source}: {key} is now train.flip_p, one setting for raw images and cached "
                "features alike (probability of a flip; true = 0.5) — rename it"
            )
        elif e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}' — remove it or check its spelling")
        else:
            got = e.get("input")
            lines.append(f"{source}: {key}: {e['msg']} (got {got!r})")
    return lines


def _schedule_problems(cfg: Config) -> list[str]:
    """The freeze schedule against epochs and itself (against the model's depth:
    :func:`freezecache.steps.model.check_schedule`)."""
    problems = []
    points = cfg.freeze.points
    if not points and any(method(m).uses_points for m in cfg.methods.all):
        problems.append("freeze.points is empty — give at least one {block, epoch} or auto")
    for i, p in enumerate(points):
        key = f"freeze.points.{i}"
        if i and p.auto:
            problems.append(
                f"{key}: only the first point can be auto (the full-model run decides it) — "
                "give later points as {block, epoch}"
            )
            continue
        if p.epoch != AUTO and p.epoch >= cfg.train.epochs:
            problems.append(
                f"{key}.epoch = {p.epoch} must be below train.epochs = {cfg.train.epochs}"
            )
        prev = points[i - 1] if i else None
        if prev is not None and not prev.auto and (p.block <= prev.block or p.epoch <= prev.epoch):
            problems.append(
                f"{key} must freeze more blocks at a later epoch than the point before it"
            )
    crit = cfg.criterion
    if cfg.auto and crit.epoch_max >= cfg.train.epochs:
        problems.append(
            f"freeze.criterion.epoch_max = {crit.epoch_max} must be below train.epochs = "
            f"{cfg.train.epochs} (the run must have epochs left after the freeze)"
        )
    if len(points) > 1 and cfg.auto:
        later = points[1]
        if crit.epoch_max >= later.epoch or (
            points[0].block != AUTO and points[0].block >= later.block
        ):
            problems.append(
                "freeze.points.1 must come after whatever the first point decides: an epoch "
                f"above freeze.criterion.epoch_max ({crit.epoch_max}) and a deeper block"
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
    from freezecache.data.sources import known_class_names, known_num_classes

    return class_problems(
        d.classes,
        known_num_classes(d.name),
        key=f"{key}.classes",
        dataset=d.name,
        names=known_class_names(d.name),
    )


def _same_classes(d: Data) -> set:
    """A class list as ids where the dataset's names are known without its files (so an id and
    a name of one class compare equal), else as written."""
    from freezecache.data.sources import known_class_names

    names = known_class_names(d.name) or []
    return {names.index(c) if isinstance(c, str) and c in names else c for c in d.classes}


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


def semantic_problems(cfg: Config, source: str, repo: Path | None) -> list[str]:
    """Checks that span several keys, each reported as one line."""
    problems = _schedule_problems(cfg) + model_kwargs_problems(cfg.model.kwargs)
    if repo is not None:
        problems += _path_problems(cfg, repo)
    problems += _class_problems("data", cfg.data)
    if cfg.pretrain is not None:
        problems += _class_problems("pretrain.data", cfg.pretrain.data)
        src, dst = cfg.pretrain.data, cfg.data
        if src.name == dst.name and src.root == dst.root and src.classes and dst.classes:
            overlap = sorted(_same_classes(src) & _same_classes(dst), key=str)
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
