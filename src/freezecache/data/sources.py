"""The dataset registry: open a source by name, what it knows about its classes before reading,
and which files it would read (what the pipeline fingerprints, without decoding anything)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from freezecache.core.errors import FreezecacheError
from freezecache.data.base import LazySplit, Source, Split, find_dataset
from freezecache.data.cifar import CIFAR, CIFAR10_CLASSES, open_cifar
from freezecache.data.classes import class_problems
from freezecache.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_FILES,
    FASHION_MNIST_ROOT,
    open_fashion_mnist,
)
from freezecache.data.imagefolder import open_imagefolder
from freezecache.data.images import to_mode
from freezecache.data.scan import bad_file_lines
from freezecache.data.tiny_imagenet import TINY_IMAGENET_CLASSES, open_tiny_imagenet
from freezecache.data.trees import DirTree

Files = list[tuple[str, Path]]


def _fashion_files(root: Path | None, download: bool) -> Files:
    folder = Path(root) if root else FASHION_MNIST_ROOT
    missing = [n for n in FASHION_MNIST_FILES if not (folder / n).is_file()]
    if missing:
        raise FreezecacheError(
            f"{folder / missing[0]} is missing — `apt-get install dataset-fashion-mnist` or set "
            "data.root to a folder with the four Fashion-MNIST .gz files"
        )
    return [(n, folder / n) for n in FASHION_MNIST_FILES]


def _cifar_files(name: str) -> Callable[[Path | None, bool], Files | None]:
    spec = CIFAR[name]

    def files(root: Path | None, download: bool) -> Files | None:
        found = find_dataset(Path(root), spec.archive, spec.folder, spec.test) if root else None
        if found is None:
            if download and root is not None:
                return None  # prepare downloads it
            raise FreezecacheError(
                f"{root} holds no {spec.archive} — put it (or its extracted {spec.folder}/) there, "
                "or set data.download: true"
            )
        if found.is_file():
            return [(found.name, found)]
        wanted = re.compile(rf"({spec.train}|{spec.test}|{re.escape(spec.meta)})")
        return [(p.name, p) for p in sorted(found.iterdir()) if wanted.fullmatch(p.name)]

    return files


def _tiny_files(root: Path | None, download: bool) -> Files:
    found = find_dataset(Path(root), "tiny-imagenet-200.zip", "tiny-imagenet-200", "wnids.txt")
    if root is None or found is None:
        raise FreezecacheError(
            f"{root} holds no tiny-imagenet-200.zip — put it (or its extracted folder) there"
        )
    if found.is_file():
        return [(found.name, found)]
    return [(n, found / n) for n in DirTree(found).names()]


@dataclass(frozen=True)
class _Reader:
    open: Callable[..., Source]
    num_classes: int | None  # None: known only once the files are read
    names: list[str] | None  # class names known without reading files
    files: Callable[[Path | None, bool], Files | None] | None  # None: the scan says (folders)


_READERS = {
    "fashion_mnist": _Reader(
        open_fashion_mnist, len(FASHION_MNIST_CLASSES), FASHION_MNIST_CLASSES, _fashion_files
    ),
    "cifar10": _Reader(
        lambda root, download: open_cifar("cifar10", root, download),
        CIFAR["cifar10"].num_classes,
        CIFAR10_CLASSES,
        _cifar_files("cifar10"),
    ),
    "cifar100": _Reader(
        lambda root, download: open_cifar("cifar100", root, download),
        CIFAR["cifar100"].num_classes,
        None,
        _cifar_files("cifar100"),
    ),
    "tiny_imagenet": _Reader(open_tiny_imagenet, TINY_IMAGENET_CLASSES, None, _tiny_files),
    "imagefolder": _Reader(open_imagefolder, None, None, None),
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


def known_class_names(name: str) -> list[str] | None:
    """Class names of a dataset as published (index = id); None when only its files say."""
    names = _reader(name).names
    return list(names) if names is not None else None


def check_classes(name: str, classes: list[int | str] | None, *, key: str = "data.classes") -> None:
    """FreezecacheError (one line) when `classes` is not a valid subset of dataset `name`'s
    classes (ids or names).

    Reads no files: for a dataset whose classes are known only from its files (imagefolder),
    ids and names beyond them are reported by ``check`` and ``prepare`` when they read them.
    """
    problems = class_problems(
        classes, known_num_classes(name), key=key, dataset=name, names=known_class_names(name)
    )
    if problems:
        raise FreezecacheError("; ".join(problems) + " — fix params.yaml")


def source_files(name: str, root: str | Path | None, download: bool) -> Files | None:
    """The files a published dataset would be read from (its archive, or the extracted files),
    found without reading them; None when data.download will fetch them first. Image folders
    are listed by their scan (:func:`freezecache.data.scan.scan_folder`) instead."""
    files = _reader(name).files
    if files is None:
        raise FreezecacheError(f"{name} is listed by its scan, not by source_files")
    return files(Path(root) if root is not None else None, download)


def open_source(name: str, root: str | Path | None, download: bool, **options) -> Source:
    """Open a dataset by name without decoding its images. ``options`` (test_fraction, seed,
    cache_dir) are an image folder's; the published datasets take none."""
    reader = _reader(name)
    root = Path(root) if root is not None else None
    return (
        reader.open(root, download, **options)
        if name == "imagefolder"
        else reader.open(root, download)
    )


def _decode_all(split: LazySplit, where: str, channels: int) -> np.ndarray:
    """Every image of a split as one uint8 (N, C, H, W) array; they must share a size."""
    decoded = split.decode(np.arange(len(split.labels)))
    if isinstance(decoded, np.ndarray):
        return decoded
    images = [np.asarray(to_mode(img, channels)) for img in decoded]
    images = [im[None] if im.ndim == 2 else im.transpose(2, 0, 1) for im in images]  # CHW
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
    if source.scan is not None and source.scan.bad:
        raise FreezecacheError("\n".join(bad_file_lines(root, source.scan.bad, "error")))
    try:
        train = Split(_decode_all(source.train, f"{root} train", source.channels),
                      source.train.labels)  # fmt: skip
        test = Split(_decode_all(source.test, f"{root} test", source.channels), source.test.labels)
    finally:
        source.close()
    return train, test, source.classes
