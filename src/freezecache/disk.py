"""Disk space: how much a cache will take, whether it fits, and recognising a full disk."""

from __future__ import annotations

import errno
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from freezecache.codec import Codec, QuantCodec
from freezecache.errors import FreezecacheError

# HDF5 object headers, attributes and the superblock of a cache file: a few KB, claimed generously
# (the writer reserves this much for HDF5, which must never meet a full disk).
H5_OVERHEAD = 1 << 20
# What they actually take in a cache file (measured 8-9 KB): for predicting a file's size.
H5_HEADERS = 16 << 10
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def human(n: float) -> str:
    """Bytes as a short decimal string, e.g. 1.3 GB."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _encoded_per_sample(
    codec: Codec, batch: np.ndarray, chunk_size: int, channels: list[int] | None = None
) -> float:
    """Mean blob bytes per sample of ``batch`` (n, ...) cut into chunks of ``chunk_size``;
    ``channels``: the indices of a channel subset (stored flipped channels), which a relative
    quant codec needs to pick their tolerances."""
    batch = np.ascontiguousarray(batch, np.float32)
    whole = len(batch) - len(batch) % chunk_size
    used = batch[:whole] if whole else batch  # a batch shorter than a chunk: one short chunk
    step = chunk_size if whole else len(batch)

    def encode(chunk: np.ndarray) -> bytes:
        if channels and isinstance(codec, QuantCodec):
            return codec.compress(codec.quantize(chunk[None], channels).payloads[0])
        return codec.encode(chunk)

    stored = sum(len(encode(used[i : i + step])) for i in range(0, len(used), step))
    return stored / len(used)


def estimate_cache_bytes(
    codec: Codec,
    sample_batch: np.ndarray,
    num_samples: int,
    extra_batch: np.ndarray | None = None,
    *,
    chunk_size: int = 1,
    pos_width: int = 0,
    extra_index: list[int] | None = None,
    overhead: int = H5_OVERHEAD,
) -> int:
    """Bytes a cache of ``num_samples`` will take, from a measured ``sample_batch`` (n, ...).

    ``sample_batch`` (and ``extra_batch``, the matching extra data) are encoded chunk by chunk
    as the cache writer would; their bytes per sample are scaled to ``num_samples``, plus the
    labels, offsets, crcs, ``pos_width`` token positions per sample and ``overhead`` for HDF5
    (the generous reserve by default; :data:`H5_HEADERS` to predict the file's size). The blob
    part is also what the build's spool holds.
    """
    if len(sample_batch) == 0:
        raise ValueError("estimate_cache_bytes: sample_batch is empty")
    per_sample = _encoded_per_sample(codec, sample_batch, chunk_size)
    blob_sets = 1
    if extra_batch is not None:
        per_sample += _encoded_per_sample(codec, extra_batch, chunk_size, extra_index)
        blob_sets = 2
    chunks = math.ceil(num_samples / chunk_size)
    index = num_samples * 8 * (1 + pos_width) + blob_sets * chunks * (8 + 4) + 8
    return math.ceil(per_sample * num_samples) + index + overhead


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
        if isinstance(err, OSError) and err.errno in _NO_SPACE:
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
