"""The dataset registry: open a source by name, what it knows about its classes before reading."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from freezecache.core.errors import FreezecacheError
from freezecache.data.base import LazySplit, Source, Split
from freezecache.data.cifar import CIFAR, open_cifar
from freezecache.data.classes import class_problems
from freezecache.data.fashion_mnist import FASHION_MNIST_CLASSES, open_fashion_mnist
from freezecache.data.imagefolder import open_imagefolder
from freezecache.data.tiny_imagenet import TINY_IMAGENET_CLASSES, open_tiny_imagenet


@dataclass(frozen=True)
class _Reader:
    open: Callable[[Path | None, bool], Source]
    num_classes: int | None  # None: known only once the files are read


_READERS = {
    "fashion_mnist": _Reader(open_fashion_mnist, len(FASHION_MNIST_CLASSES)),
    "cifar10": _Reader(
        lambda root, download: open_cifar("cifar10", root, download), CIFAR["cifar10"].num_classes
    ),
    "cifar100": _Reader(
        lambda root, download: open_cifar("cifar100", root, download),
        CIFAR["cifar100"].num_classes,
    ),
    "tiny_imagenet": _Reader(open_tiny_imagenet, TINY_IMAGENET_CLASSES),
    "imagefolder": _Reader(open_imagefolder, None),
}
SOURCES = tuple(_READERS)


def _reader(name: str) -> _Reader:
    if name not in _READERS:
        raise FreezecacheError(
            f"unknown dataset {name!r} in data.name — use one of {', '.join(SOURCES)}"
        )
    return _READERS[name]


def known_num_classes(name: str) -> int | None:
    """Classes of a dataset as published, without reading files; None when only its files say."""
    return _reader(name).num_classes


def check_classes(name: str, classes: list[int] | None, *, key: str = "data.classes") -> None:
    """FreezecacheError (one line) when `classes` is not a valid subset of dataset `name`'s ids.

    Reads no files: for a dataset whose class count is known only from its files (imagefolder),
    ids beyond its classes are reported by ``prepare`` when it reads them.
    """
    problems = class_problems(classes, known_num_classes(name), key=key, dataset=name)
    if problems:
        raise FreezecacheError("; ".join(problems) + " — fix params.yaml")


def open_source(name: str, root: str | Path | None, download: bool) -> Source:
    """Open a dataset by name without decoding its images."""
    return _reader(name).open(Path(root) if root is not None else None, download)


def _decode_all(split: LazySplit, where: str) -> np.ndarray:
    """Every image of a split as one uint8 (N, C, H, W) array; they must share a size."""
    images = split.decode(np.arange(len(split.labels)))
    if isinstance(images, np.ndarray):
        return images
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise FreezecacheError(
            f"images in {where} have different sizes {sorted(shapes)[:3]}... — use prepare "
            "(it resizes each image to img_size)"
        )
    return np.stack(images)


def load_source(
    name: str, root: str | None, download: bool = False
) -> tuple[Split, Split, list[str]]:
    """Raw train/test splits at native size and channels + class names."""
    source = open_source(name, root, download)
    try:
        train = Split(_decode_all(source.train, f"{root} train"), source.train.labels)
        test = Split(_decode_all(source.test, f"{root} test"), source.test.labels)
    finally:
        source.close()
    return train, test, source.classes
