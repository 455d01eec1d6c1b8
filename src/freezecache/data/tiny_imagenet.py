"""Tiny-ImageNet-200 from tiny-imagenet-200.zip or its extracted folder; its val set is our test."""

from __future__ import annotations

import re
from pathlib import Path

from freezecache.core.errors import FreezecacheError
from freezecache.data.base import Source, find_dataset
from freezecache.data.trees import DirTree, ZipTree, text, tree_files, tree_split

TINY_IMAGENET_CLASSES = 200  # wnids in the published archive; labels follow sorted wnids


def open_tiny_imagenet(root: Path | None, download: bool) -> Source:
    """Tiny-ImageNet-200 from tiny-imagenet-200.zip or its extracted folder; test split = val."""
    if root is None:
        raise FreezecacheError(
            "data.root is not set for tiny_imagenet — set it to the folder holding "
            "tiny-imagenet-200.zip"
        )
    root = Path(root)
    found = find_dataset(root, "tiny-imagenet-200.zip", "tiny-imagenet-200", "wnids.txt")
    if found is None:
        what = "does not exist" if not root.exists() else "holds no tiny-imagenet-200.zip"
        raise FreezecacheError(
            f"{root} {what} — put tiny-imagenet-200.zip (or its extracted folder) there"
        )
    tree = ZipTree(found, "tiny-imagenet-200") if found.is_file() else DirTree(found)
    try:
        wnids = sorted(set(text(tree, "wnids.txt").split()))
        index = {w: i for i, w in enumerate(wnids)}
        names = tree.names()
        train = [n for n in names if re.fullmatch(r"train/[^/]+/images/[^/]+\.jpe?g", n, re.I)]
        train_labels = [_tiny_label(index, n.split("/")[1], tree.where(n)) for n in train]
        test, test_labels = _tiny_val(tree, index)
    except BaseException:
        tree.close()
        raise
    read = ["wnids.txt", "val/val_annotations.txt", *train, *test]
    return Source(
        train=tree_split(tree, train, train_labels),
        test=tree_split(tree, test, test_labels),
        classes=wnids,
        channels=3,
        files=tree_files(tree, found, read),
        close=tree.close,
    )


def _tiny_label(index: dict[str, int], wnid: str, where: str) -> int:
    """Label of a wnid, with a clear error when wnids.txt does not list it."""
    if wnid not in index:
        raise FreezecacheError(f"{where}: class {wnid} is not in wnids.txt — restore wnids.txt")
    return index[wnid]


def _tiny_val(tree: DirTree | ZipTree, index: dict[str, int]) -> tuple[list[str], list[int]]:
    """Validation images and labels from val/val_annotations.txt (file<TAB>wnid<TAB>bbox...)."""
    where = tree.where("val/val_annotations.txt")
    names, labels = [], []
    for n, line in enumerate(text(tree, "val/val_annotations.txt").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            raise FreezecacheError(f"{where} line {n} is not 'file<TAB>wnid...' — restore it")
        names.append(f"val/images/{parts[0]}")
        labels.append(_tiny_label(index, parts[1], where))
    return names, labels
