"""Tests for class subsets: checking class-id lists, filtering and relabelling in prepare."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import needs_fashion
from fake_datasets import make_cifar10, make_fashion, make_imagefolder
from freezecache.core.errors import FreezecacheError
from freezecache.data import (
    FASHION_MNIST_CLASSES,
    check_classes,
    known_num_classes,
    load_prepared,
    load_source,
    load_val,
    prepare,
)


def prep(name: str, root: Path | None, out: Path, **kw) -> dict:
    """prepare at native size with every image unless told otherwise."""
    args = dict(img_size=28, channels=None, train_size=None, test_size=None, seed=0) | kw
    return prepare(name, root, out, **args)


def test_known_num_classes() -> None:
    counts = {n: known_num_classes(n) for n in ("fashion_mnist", "cifar10", "cifar100")}
    assert counts == {"fashion_mnist": 10, "cifar10": 10, "cifar100": 100}
    assert known_num_classes("tiny_imagenet") == 200
    assert known_num_classes("imagefolder") is None
    with pytest.raises(FreezecacheError, match="unknown dataset 'mnist'"):
        known_num_classes("mnist")


@pytest.mark.parametrize(
    "classes, message",
    [
        ([], "data.classes is empty"),
        ([3, 1, 3], "data.classes lists class 3 more than once"),
        ([3, 10], "data.classes has 10, but fashion_mnist has class ids 0..9 only"),
        ([-1, 2], "data.classes has -1, but fashion_mnist has class ids 0..9 only"),
        (["a"], "has 'a', which is not a class of fashion_mnist .its classes: T-shirt"),
        (["sandal"], "has 'sandal', .* .did you mean 'Sandal'"),
        ([5, "Sandal"], "lists class 5 more than once"),
        ([True], "must be a list of class ids or names"),
        (5, "must be a list of class ids or names"),
    ],
)
def test_check_classes_errors(classes, message: str) -> None:
    with pytest.raises(FreezecacheError, match=message) as err:
        check_classes("fashion_mnist", classes)
    assert "\n" not in str(err.value) and str(err.value).endswith("fix params.yaml")


def test_check_classes_valid_and_unknown_count() -> None:
    check_classes("fashion_mnist", None)
    check_classes("fashion_mnist", [9, 0])
    check_classes("imagefolder", [5])  # its class count is known only once it is read
    with pytest.raises(FreezecacheError, match="pretrain.data.classes is empty"):
        check_classes("cifar10", [], key="pretrain.data.classes")


def test_prepare_keeps_and_relabels_classes(tmp_path: Path) -> None:
    root = make_fashion(tmp_path / "fm")  # image value = 10 * source label + 5
    ids = [7, 2, 5]
    meta = prep("fashion_mnist", root, tmp_path / "out", classes=ids)
    train, test, loaded = load_prepared(tmp_path / "out")
    assert loaded == meta
    assert meta["class_ids"] == ids and meta["num_classes"] == 3
    assert meta["classes"] == ["Sneaker", "Pullover", "Sandal"]
    assert (meta["train_size"], meta["test_size"]) == (12, 6)  # 4 and 2 images per class
    for split, per_class in ((train, 4), (test, 2)):
        np.testing.assert_array_equal(np.bincount(split.labels), [per_class] * 3)
        np.testing.assert_array_equal(split.images[:, 0, 5, 5], np.take(ids, split.labels) * 10 + 5)
    scaled = train.images / 255.0
    np.testing.assert_allclose(meta["mean"], scaled.mean(axis=(0, 2, 3)), rtol=1e-9)


def test_class_subset_is_drawn_before_the_subsets(tmp_path: Path) -> None:
    root = make_fashion(tmp_path / "fm", n_train=60)
    meta = prep("fashion_mnist", root, tmp_path / "out", classes=[0, 1, 2], train_size=7,
                val_size=3, test_size=4)  # fmt: skip
    train, test, _ = load_prepared(tmp_path / "out")
    val = load_val(tmp_path / "out")
    assert (meta["train_size"], meta["val_size"], meta["test_size"]) == (7, 3, 4)
    for split in (train, val, test):
        counts = np.bincount(split.labels, minlength=3)
        assert counts.sum() == len(split) and counts.max() - counts.min() <= 1
        assert split.labels.max() <= 2


def test_every_class_in_order_is_the_default(tmp_path: Path) -> None:
    root = make_fashion(tmp_path / "fm")
    a = prep("fashion_mnist", root, tmp_path / "a", train_size=13, test_size=7)
    b = prep(
        "fashion_mnist", root, tmp_path / "b", train_size=13, test_size=7, classes=[*range(10)]
    )
    for part in ("train.npz", "test.npz"):
        assert (tmp_path / "a" / part).read_bytes() == (tmp_path / "b" / part).read_bytes()
    assert a == b


def test_bad_classes_are_reported_before_reading(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FreezecacheError, match="data.classes has 12") as err:
        prep("fashion_mnist", missing, tmp_path / "out", classes=[12])
    assert "\n" not in str(err.value)
    with pytest.raises(FreezecacheError, match="class 4 more than once"):
        prep("cifar10", missing, tmp_path / "out", classes=[4, 4])
    with pytest.raises(FreezecacheError, match="data.classes is empty"):
        prep("imagefolder", missing, tmp_path / "out", classes=[])
    assert not (tmp_path / "out").exists()


def test_imagefolder_unknown_class_at_read_time(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "if", ((16, 16), (16, 16)))  # classes cat, dog
    with pytest.raises(FreezecacheError, match="has 2, but imagefolder at .* ids 0..1") as err:
        prep("imagefolder", root, tmp_path / "out", img_size=16, classes=[1, 2])
    assert str(root) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
    meta = prep("imagefolder", root, tmp_path / "out", img_size=16, classes=[1])
    train, test, _ = load_prepared(tmp_path / "out")
    assert meta["classes"] == ["dog"] and meta["class_ids"] == [1] and meta["num_classes"] == 1
    for split in (train, test):
        assert len(split) == 2 and (split.labels == 0).all() and (split.images == 150).all()


def test_cifar_class_subset_keeps_the_images(tmp_path: Path) -> None:
    tarball, _ = make_cifar10(tmp_path / "c10")
    raw_train, _, _ = load_source("cifar10", str(tarball))
    meta = prep("cifar10", tarball, tmp_path / "out", img_size=32, classes=[9, 0])
    train, _, _ = load_prepared(tmp_path / "out")
    assert meta["classes"] == ["truck", "airplane"]
    for label, source_id in enumerate([9, 0]):
        got = sorted(im.tobytes() for im in train.images[train.labels == label])
        want = sorted(im.tobytes() for im in raw_train.images[raw_train.labels == source_id])
        assert got == want and got


@needs_fashion
def test_real_fashion_mnist_class_split(tmp_path: Path) -> None:
    ids = [5, 6, 7, 8, 9]
    meta = prep("fashion_mnist", None, tmp_path / "out", classes=ids, train_size=1000,
                val_size=500)  # fmt: skip
    train, test, _ = load_prepared(tmp_path / "out")
    val = load_val(tmp_path / "out")
    assert meta["classes"] == FASHION_MNIST_CLASSES[5:] and meta["num_classes"] == 5
    np.testing.assert_array_equal(np.bincount(train.labels), [200] * 5)
    np.testing.assert_array_equal(np.bincount(val.labels), [100] * 5)
    np.testing.assert_array_equal(np.bincount(test.labels), [1000] * 5)
    _, raw_test, _ = load_source("fashion_mnist", None)
    source_labels: dict[bytes, set[int]] = {}
    for image, label in zip(raw_test.images, raw_test.labels, strict=True):
        source_labels.setdefault(image.tobytes(), set()).add(int(label))
    for image, label in zip(test.images, test.labels, strict=True):
        assert ids[label] in source_labels[image.tobytes()]
