"""Disk space: whether something fits, and recognising a full disk (no codec here: every
training stage uses it; a cache's size is :mod:`freezecache.cache.size`)."""

from __future__ import annotations

import errno
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from freezecache.core.errors import FreezecacheError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def human(n: float) -> str:
    """Bytes as a short decimal string, e.g. 1.3 GB."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (whose filesystem a new file lands on)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds (or will hold) ``path``."""
    return shutil.disk_usage(_existing(path)).free


def check_free_space(
    needs: Mapping[Path, int],
    *,
    what: str,
    margin: float = 0.2,
    advice: str = "put the cache on a larger filesystem",
) -> None:
    """Raise one line when the filesystems of ``needs`` (path -> bytes) lack room for them.

    Needs on one filesystem add up; each must fit with ``margin`` (a fraction) to spare.
    """
    per_fs: dict[int, tuple[Path, int]] = {}
    for path, need in needs.items():
        where = _existing(path)
        dev = os.stat(where).st_dev
        first, total = per_fs.get(dev, (where, 0))
        per_fs[dev] = (first, total + max(int(need), 0))
    for where, need in per_fs.values():
        wanted = math.ceil(need * (1 + margin))
        free = free_bytes(where)
        if wanted > free:
            detail = f" ({human(need)} estimated + {margin:.0%} margin)" if margin else ""
            raise FreezecacheError(
                f"{what} needs about {human(wanted)}{detail} on the filesystem of {where}, "
                f"which has {human(free)} free — free space or {advice}"
            )


def is_no_space(err: BaseException | None) -> bool:
    """Whether ``err`` (or what caused it) is a full disk or quota, from the OS, numpy or h5py.

    h5py reports HDF5 write failures as OSError or RuntimeError with the errno in the text.
    """
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, OSError) and err.errno in NO_SPACE:
            return True
        text = str(err)
        if "No space left on device" in text or "errno = 28" in text or "Disk quota" in text:
            return True
        err = err.__cause__ or err.__context__
        seen += 1
    return False


def state_bytes(model) -> int:
    """Bytes of a training checkpoint of ``model`` (an nn.Module): its parameters and buffers
    plus SGD momentum for every parameter, and 64 KB for the rest of the archive."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return 2 * params + buffers + (64 << 10)
