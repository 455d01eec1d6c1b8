"""Class subsets: check a list of classes (ids or names), keep only those and relabel them."""

from __future__ import annotations

from collections import Counter

import numpy as np

from freezecache.data.base import LazySplit


def _is_id(c: object) -> bool:
    return isinstance(c, int | np.integer) and not isinstance(c, bool)


def class_problems(
    classes: object,
    num_classes: int | None,
    *,
    key: str = "data.classes",
    dataset: str = "",
    names: list[str] | None = None,
) -> list[str]:
    """What is wrong with a class list (empty when nothing), without reading any files.

    Entries are ids (0-based, in the dataset's order) or names. ``num_classes`` / ``names``
    None: the dataset's classes are known only once it is read; entries are then checked only
    for type, sign and duplicates.
    """
    if classes is None:
        return []
    if not isinstance(classes, list | tuple) or not all(
        _is_id(c) or (isinstance(c, str) and c) for c in classes
    ):
        return [f"{key} must be a list of class ids or names, or null, got {classes!r}"]
    if not classes:
        return [f"{key} is empty — list at least one class, or null for every class"]
    problems = []
    unknown_names = []
    ids: list[int] = []
    for c in classes:
        if _is_id(c):
            ids.append(int(c))
        elif names is not None:
            if c in names:
                ids.append(names.index(c))
            else:
                unknown_names.append(c)
    twice = sorted(c for c, n in Counter(ids).items() if n > 1)
    if twice:
        problems.append(f"{key} lists class {', '.join(map(str, twice))} more than once")
    unknown = [c for c in ids if c < 0 or (num_classes is not None and c >= num_classes)]
    if unknown:
        span = f"ids 0..{num_classes - 1}" if num_classes is not None else "non-negative ids"
        problems.append(
            f"{key} has {', '.join(map(str, unknown))}, but {dataset or 'the dataset'} has "
            f"class {span} only"
        )
    for c in unknown_names:
        problems.append(f"{key} has {c!r}, which is not a class of {dataset or 'the dataset'}"
                        + _suggest(c, names))  # fmt: skip
    return problems


def _suggest(name: str, names: list[str]) -> str:
    """' (did you mean ...?)' for a case or spacing slip, else the first few names."""
    close = [
        n for n in names if n.casefold().replace("_", " ") == name.casefold().replace("_", " ")
    ]
    if close:
        return f" (did you mean {close[0]!r}?)"
    shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
    return f" (its classes: {shown})"


def class_ids(classes: list[int | str], names: list[str]) -> list[int]:
    """Ids of a checked class list (names looked up in ``names``)."""
    return [int(c) if _is_id(c) else names.index(c) for c in classes]


def select_classes(split: LazySplit, classes: list[int]) -> LazySplit:
    """Only the samples of `classes` (source ids), relabelled 0..k-1 in the order given."""
    ids = np.asarray(classes, dtype=np.int64)
    keep = np.flatnonzero(np.isin(split.labels, ids))
    relabel = np.full(int(max(split.labels.max(initial=0), ids.max())) + 1, -1, dtype=np.int64)
    relabel[ids] = np.arange(len(ids))
    return LazySplit(labels=relabel[split.labels[keep]], decode=lambda idx: split.decode(keep[idx]))
