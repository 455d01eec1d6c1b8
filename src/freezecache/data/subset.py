"""Seeded class-balanced subsets, and a validation set carved from the training pool."""

from __future__ import annotations

import logging

import numpy as np

from freezecache.core.errors import FreezecacheError
from freezecache.data.base import Split

log = logging.getLogger(__name__)
# The validation draw uses its own random stream of the same seed, so asking for a validation
# set leaves the training draw (and so train.npz) exactly what it was without one.
_VAL_STREAM = 1


def _balanced_quota(counts: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Per-class sample counts summing to size, as equal as class sizes allow (water filling)."""
    quota = np.zeros_like(counts)
    remaining = size
    while remaining > 0:
        open_classes = np.flatnonzero(counts > quota)
        share = remaining // len(open_classes)
        if share == 0:
            # fewer samples left than classes with room: a seeded draw decides who gets one more
            quota[rng.choice(open_classes, size=remaining, replace=False)] += 1
            break
        add = np.minimum(counts[open_classes] - quota[open_classes], share)
        quota[open_classes] += add
        remaining -= int(add.sum())
    return quota


def _draw(labels: np.ndarray, size: int | None, rng: np.random.Generator) -> np.ndarray:
    """Indices of a class-balanced subset drawn with rng, in shuffled order."""
    n = len(labels)
    if size is not None and size > n:
        log.warning("asked for %d samples but only %d exist; using all %d", size, n, n)
    if size is None or size >= n:
        return rng.permutation(n)
    classes, counts = np.unique(labels, return_counts=True)
    quota = _balanced_quota(counts, size, rng)
    picked = [
        rng.permutation(np.flatnonzero(labels == c))[:q]
        for c, q in zip(classes, quota, strict=True)
    ]
    return rng.permutation(np.concatenate(picked))


def stratified_indices(labels: np.ndarray, size: int | None, seed: int) -> np.ndarray:
    """Indices of a seeded class-balanced subset, in seeded-shuffled order."""
    return _draw(labels, size, np.random.default_rng(seed))


def stratified_subset(split: Split, size: int | None, seed: int) -> Split:
    """Seeded, class-balanced subset (size None or >= N -> all, still in a seeded order).

    Classes get equal shares (±1); a class with too few samples gives its rest to the others.
    """
    idx = stratified_indices(split.labels, size, seed)
    return Split(split.images[idx], split.labels[idx])


def train_val_indices(
    labels: np.ndarray, train_size: int | None, val_size: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint seeded class-balanced (train, validation) indices into one training pool.

    With train_size set, the training subset is the one drawn without a validation set and the
    validation set is drawn from the rest; with train_size None, the validation set is drawn
    first and training takes everything else. val_size None -> an empty validation set.
    """
    train_rng = np.random.default_rng(seed)
    if val_size is None:
        return _draw(labels, train_size, train_rng), np.empty(0, dtype=np.int64)
    val_rng = np.random.default_rng([seed, _VAL_STREAM])
    n = len(labels)
    if train_size is None:
        if val_size >= n:
            raise FreezecacheError(
                f"data.val_size {val_size} leaves none of the {n} training images to train on "
                "— lower data.val_size"
            )
        val = _draw(labels, val_size, val_rng)
        rest = np.setdiff1d(np.arange(n), val)
        return rest[train_rng.permutation(len(rest))], val
    train = _draw(labels, train_size, train_rng)
    rest = np.setdiff1d(np.arange(n), train)
    if val_size > len(rest):
        raise FreezecacheError(
            f"data.val_size {val_size} is more than the {len(rest)} training images that "
            f"data.train_size {train_size} leaves out of {n} — lower one of them"
        )
    return train, rest[_draw(labels[rest], val_size, val_rng)]
