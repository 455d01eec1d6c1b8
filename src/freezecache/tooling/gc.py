"""`freezecache gc`: the resumable work under ``paths.checkpoints`` that no current params can
resume (epoch checkpoints and cache spools of other params, of stages params.yaml no longer
has), and temporary files of interrupted writes, listed with sizes and freed.

A stage that finishes removes its own checkpoint folder; what stays behind comes from stages
that were interrupted and then run under other params, or never run again. Each entry is named
after its resume key (:mod:`freezecache.pipeline.keys`), whose two halves say why it is stale:
other params, or other inputs. Work whose params match but whose inputs are not built yet is
kept (a rerun may rebuild the same inputs and resume it), and so is a spool a build holds.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from freezecache.core.disk import human
from freezecache.pipeline import RESUMABLE, STAGES
from freezecache.pipeline.keys import HALF, inputs_key, params_key

_NAME = re.compile(rf"^\.?(?P<key>[0-9a-f]{{{2 * HALF}}})(?P<rest>.*)$")
_TMP = re.compile(r"\.(?P<pid>\d+)\.tmp$")


@dataclass(frozen=True)
class Entry:
    """One checkpoint file, spool folder or temporary file, and what to do with it."""

    path: Path
    size: int
    why: str
    stale: bool


def scan(cfg) -> list[Entry]:
    """Every entry under ``cfg.paths.checkpoints``, stale or kept, in path order, then the
    temporary files interrupted atomic writes left among the outputs."""
    return _checkpoints(cfg) + _stray_temps(cfg)


def _stray_temps(cfg) -> list[Entry]:
    """``.<name>.<pid>.tmp`` files (:func:`freezecache.core.io.atomic_write_bytes`) of processes
    that are gone, in the output folders: a killed write leaves one, and in ``runs/`` it would
    count as a change of the report's inputs."""
    p = cfg.paths
    found = []
    for folder in sorted({Path(p.runs), Path(p.results), Path(p.cache), Path(p.data).parent}):
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob(".*.tmp")):
            tmp = _TMP.search(path.name)
            if path.is_file() and tmp is not None and not _alive(int(tmp["pid"])):
                found.append(Entry(path, _size(path), "left by an interrupted write", True))
    return found


def _checkpoints(cfg) -> list[Entry]:
    root = Path(cfg.paths.checkpoints)
    if not root.is_dir():
        return []
    current = {
        STAGES[name].item_name(item): (name, item)
        for name in RESUMABLE
        for item in STAGES[name].items(cfg)
    }
    entries = []
    for folder in sorted(root.iterdir()):
        if not folder.is_dir():
            entries.append(Entry(folder, _size(folder), "not a stage's folder", True))
            continue
        have = None
        if folder.name in current:
            stage, item = current[folder.name]
            have = (params_key(cfg, stage), *inputs_key(cfg, stage, item))
        entries += [_judge(path, have) for path in sorted(folder.iterdir())]
    return entries


def _judge(path: Path, have: tuple[str, str, bool] | None) -> Entry:
    """Stale or kept, and why, for one entry of a stage's folder (``have``: the stage's current
    params half, inputs half and whether all its inputs exist; None: not a current stage)."""
    size = _size(path)
    name = _NAME.match(path.name)
    tmp = _TMP.search(path.name)
    if _locked(path):
        return Entry(path, size, "in use by a cache build", False)
    if tmp is not None and not _alive(int(tmp["pid"])):
        return Entry(path, size, "left by an interrupted write", True)
    if have is None:
        return Entry(path, size, "no stage of params.yaml", True)
    if name is None:
        return Entry(path, size, "not a key of this version", True)
    params, inputs, complete = have
    key = name["key"]
    if key[:HALF] != params:
        return Entry(path, size, "earlier params", True)
    if key[HALF:] == inputs:
        return Entry(path, size, "resumable", False)
    if not complete:
        return Entry(path, size, "inputs not built yet: may resume", False)
    return Entry(path, size, "earlier inputs", True)


def free(entries: list[Entry]) -> None:
    """Removes the stale entries, then stage folders left empty."""
    for e in entries:
        if e.stale:
            if e.path.is_dir():
                shutil.rmtree(e.path, ignore_errors=True)
            else:
                e.path.unlink(missing_ok=True)
    for folder in {e.path.parent for e in entries if e.stale}:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def render(entries: list[Entry], dry_run: bool) -> str:
    """The listing: one line per entry (size, path, why), then the totals."""
    lines = [
        f"{human(e.size):>10}  {'stale' if e.stale else 'kept '}  {e.path}  ({e.why})"
        for e in entries
    ]
    stale = [e for e in entries if e.stale]
    kept = [e for e in entries if not e.stale]
    verb = "would free" if dry_run else "freed"
    lines.append(
        f"{verb} {human(sum(e.size for e in stale))} in {_count(stale)}; kept "
        f"{human(sum(e.size for e in kept))} in {_count(kept)}"
    )
    return "\n".join(lines)


def _count(entries: list[Entry]) -> str:
    return f"{len(entries)} {'entry' if len(entries) == 1 else 'entries'}"


def _size(path: Path) -> int:
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as err:
        return err.errno == errno.EPERM
    return True


def _locked(path: Path) -> bool:
    """Whether a cache build holds the spool at ``path`` (its flock'ed lock file)."""
    lock = path / "lock"
    if not lock.is_file():
        return False
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
