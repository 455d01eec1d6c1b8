"""Stage check: what params can get wrong, found before any stage runs, and what each stage
reads of the freeze schedule (a small file per reader: :func:`freezecache.pipeline.schedule_views`).
"""

from __future__ import annotations

from pathlib import Path

from freezecache.config import Config
from freezecache.core.io import atomic_write_json, atomic_write_text
from freezecache.models import BlockModel
from freezecache.pipeline import STAGES, check_rendered, schedule_views
from freezecache.steps.model import check_model


def check(
    cfg: Config, source: str = "params.yaml", dvc_yaml: Path = Path("dvc.yaml")
) -> BlockModel:
    """Refuses, in one line each, what validation alone cannot see: a number of freeze points
    dvc.yaml has no stages for, and what only the model can tell (an unknown name, a block past
    its last, options its constructor refuses; built without weights). Returns the model."""
    check_rendered(cfg, dvc_yaml)
    return check_model(cfg, source)


def write(cfg: Config) -> None:
    """The stage's outputs: each reader's view of the schedule (a view no longer read, of a
    method dropped from params, is removed: the folder persists) and ``params.ok``."""
    views = schedule_views(cfg)
    for old in STAGES["check"].path("views", cfg).glob("*.json"):
        if old not in views:
            old.unlink()
    for path, view in views.items():
        atomic_write_json(path, view)
    atomic_write_text(STAGES["check"].path("ok", cfg), "params.yaml is valid\n")
