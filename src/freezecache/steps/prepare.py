"""Stage prepare: read the dataset, take seeded stratified subsets, store uint8 under data/."""

from __future__ import annotations

import os
from pathlib import Path

from freezecache import data
from freezecache.config import Config, Data


def prepare_data(d: Data, out: Path) -> dict:
    """Prepares the data set a `data` params section describes into `out`."""
    extra = {k: getattr(d, k) for k in ("classes", "val_size") if getattr(d, k) is not None}
    return data.prepare(
        d.name,
        os.path.expanduser(d.root) if d.root else None,
        out,
        img_size=d.img_size,
        channels=d.channels,
        train_size=d.train_size,
        test_size=d.test_size,
        seed=d.seed,
        download=d.download,
        **extra,
    )


def prepare(cfg: Config) -> dict:
    from freezecache.pipeline import STAGES

    return prepare_data(cfg.data, STAGES["prepare"].path("data", cfg))
