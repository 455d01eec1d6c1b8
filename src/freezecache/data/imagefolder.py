"""An image-folder tree: root/train/<class>/*.png|jpg and root/test/<class>/..."""

from __future__ import annotations

import logging
from pathlib import Path

from freezecache.core.errors import FreezecacheError
from freezecache.data.base import Source
from freezecache.data.trees import DirTree, is_grayscale, tree_files, tree_split

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def open_imagefolder(root: Path | None, download: bool) -> Source:
    """root/train/<class>/*.{png,jpg,jpeg} and root/test/<class>/...; labels follow sorted names."""
    if root is None:
        raise FreezecacheError(
            "data.root is not set for imagefolder — set it to a folder with train/ and test/"
        )
    root = Path(root)
    for part in ("train", "test"):
        if not (root / part).is_dir():
            raise FreezecacheError(
                f"{root / part} does not exist — an imagefolder root needs train/<class>/ and "
                "test/<class>/ folders of .png/.jpg images"
            )
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise FreezecacheError(
            f"{root / 'train'} has no class folders — add train/<class>/ folders"
        )
    tree = DirTree(root)
    train, train_labels = _folder_files(root, "train", classes)
    test, test_labels = _folder_files(root, "test", classes)
    # native channels: 1 only when every image is grayscale (header scan, no decoding)
    gray = all(is_grayscale(root / n) for n in train + test)
    channels = 1 if gray else 3
    return Source(
        train=tree_split(tree, train, train_labels, channels),
        test=tree_split(tree, test, test_labels, channels),
        classes=classes,
        channels=channels,
        files=tree_files(tree, root, train + test),
    )


def _folder_files(root: Path, part: str, classes: list[str]) -> tuple[list[str], list[int]]:
    """Relative image names and labels of root/part/<class>/."""
    names, labels = [], []
    for folder in sorted(p for p in (root / part).iterdir() if p.is_dir()):
        if folder.name not in classes:
            raise FreezecacheError(
                f"{folder} is a class that train/ does not have — add train/{folder.name}/ or "
                "remove it"
            )
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            log.warning("%s holds no .png/.jpg images", folder)
        names += [p.relative_to(root).as_posix() for p in files]
        labels += [classes.index(folder.name)] * len(files)
    if not names:
        raise FreezecacheError(f"{root / part} holds no .png/.jpg images — add some")
    return names, labels
