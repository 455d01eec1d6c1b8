"""A profile turned into a scratch copy: its files in a folder of their own, so that a
measurement (`freezecache doctor`, `make bench`, the searches) runs the pipeline's own stage
functions without touching the project's runs, caches, checkpoints or results."""

from __future__ import annotations

from pathlib import Path

from freezecache.config import Config, FreezePoint

SCRATCH_PATHS = ("runs", "cache", "checkpoints", "results", "weights")


def scratch_profile(
    cfg: Config,
    folder: Path,
    *,
    own_data: bool = False,
    first_point: bool = False,
    rank_samples: int | None = None,
) -> Config:
    """``cfg`` with its outputs under ``folder`` (the prepared data too with ``own_data``), its
    first seed, one process; ``first_point``: only its first freeze point
    (:func:`first_point_only`); ``rank_samples``: rank on at most that many samples."""
    paths = {k: str(Path(folder) / k) for k in SCRATCH_PATHS}
    if own_data:
        paths["data"] = str(Path(folder) / "data")
    dist = cfg.distributed.model_copy(update={"nproc_per_node": 1, "nnodes": 1})
    out = cfg.model_copy(update={
        "paths": cfg.paths.model_copy(update=paths), "seeds": cfg.seeds[:1], "distributed": dist,
    })  # fmt: skip
    if rank_samples is not None:
        rank = cfg.rank.model_copy(update={"samples": min(cfg.rank.samples, rank_samples)})
        out = out.model_copy(update={"rank": rank})
    return first_point_only(out) if first_point else out


def first_point_only(cfg: Config) -> Config:
    """``cfg`` with its first freeze point alone; an auto point is measured at the shallowest
    block it may take, at epoch 1."""
    first = cfg.points[0]
    if first.auto:
        first = FreezePoint(block=cfg.criterion.min_block, epoch=1)
    return cfg.model_copy(update={"freeze": cfg.freeze.model_copy(update={"points": [first]})})
