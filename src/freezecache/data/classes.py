"""Class subsets: check a list of source class ids, keep only those classes and relabel them."""

from __future__ import annotations

from collections import Counter

import numpy as np

from freezecache.data.base import LazySplit


def class_problems(
    classes: object, num_classes: int | None, *, key: str = "data.classes", dataset: str = ""
) -> list[str]:
    """What is wrong with a class-id list (empty when nothing), without reading any files.

    num_classes None: the dataset's class count is known only once it is read; ids are then
    checked only for type, sign and duplicates.
    """
    if classes is None:
        return []
    if not isinstance(classes, list | tuple) or not all(
        isinstance(c, int | np.integer) and not isinstance(c, bool) for c in classes
    ):
        return [f"{key} must be a list of integer class ids or null, got {classes!r}"]
    if not classes:
        return [f"{key} is empty — list at least one class id, or null for every class"]
    problems = []
    twice = sorted(c for c, n in Counter(int(c) for c in classes).items() if n > 1)
    if twice:
        problems.append(f"{key} lists class {', '.join(map(str, twice))} more than once")
    unknown = [int(c) for c in classes if c < 0 or (num_classes is not None and c >= num_classes)]
    if unknown:
        span = f"ids 0..{num_classes - 1}" if num_classes is not None else "non-negative ids"
        problems.append(
            f"{key} has {', '.join(map(str, unknown))}, but {dataset or 'the dataset'} has "
            f"class {span} only"
        )
    return problems


def select_classes(split: LazySplit, classes: list[int]) -> LazySplit:
    """Only the samples of `classes` (source ids), relabelled 0..k-1 in the order given."""
    ids = np.asarray(classes, dtype=np.int64)
    keep = np.flatnonzero(np.isin(split.labels, ids))
    relabel = np.full(int(max(split.labels.max(initial=0), ids.max())) + 1, -1, dtype=np.int64)
    relabel[ids] = np.arange(len(ids))
    return LazySplit(labels=relabel[split.labels[keep]], decode=lambda idx: split.decode(keep[idx]))
