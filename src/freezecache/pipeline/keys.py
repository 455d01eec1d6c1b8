"""Resume keys: which checkpoint or cache spool a stage may go on from.

A stage item's key is what DVC reruns it on, read from its declaration
(:data:`freezecache.pipeline.STAGES`): the values of its params keys and the contents of its
data deps. It has two halves, so that `freezecache gc` can tell work left by other params from
work that waits for inputs not built yet: ``<params digest><inputs digest>``, 16 hex digits
each. A stage resumes only what carries its current key, so an edited param or a rebuilt
input never resumes a stale run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from freezecache.config import dump_config
from freezecache.core.io import file_digest
from freezecache.pipeline import STAGES, fill

HALF = 16  # hex digits of each half


def path_digest(path: Path) -> str | None:
    """sha256 of a file, or of a folder's files (names and contents); None when absent."""
    path = Path(path)
    if path.is_file():
        return file_digest(path)
    if not path.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\0{file_digest(f)}\n".encode())
    return h.hexdigest()


def params_key(params, stage: str) -> str:
    """The params half: the values of the stage's declared params keys under ``params``."""
    config = dump_config(params)
    picked = {key: _pick(config, key) for key in STAGES[stage].dvc_params}
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:HALF]


def inputs_key(params, stage: str, item: dict) -> tuple[str, bool]:
    """The inputs half (the contents of the item's declared data deps) and whether every one
    of them exists (a missing dep counts as absent)."""
    h, complete = hashlib.sha256(), True
    for template in STAGES[stage].deps:
        digest = path_digest(fill(template, params, **item))
        complete &= digest is not None
        h.update(f"{template}\0{digest or 'absent'}\n".encode())
    return h.hexdigest()[:HALF], complete


def run_key(params, stage: str, item: dict) -> str:
    """The key of matrix item ``item`` of ``stage`` under ``params`` (params.yaml's config)."""
    return params_key(params, stage) + inputs_key(params, stage, item)[0]


def _pick(config: dict, dotted: str):
    value = config
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value
