"""Your own images: a folder of class folders, as one pool or already split.

Three layouts (:func:`freezecache.data.scan.scan_folder` tells them apart):

- ``root/<class>/...``: one pool, split per class into a training pool and a test set
  (``test_fraction`` of each class, seeded); the validation set is then carved from the
  training pool by ``data.val_size`` as for any dataset;
- ``root/train/<class>/...`` with ``root/test/<class>/...``: the test set as given;
- ``root/train/...`` with ``root/val/...`` (and ``root/test/...``): with test/ too, val/ is the
  validation set; without it, val/ is the test set (as for Tiny-ImageNet, whose val/ is the
  held-out set everyone reports), the validation set is carved from train/.

Class ids follow the class folders' names in sorted order (case-sensitive, as torchvision's
ImageFolder); ``data.classes`` may name them. Images may sit in subfolders of a class folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from freezecache.core.errors import FreezecacheError
from freezecache.data.base import Source
from freezecache.data.scan import Scan, scan_folder
from freezecache.data.trees import DirTree, tree_split

_TEST_STREAM = 2  # the one-folder split's own random stream of data.seed


def open_imagefolder(
    root: Path | None,
    download: bool,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    cache_dir: Path | None = None,
) -> Source:
    """An image folder in any of the three layouts, scanned once (bad files listed in
    ``Source.scan``, left out of the splits)."""
    if root is None:
        raise FreezecacheError(
            "data.root is not set for imagefolder — set it to your folder of class folders"
        )
    scan = scan_folder(Path(root), cache_dir)
    tree = DirTree(scan.root)
    parts = _parts(scan, test_fraction, seed)
    channels = 1 if scan.gray() else 3
    splits = {k: tree_split(tree, [n for n, _ in v], [y for _, y in v]) for k, v in parts.items()}
    used = sorted(n for v in parts.values() for n, _ in v)
    return Source(
        train=splits["train"],
        test=splits["test"],
        val=splits.get("val"),
        classes=scan.classes,
        channels=channels,
        files=[(n, scan.root / n) for n in used],
        scan=scan,
    )


def _parts(scan: Scan, test_fraction: float, seed: int) -> dict[str, list[tuple[str, int]]]:
    """train / test (/ val) lists of (name, label) for the folder's layout."""
    if scan.layout == "classes":
        return one_pool_split(scan.files["all"], test_fraction, seed)
    if "test" in scan.files:
        return dict(scan.files)  # train, test, and val when given
    return {"train": scan.files["train"], "test": scan.files["val"]}


def one_pool_split(
    files: list[tuple[str, int]], test_fraction: float, seed: int
) -> dict[str, list[tuple[str, int]]]:
    """Seeded per-class split of one pool: round(test_fraction x n) of each class's n images to
    the test set, at most n - 1 (a class of one image keeps it for training)."""
    if not 0.0 < test_fraction < 1.0:
        raise FreezecacheError(
            f"data.test_fraction must be between 0 and 1, got {test_fraction} — fix params.yaml"
        )
    rng = np.random.default_rng([seed, _TEST_STREAM])
    labels = np.asarray([y for _, y in files], dtype=np.int64)
    test = np.zeros(len(files), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = min(int(np.floor(test_fraction * len(members) + 0.5)), len(members) - 1)
        test[rng.permutation(members)[:k]] = True
    return {
        "train": [f for f, t in zip(files, test, strict=True) if not t],
        "test": [f for f, t in zip(files, test, strict=True) if t],
    }
