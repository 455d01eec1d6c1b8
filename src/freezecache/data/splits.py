"""The splits prepare will write, planned from the labels alone (no image decoded).

``plan_splits`` opens a source (an image folder is scanned: every bad file found at once), keeps
the configured classes (ids or names) and draws every split's seeded class-balanced indices:
``check`` runs it to list every problem before any stage deletes an output, ``prepare`` then
decodes what it picked. A class left with no image to train on is a problem; one missing from
the validation or test set a warning (its accuracy there is not measured).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from freezecache.core.errors import FreezecacheError
from freezecache.data.base import LazySplit, Source
from freezecache.data.classes import class_ids, class_problems, select_classes
from freezecache.data.sources import open_source
from freezecache.data.subset import stratified_indices, train_val_indices

SPLITS = ("train", "val", "test")
SPLIT_NAMES = {"train": "training", "val": "validation", "test": "test"}


def _class_ids(source: Source, classes: list[int | str] | None, where: str) -> list[int]:
    """The source class ids to keep (names looked up), checked against the classes the files
    hold."""
    if classes is None:
        return list(range(len(source.classes)))
    problems = class_problems(classes, len(source.classes), dataset=where, names=source.classes)
    if problems:
        raise FreezecacheError("; ".join(problems) + " — fix data.classes in params.yaml")
    return class_ids(classes, source.classes)


@dataclass
class SplitPlan:
    """What prepare will write, known before decoding: the opened source, the kept classes and
    each split's indices into its pool, and every problem and warning found on the way."""

    source: Source
    ids: list[int]
    pools: dict[str, LazySplit]  # split -> the pool its indices point into
    indices: dict[str, np.ndarray]  # split -> indices (val only when a validation set is made)
    problems: list[str] = field(default_factory=list)  # classes too small: always an error
    warnings: list[str] = field(default_factory=list)  # a class missing from val or test

    @property
    def classes(self) -> list[str]:
        return [self.source.classes[i] for i in self.ids]

    def counts(self) -> dict[str, list[int]]:
        """Images per kept class in each split."""
        k = len(self.ids)
        return {
            s: np.bincount(self.pools[s].labels[idx], minlength=k).tolist()
            for s, idx in self.indices.items()
        }

    @property
    def bad(self) -> list[tuple[str, str]]:
        return self.source.scan.bad if self.source.scan is not None else []


def plan_splits(
    name: str,
    root: str | Path | None,
    *,
    train_size: int | None,
    test_size: int | None,
    seed: int,
    download: bool = False,
    classes: list[int | str] | None = None,
    val_size: int | None = None,
    test_fraction: float = 0.2,
    cache_dir: Path | None = None,
) -> SplitPlan:
    """Open the source and draw every split's indices from the labels alone (no decoding): what
    ``check`` runs to list every problem before any stage deletes an output, and what
    ``prepare`` then decodes. The caller closes ``plan.source``."""
    options = (
        {"test_fraction": test_fraction, "seed": seed, "cache_dir": cache_dir}
        if name == "imagefolder"
        else {}
    )
    source = open_source(name, root, download, **options)
    try:
        try:
            ids = _class_ids(source, classes, f"{name} at {root or 'its default folder'}")
        except FreezecacheError as err:  # an unknown class: one problem among the bad files
            return SplitPlan(source, [], {}, {}, problems=[str(err)])
        pools = {"train": source.train, "test": source.test}
        if source.val is not None:
            pools["val"] = source.val
        if classes is not None:
            pools = {k: select_classes(v, ids) for k, v in pools.items()}
        if source.val is None:
            pools["val"] = pools["train"]  # carved from the training pool
        try:
            indices = _draw(pools, source.val is not None, train_size, val_size, test_size, seed)
        except FreezecacheError as err:  # sizes that do not fit: one problem among the others
            return SplitPlan(source, ids, pools, {}, problems=[str(err)])
    except BaseException:
        source.close()
        raise
    plan = SplitPlan(source, ids, pools, indices)
    _class_checks(plan)
    return plan


def _draw(
    pools: dict[str, LazySplit],
    given_val: bool,
    train_size: int | None,
    val_size: int | None,
    test_size: int | None,
    seed: int,
) -> dict[str, np.ndarray]:
    """Each split's seeded class-balanced indices into its pool, in SPLITS order."""
    if given_val:  # the dataset's own validation set, subset like the test set
        train_idx = stratified_indices(pools["train"].labels, train_size, seed)
        val_idx = stratified_indices(pools["val"].labels, val_size, [seed, 1])
    else:
        train_idx, val_idx = train_val_indices(pools["train"].labels, train_size, val_size, seed)
    indices = {"train": train_idx}
    if val_size is not None or given_val:
        indices["val"] = val_idx
    indices["test"] = stratified_indices(pools["test"].labels, test_size, seed)
    return indices


def _class_checks(plan: SplitPlan) -> None:
    """A class left without training images is a problem; one missing from val/test a warning."""
    counts = plan.counts()
    if not counts:
        return
    k = len(plan.ids)
    pool = np.bincount(plan.pools["train"].labels, minlength=k)
    carved = counts["val"] if "val" in counts and plan.pools["val"] is plan.pools["train"] else None
    for i, cls in enumerate(plan.classes):
        if counts["train"][i] > 0:
            continue
        left = pool[i] - (carved[i] if carved is not None else 0)
        if left > 0:  # a train_size subset smaller than the classes: the draw's choice
            plan.warnings.append(f"class {cls!r} has no images in the data.train_size subset")
            continue
        elsewhere = ", ".join(f"{counts[s][i]} to {SPLIT_NAMES[s]}" for s in counts if s != "train")
        plan.problems.append(
            f"class {cls!r} has {pool[i]} training-pool images and none left to train on "
            f"({elsewhere}) — add images to it, lower data.val_size or data.test_fraction, or "
            "leave it out of data.classes"
        )
        for s in ("val", "test"):
            if s in counts and counts[s][i] == 0:
                plan.warnings.append(
                    f"class {cls!r} has no {SPLIT_NAMES[s]} images: its {SPLIT_NAMES[s]} "
                    "accuracy is not measured"
                )
