"""Whole method runs through the pipeline's own stage functions, without DVC, in scratch folders:
what the searches (recipe, schedule) train and read validation accuracy from.

A scratch config keeps the profile's data and starting weights and puts runs, caches and
checkpoints in its own folder. Runs that a variant shares with another (the prefix run up to
the first freeze point, a cache) are linked from where they were made instead of trained again.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from freezecache.config import Config, parse_config
from freezecache.core.methods import method
from freezecache.core.timing import STAGE_SECTIONS, Sections
from freezecache.pipeline import STAGES, method_runs
from freezecache.steps.baselines import baseline, train_prefix
from freezecache.steps.cache import cache_point
from freezecache.steps.suffix import train_suffix
from freezecache.training.train import RunState


def scratch(cfg: Config, folder: Path, **sections: dict) -> Config:
    """``cfg`` with its runs, caches and checkpoints under ``folder`` and ``sections`` updated
    (section -> {key: value}); validated like params.yaml."""
    raw = cfg.model_dump(mode="json")
    raw["paths"].update({k: str(folder / k) for k in ("runs", "cache", "checkpoints")})
    for name, values in sections.items():
        raw[name] = {**(raw[name] or {}), **values}
    work = parse_config(raw)
    weights = STAGES["pretrain"].path("state", cfg)
    target = STAGES["pretrain"].path("state", work)
    if weights.is_file() and not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(weights, target)
    return work


def link_outputs(src: Config, dst: Config, stage: str, seed: int, **item) -> None:
    """Make ``stage``'s outputs of ``src`` (a variant that made them) appear in ``dst``."""
    for role in STAGES[stage].outs:
        a = STAGES[stage].path(role, src, seed=seed, **item)
        b = STAGES[stage].path(role, dst, seed=seed, **item)
        if a.exists() and not b.exists():
            b.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(a.resolve(), b)


def run(cfg: Config, seed: int, name: str) -> float:
    """Method ``name`` for one seed, every stage it needs that has no output yet; its final
    validation accuracy (%) (the test set is never read for a choice)."""
    with Sections(STAGE_SECTIONS):
        for stage, item in method_runs(cfg, seed, name):
            out = stage.path("stats" if stage.name == "cache" else "state", cfg, **item)
            if out.exists():
                continue
            if stage.name == "train_prefix":
                train_prefix(cfg, seed)
            elif stage.name == "baseline":
                baseline(cfg, seed, name)
            elif stage.name == "cache":
                cache_point(cfg, seed, name, item["p"].i)
            else:
                train_suffix(cfg, seed, name, item["p"].i)
    stage, item = method_runs(cfg, seed, name)[-1]
    history = RunState.load(stage.path("state", cfg, **item)).history
    return 100.0 * history[-1]["val_acc"]


def share_caches(src: Config, dst: Config, seed: int, name: str) -> None:
    """Link ``src``'s prefix run and ``name``'s caches into ``dst`` (augmentation, BatchNorm
    and loader settings do not change them)."""
    link_outputs(src, dst, "train_prefix", seed)
    if method(name).kind == "discard":
        for p in src.points:
            link_outputs(src, dst, "cache", seed, method=name, p=p)


@contextmanager
def workdir(work: Path | None, prefix: str) -> Iterator[Path]:
    """The searches' scratch folder: ``work`` when given (kept, so a rerun resumes), else a
    temporary one removed afterwards."""
    if work is not None:
        yield work
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)
