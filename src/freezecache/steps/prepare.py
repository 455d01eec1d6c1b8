"""Stage prepare: read the dataset, take seeded stratified subsets, store uint8 under data/."""

from __future__ import annotations

import os
from pathlib import Path

from freezecache import data
from freezecache.config import Config, Data


def resize_options(d: Data, model_name: str) -> dict:
    """How images become img_size: data.resize with the crop fraction and interpolation of the
    model's own data config (data.crop_pct overrides the fraction)."""
    from freezecache.data.images import model_data_config

    crop_pct, interpolation = model_data_config(model_name)
    if d.crop_pct is not None:
        crop_pct = d.crop_pct
    return {"resize": d.resize, "crop_pct": crop_pct, "interpolation": interpolation}


def data_options(d: Data, cfg: Config) -> dict:
    """Everything ``data.prepare`` / ``data.plan_splits`` take from a `data` params section
    besides the output folder and the image size."""
    extra = {k: getattr(d, k) for k in ("classes", "val_size") if getattr(d, k) is not None}
    return {
        "train_size": d.train_size,
        "test_size": d.test_size,
        "seed": d.seed,
        "download": d.download,
        "test_fraction": d.test_fraction,
        "cache_dir": Path(cfg.paths.checkpoints),  # the image folder scan's memory
        **extra,
    }


def data_root(d: Data) -> str | None:
    return os.path.expanduser(d.root) if d.root else None


def prepare_data(d: Data, out: Path, cfg: Config) -> dict:
    """Prepares the data set a `data` params section describes into `out`."""
    return data.prepare(
        d.name,
        data_root(d),
        out,
        img_size=d.img_size,
        channels=d.channels,
        bad_images=d.bad_images,
        **resize_options(d, cfg.model.name),
        **data_options(d, cfg),
    )


def prepare(cfg: Config) -> dict:
    from freezecache.pipeline import STAGES

    return prepare_data(cfg.data, STAGES["prepare"].path("data", cfg), cfg)
