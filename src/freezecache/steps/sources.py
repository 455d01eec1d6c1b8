"""What the check stage records of each dataset the params read, so that DVC sees a changed
image or archive: ``prepare`` (and ``pretrain`` for ``pretrain.data``) depend on these records.

DVC can depend only on paths written in dvc.yaml, and a dataset's files are wherever
``data.root`` says (outside the repository, the Debian package's folder for a null root), so
the check stage, which DVC runs on every ``dvc repro`` (``always_changed``), fingerprints them:
the content of every file read (sha256, remembered per file by size and modification time, so
an unchanged folder is not read again), plus for an image folder what its scan found. The
record changes only when the data does; then ``prepare`` and what follows rerun, nothing else.

For an image folder the same pass is the scan that lists every bad file and every class too
small for the splits, so a bad folder stops the run here, before any stage deletes an output.
"""

from __future__ import annotations

import logging
from pathlib import Path

from freezecache import data
from freezecache.config import Config, Data
from freezecache.core.errors import FreezecacheError
from freezecache.core.io import atomic_write_json
from freezecache.steps.prepare import data_options, data_root

log = logging.getLogger(__name__)


def source_record(d: Data, cfg: Config, key: str = "data") -> dict:
    """The fingerprint (and for an image folder the scan's findings) of one `data` section;
    FreezecacheError listing every problem when the folder cannot be prepared as configured."""
    record = {"name": d.name, "root": d.root}
    root = data_root(d)
    if d.name != "imagefolder":
        files = data.source_files(d.name, root, d.download)
        if files is None:
            return {**record, "fingerprint": None, "note": "to be downloaded by prepare"}
        return {**record, "fingerprint": data.files_fingerprint(files, Path(cfg.paths.checkpoints))}
    plan = data.plan_splits(d.name, root, **data_options(d, cfg))
    plan.source.close()
    scan = plan.source.scan
    lines = data.bad_file_lines(root, plan.bad, d.bad_images) if d.bad_images == "error" else []
    lines += plan.problems
    if lines:
        raise FreezecacheError("\n".join(f"{key}: {line}" if not line.startswith(" ") else line
                                         for line in lines))  # fmt: skip
    for line in data.bad_file_lines(root, plan.bad, d.bad_images):
        log.warning("%s", line)
    for w in plan.warnings:
        log.warning("%s: %s", key, w)
    log.info("%s", scan.summary())
    return {
        **record,
        "fingerprint": scan.fingerprint(),
        "layout": scan.layout,
        "classes": plan.classes,
        "class_counts": plan.counts(),
        "skipped": [{"file": n, "reason": why} for n, why in plan.bad],
    }


def write_sources(cfg: Config) -> dict[str, dict | None]:
    """Fingerprint every dataset the params read and write the check stage's records (the
    pretrain record says none when there is no pretrain section). Every problem of both
    datasets is reported at once."""
    from freezecache.pipeline import STAGES

    sections = {"data": cfg.data, "pretrain": cfg.pretrain.data if cfg.pretrain else None}
    records, problems = {}, []
    for key, d in sections.items():
        try:
            records[key] = (
                source_record(d, cfg, key if key == "data" else "pretrain.data") if d else None
            )
        except FreezecacheError as err:
            problems.append(str(err))
    if problems:
        raise FreezecacheError("\n".join(problems))
    for key, record in records.items():
        atomic_write_json(STAGES["check"].path(f"{key}_source", cfg), record)
    return records
