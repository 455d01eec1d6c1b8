"""What every dataset reader returns: splits whose labels are known and pixels come on demand."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from freezecache.core.errors import FreezecacheError

if TYPE_CHECKING:
    from PIL.Image import Image

    from freezecache.data.scan import Scan


@dataclass
class Split:
    """One split of a dataset held in memory."""

    images: np.ndarray  # uint8 (N, C, H, W)
    labels: np.ndarray  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class LazySplit:
    """A split whose labels are known and whose images are decoded on request."""

    labels: np.ndarray  # int64 (N,)
    # indices -> uint8 (n, C, H, W) array, or Pillow images one at a time (files of any size,
    # decoded as they are asked for: a chunk of large photos never sits in memory at once)
    decode: Callable[[np.ndarray], np.ndarray | Iterator[Image]]


@dataclass
class Source:
    """A dataset opened for reading: its splits, class names, native channels, files read."""

    train: LazySplit
    test: LazySplit
    classes: list[str]
    channels: int
    files: list[tuple[str, Path]]  # (name recorded in the fingerprint, path)
    close: Callable[[], None] = field(default=lambda: None)
    val: LazySplit | None = None  # a validation split the dataset gives (else carved from train)
    scan: Scan | None = None  # an image folder's scan: its bad and ignored files


def array_split(images: np.ndarray, labels: np.ndarray) -> LazySplit:
    """Wrap images already in memory."""
    return LazySplit(labels=labels.astype(np.int64), decode=lambda idx: images[idx])


def check_labels(labels: np.ndarray, num_classes: int, where: Path | str) -> None:
    """Every label must index a class."""
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise FreezecacheError(
            f"{where}: labels span {labels.min()}..{labels.max()} but there are {num_classes} "
            "classes — the file is corrupt or belongs to another dataset"
        )


def find_dataset(root: Path, archive: str, folder: str, marker: str) -> Path | None:
    """The archive (preferred: it is what a fingerprint should name) or the extracted folder."""
    if root.is_file():
        return root
    if (root / archive).is_file():
        return root / archive
    if (root / folder / marker).exists():
        return root / folder
    if (root / marker).exists():
        return root
    return None
