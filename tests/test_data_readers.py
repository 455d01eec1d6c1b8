"""Tests for the dataset readers of freezecache.data: tiny datasets in their real formats."""

from __future__ import annotations

import gzip
import pickle
import tarfile
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import needs_fashion
from fake_datasets import (
    COLOURS,
    jpeg,
    make_cifar10,
    make_cifar100,
    make_fashion,
    make_imagefolder,
    make_tiny_imagenet,
)
from freezecache import data
from freezecache.core.errors import FreezecacheError
from freezecache.data import load_prepared, load_source, prepare


def test_fashion_mnist_reads_idx(tmp_path: Path) -> None:
    root = make_fashion(tmp_path / "fm")
    train, test, classes = load_source("fashion_mnist", str(root))
    assert train.images.shape == (40, 1, 28, 28) and train.images.dtype == np.uint8
    assert test.images.shape == (20, 1, 28, 28)
    assert train.labels.dtype == np.int64
    np.testing.assert_array_equal(train.labels, np.arange(40) % 10)
    np.testing.assert_array_equal(train.images[:, 0, 14, 14], train.labels * 10 + 5)
    assert classes[0] == "T-shirt/top" and len(classes) == 10


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda raw: b"\x08\x03" + raw[2:], "not an IDX file"),
        (lambda raw: raw[:-5], "truncated or corrupt"),
    ],
)
def test_fashion_mnist_bad_idx(tmp_path: Path, corrupt, message: str) -> None:
    root = make_fashion(tmp_path / "fm")
    path = root / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(corrupt(raw)))
    with pytest.raises(FreezecacheError, match=message) as err:
        load_source("fashion_mnist", str(root))
    assert str(path) in str(err.value)


def test_fashion_mnist_truncated_gzip(tmp_path: Path) -> None:
    root = make_fashion(tmp_path / "fm")
    path = root / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(FreezecacheError, match="gzip") as err:
        load_source("fashion_mnist", str(root))
    assert str(path) in str(err.value)


def test_fashion_mnist_missing_root_and_file(tmp_path: Path) -> None:
    with pytest.raises(FreezecacheError, match="apt-get install dataset-fashion-mnist") as err:
        load_source("fashion_mnist", str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in str(err.value)
    root = make_fashion(tmp_path / "fm")
    (root / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(FreezecacheError, match="is missing") as err:
        load_source("fashion_mnist", str(root))
    assert str(root / "t10k-images-idx3-ubyte.gz") in str(err.value)


def test_cifar10_tarball_dir_and_extracted(tmp_path: Path) -> None:
    tarball, batches = make_cifar10(tmp_path / "c10")
    with tarfile.open(tarball) as tar:
        tar.extractall(tmp_path / "extracted", filter="data")
    extracted = tmp_path / "extracted" / "cifar-10-batches-py"
    for root in (tarball, tarball.parent, extracted, extracted.parent):
        train, test, classes = load_source("cifar10", str(root))
        assert train.images.shape == (24, 3, 32, 32) and test.images.shape == (10, 3, 32, 32)
        assert classes == data.CIFAR10_CLASSES
        expected = np.concatenate(
            [batches["data_batch_1"][b"data"], batches["data_batch_2"][b"data"]]
        )
        # CIFAR rows are 1024 R then 1024 G then 1024 B values, row-major
        np.testing.assert_array_equal(train.images.reshape(24, -1), expected)
        np.testing.assert_array_equal(train.images[0, 1, 0, :4], expected[0, 1024:1028])
        np.testing.assert_array_equal(test.labels, batches["test_batch"][b"labels"])


def test_cifar100_fine_labels(tmp_path: Path) -> None:
    tarball = make_cifar100(tmp_path / "c100")
    train, test, classes = load_source("cifar100", str(tarball.parent))
    assert len(classes) == 100 and classes[7] == "fine7"
    assert train.images.shape == (20, 3, 32, 32) and len(test) == 10
    np.testing.assert_array_equal(train.labels, np.arange(20))


def test_cifar_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FreezecacheError, match="put cifar-10-python.tar.gz") as err:
        load_source("cifar10", str(tmp_path / "none"))
    assert str(tmp_path / "none") in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FreezecacheError, match="holds no cifar-100-python.tar.gz"):
        load_source("cifar100", str(tmp_path / "empty"))
    with pytest.raises(FreezecacheError, match="data.root is not set"):
        load_source("cifar10", None)


def test_cifar_download_failure_says_where_to_put_archive(tmp_path: Path, monkeypatch) -> None:
    import torchvision.datasets

    def offline(**kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    root = tmp_path / "dl"
    with pytest.raises(FreezecacheError, match="could not download cifar10") as err:
        load_source("cifar10", str(root), download=True)
    assert f"put cifar-10-python.tar.gz in {root}" in str(err.value)


def test_cifar_download_success_is_read(tmp_path: Path, monkeypatch) -> None:
    import torchvision.datasets

    def fake_download(root: str, train: bool, download: bool) -> None:
        make_cifar10(Path(root))

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_download)
    train, _, _ = load_source("cifar10", str(tmp_path / "dl"), download=True)
    assert len(train) == 24


