"""Tests for freezecache.data.subset: seeded class-balanced subsets and validation sets."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from freezecache.core.errors import FreezecacheError
from freezecache.data import Split, stratified_subset
from freezecache.data.subset import stratified_indices, train_val_indices


def labelled(counts: list[int]) -> Split:
    """A split whose image i holds the value i (to tell samples apart)."""
    labels = np.repeat(np.arange(len(counts)), counts)
    images = np.arange(len(labels), dtype=np.uint8).reshape(-1, 1, 1, 1)
    return Split(images, labels.astype(np.int64))


def test_stratified_subset_balanced_and_seeded() -> None:
    split = labelled([30, 30, 30, 30, 30])
    sub = stratified_subset(split, 23, seed=3)
    counts = np.bincount(sub.labels, minlength=5)
    assert counts.sum() == 23 and counts.max() - counts.min() <= 1
    assert len(np.unique(sub.images)) == 23  # no sample twice
    np.testing.assert_array_equal(split.labels[sub.images.ravel()], sub.labels)
    again = stratified_subset(split, 23, seed=3)
    np.testing.assert_array_equal(sub.images, again.images)
    other = stratified_subset(split, 23, seed=4)
    assert not np.array_equal(sub.images, other.images)


def test_stratified_subset_small_class_gives_rest_to_others() -> None:
    sub = stratified_subset(labelled([2, 50, 50]), 30, seed=0)
    np.testing.assert_array_equal(np.bincount(sub.labels), [2, 14, 14])


def test_stratified_subset_all_is_shuffled_and_warns(caplog) -> None:
    split = labelled([10, 10])
    full = stratified_subset(split, None, seed=1)
    assert sorted(full.images.ravel()) == list(range(20))
    assert not np.array_equal(full.images.ravel(), np.arange(20))
    with caplog.at_level(logging.WARNING, logger="freezecache.data"):
        big = stratified_subset(split, 500, seed=1)
    np.testing.assert_array_equal(big.images, full.images)
    assert "only 20 exist" in caplog.text


def test_train_val_disjoint_stratified_and_train_unchanged() -> None:
    labels = np.repeat(np.arange(4), [30, 30, 30, 12])
    train, val = train_val_indices(labels, 40, 20, seed=7)
    assert len(train) == 40 and len(val) == 20
    assert not set(train) & set(val)
    np.testing.assert_array_equal(np.bincount(labels[train]), [10, 10, 10, 10])
    # class 3 has 2 images left after training took 10: the others share its rest
    np.testing.assert_array_equal(np.bincount(labels[val]), [6, 6, 6, 2])
    # the training draw is the one made without a validation set
    np.testing.assert_array_equal(train, stratified_indices(labels, 40, seed=7))
    again = train_val_indices(labels, 40, 20, seed=7)
    np.testing.assert_array_equal(val, again[1])
    assert not np.array_equal(val, train_val_indices(labels, 40, 20, seed=8)[1])
    no_val = train_val_indices(labels, 40, None, seed=7)
    np.testing.assert_array_equal(no_val[0], train)
    assert len(no_val[1]) == 0


def test_train_val_all_training_images() -> None:
    labels = np.repeat(np.arange(3), 10)
    train, val = train_val_indices(labels, None, 6, seed=0)
    np.testing.assert_array_equal(np.bincount(labels[val]), [2, 2, 2])
    assert sorted(np.concatenate([train, val])) == list(range(30))
    assert not np.array_equal(train, np.sort(train))  # still a seeded shuffle


def test_train_val_too_large() -> None:
    labels = np.repeat(np.arange(2), 10)
    with pytest.raises(FreezecacheError, match="data.val_size 5 is more than the 4"):
        train_val_indices(labels, 16, 5, seed=0)
    with pytest.raises(FreezecacheError, match="leaves none of the 20 training images"):
        train_val_indices(labels, None, 20, seed=0)