def test_cifar_corrupt_archive_and_pickle(tmp_path: Path) -> None:
    tarball, _ = make_cifar10(tmp_path / "c10")
    tarball.write_bytes(tarball.read_bytes()[:300])
    with pytest.raises(FreezecacheError, match="not a complete tar.gz") as err:
        load_source("cifar10", str(tarball))
    assert str(tarball) in str(err.value)
    # a pickle that would run code is refused, not executed
    folder = tmp_path / "evil" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "test_batch").write_bytes(b"garbage")
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": Path("x")}))
    with pytest.raises(FreezecacheError, match="refusing to load global pathlib") as err:
        load_source("cifar10", str(folder))
    assert str(folder / "data_batch_1") in str(err.value)


def test_tiny_imagenet_zip_and_folder(tmp_path: Path) -> None:
    path = make_tiny_imagenet(tmp_path / "ti")
    with zipfile.ZipFile(path) as z:
        z.extractall(tmp_path / "x")
    results = [load_source("tiny_imagenet", str(r)) for r in (path, tmp_path / "x")]
    for train, test, classes in results:
        assert classes == ["n01", "n02", "n03"]
        assert train.images.shape == (12, 3, 64, 64) and test.images.shape == (6, 3, 64, 64)
        np.testing.assert_array_equal(np.bincount(train.labels), [4, 4, 4])
        np.testing.assert_array_equal(test.labels, [0, 1, 2, 0, 1, 2])
        for split in (train, test):
            for label, wnid in enumerate(classes):
                # solid colours survive JPEG within a few levels; grayscale one is grey in RGB
                rgb = split.images[split.labels == label].mean(axis=(2, 3))
                ok = np.abs(rgb - COLOURS[wnid]).max(axis=1) < 6
                grey = np.ptp(rgb, axis=1) < 2
                assert (ok | grey).all() and ok.sum() >= len(rgb) - 1
    np.testing.assert_array_equal(results[0][0].images, results[1][0].images)


def test_tiny_imagenet_corrupt_zip_and_unknown_wnid(tmp_path: Path) -> None:
    path = make_tiny_imagenet(tmp_path / "ti")
    path.write_bytes(path.read_bytes()[-200:])
    with pytest.raises(FreezecacheError, match="not a complete zip") as err:
        load_source("tiny_imagenet", str(path))
    assert str(path) in str(err.value)
    path = make_tiny_imagenet(tmp_path / "ti2")
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("tiny-imagenet-200/train/n99/images/n99_0.JPEG", jpeg((0, 0, 0)))
    with pytest.raises(FreezecacheError, match="n99 is not in wnids.txt"):
        load_source("tiny_imagenet", str(path))


def test_imagefolder_mixed_sizes(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "if", ((20, 20), (40, 30)))
    with pytest.raises(FreezecacheError, match="different sizes.*use prepare"):
        load_source("imagefolder", str(root))
    meta = prepare(
        "imagefolder", root, tmp_path / "out", img_size=32, channels=None,
        train_size=None, test_size=None, seed=0,
    )  # fmt: skip
    train, test, _ = load_prepared(tmp_path / "out")
    assert meta["classes"] == ["cat", "dog"] and meta["channels"] == 3
    assert train.images.shape == (4, 3, 32, 32) and len(test) == 4
    for split in (train, test):
        centre = split.images[:, :, 16, 16].astype(int)
        np.testing.assert_array_equal(centre[:, 0], np.where(split.labels == 0, 50, 150))


def test_imagefolder_grayscale_is_one_channel(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "if", ((16, 16),), mode="L")
    train, _, classes = load_source("imagefolder", str(root))
    assert train.images.shape == (2, 1, 16, 16) and classes == ["cat", "dog"]
    (root / "test" / "bird").mkdir()
    load_source("imagefolder", str(root))  # an empty folder is no class
    Image.new("L", (16, 16)).save(root / "test" / "bird" / "0.png")
    with pytest.raises(FreezecacheError, match="train/ does not have") as err:
        load_source("imagefolder", str(root))
    assert str(root / "test" / "bird") in str(err.value)


def test_imagefolder_bad_image_and_missing_split(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "if", ((16, 16),))
    bad = root / "train" / "cat" / "1.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(FreezecacheError, match="1 files cannot be used") as err:
        load_source("imagefolder", str(root))
    assert "train/cat/1.png: a text file, not an image (named .png)" in str(err.value)
    with pytest.raises(FreezecacheError, match="does not exist") as err:
        load_source("imagefolder", str(tmp_path / "nothing"))
    assert str(tmp_path / "nothing") in str(err.value)


def test_unknown_dataset_name() -> None:
    with pytest.raises(FreezecacheError, match="unknown dataset 'mnist'.*fashion_mnist"):
        load_source("mnist", None)


@needs_fashion
def test_real_fashion_mnist() -> None:
    train, test, classes = load_source("fashion_mnist", None)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert len(classes) == 10
    np.testing.assert_array_equal(np.bincount(train.labels), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(test.labels), [1000] * 10)
