"""Tests for freezecache.data: tiny datasets built in their real formats in tmp_path."""

from __future__ import annotations

import gzip
import io
import json
import logging
import pickle
import tarfile
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from freezecache import data
from freezecache.data import (
    Split,
    fit_images,
    load_prepared,
    load_source,
    prepare,
    stratified_subset,
)
from freezecache.errors import FreezecacheError

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")


# --- builders of tiny datasets in their published formats ------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX gzip: 00 00 08 <ndim>, big-endian uint32 dims, uint8 data."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_fashion(root: Path, n_train: int = 40, n_test: int = 20) -> Path:
    """Fashion-MNIST-like folder: 10 classes in turn, image value = 10 * label + 5."""
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = np.repeat(labels * 10 + 5, 28 * 28).reshape(n, 28, 28)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def cifar_batch(n: int, num_classes: int, label_key: bytes, seed: int) -> tuple[bytes, dict]:
    """One pickled CIFAR batch (bytes keys, as Python 2 wrote them) and its content."""
    rng = np.random.default_rng(seed)
    batch = {
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        label_key: [int(i % num_classes) for i in range(n)],
    }
    return pickle.dumps(batch, protocol=2), batch


def add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    """Add bytes as a file member of a tar archive."""
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def make_cifar10(folder: Path) -> tuple[Path, dict]:
    """cifar-10-python.tar.gz with data_batch_1, data_batch_2 (12 each), test_batch (10), meta."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cifar-10-python.tar.gz"
    batches = {}
    with tarfile.open(path, "w:gz") as tar:
        for seed, (name, n) in enumerate(
            [("data_batch_1", 12), ("data_batch_2", 12), ("test_batch", 10)]
        ):
            raw, batches[name] = cifar_batch(n, 10, b"labels", seed)
            add_member(tar, f"cifar-10-batches-py/{name}", raw)
        names = [c.encode() for c in data.CIFAR10_CLASSES]
        add_member(
            tar,
            "cifar-10-batches-py/batches.meta",
            pickle.dumps({b"label_names": names}, protocol=2),
        )
    return path, batches


def make_cifar100(folder: Path) -> Path:
    """cifar-100-python.tar.gz with train (20), test (10), meta of 100 fine names."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cifar-100-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for seed, (name, n) in enumerate([("train", 20), ("test", 10)]):
            raw, _ = cifar_batch(n, 100, b"fine_labels", seed)
            add_member(tar, f"cifar-100-python/{name}", raw)
        fine = [f"fine{i}".encode() for i in range(100)]
        meta = {b"fine_label_names": fine, b"coarse_label_names": [b"x"] * 20}
        add_member(tar, "cifar-100-python/meta", pickle.dumps(meta, protocol=2))
    return path


WNIDS = ["n03", "n01", "n02"]  # deliberately unsorted: labels follow sorted wnids
COLOURS = {"n01": (200, 30, 30), "n02": (30, 200, 30), "n03": (30, 30, 200)}


def jpeg(colour: tuple[int, int, int], mode: str = "RGB") -> bytes:
    """A 64x64 solid-colour JPEG."""
    img = Image.new("RGB", (64, 64), colour).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def make_tiny_imagenet(folder: Path) -> Path:
    """tiny-imagenet-200.zip: 3 wnids x 4 train JPEGs (one grayscale), 6 val JPEGs."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny-imagenet-200.zip"
    top = "tiny-imagenet-200"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{top}/wnids.txt", "\n".join(WNIDS) + "\n")
        for w in WNIDS:
            z.writestr(f"{top}/train/{w}/{w}_boxes.txt", "")
            for i in range(4):
                mode = "L" if (w, i) == ("n01", 0) else "RGB"  # the real set has grayscale JPEGs
                z.writestr(f"{top}/train/{w}/images/{w}_{i}.JPEG", jpeg(COLOURS[w], mode))
        rows = []
        for i in range(6):
            w = sorted(WNIDS)[i % 3]
            z.writestr(f"{top}/val/images/val_{i}.JPEG", jpeg(COLOURS[w]))
            rows.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
        z.writestr(f"{top}/val/val_annotations.txt", "\n".join(rows) + "\n")
    return path


def make_imagefolder(root: Path, sizes: tuple[tuple[int, int], ...], mode: str = "RGB") -> Path:
    """root/{train,test}/{cat,dog}/*.png, one image per size, class value 50 or 150."""
    for part in ("train", "test"):
        for cls, value in (("cat", 50), ("dog", 150)):
            d = root / part / cls
            d.mkdir(parents=True)
            for i, (w, h) in enumerate(sizes):
                Image.new(mode, (w, h), value if mode == "L" else (value,) * 3).save(d / f"{i}.png")
    return root


# --- sources ----------------------------------------------------------------------------------


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
    with pytest.raises(FreezecacheError, match="train/ does not have") as err:
        load_source("imagefolder", str(root))
    assert str(root / "test" / "bird") in str(err.value)


def test_imagefolder_bad_image_and_missing_split(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "if", ((16, 16),))
    bad = root / "train" / "cat" / "1.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(FreezecacheError, match="not a readable image") as err:
        load_source("imagefolder", str(root))
    assert str(bad) in str(err.value)
    with pytest.raises(FreezecacheError, match="does not exist") as err:
        load_source("imagefolder", str(tmp_path / "nothing"))
    assert str(tmp_path / "nothing" / "train") in str(err.value)


def test_unknown_dataset_name() -> None:
    with pytest.raises(FreezecacheError, match="unknown dataset 'mnist'.*fashion_mnist"):
        load_source("mnist", None)


@pytest.mark.skipif(not FASHION_ROOT.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist() -> None:
    train, test, classes = load_source("fashion_mnist", None)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert len(classes) == 10
    np.testing.assert_array_equal(np.bincount(train.labels), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(test.labels), [1000] * 10)


# --- subsets and fitting ---------------------------------------------------------------------


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


def test_fit_images_pads_centred() -> None:
    images = np.random.default_rng(0).integers(1, 256, (3, 1, 28, 28), dtype=np.uint8)
    out = fit_images(images, 32, 1)
    assert out.shape == (3, 1, 32, 32) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, :, 2:30, 2:30], images)
    border = out.sum() - out[:, :, 2:30, 2:30].sum()
    assert border == 0


def test_fit_images_resizes_down_with_aspect() -> None:
    flat = np.full((2, 3, 64, 64), 77, dtype=np.uint8)
    np.testing.assert_array_equal(fit_images(flat, 32, 3), np.full((2, 3, 32, 32), 77))
    stripes = np.zeros((1, 1, 64, 64), dtype=np.uint8)
    stripes[..., ::2] = 200  # antialiasing averages 1-pixel stripes to their mean
    inner = fit_images(stripes, 16, 1)[..., 1:-1]  # edge columns see a clamped border
    assert np.abs(inner.astype(int) - 100).max() <= 1
    wide = np.full((1, 1, 20, 80), 9, dtype=np.uint8)
    out = fit_images(wide, 40, 1)
    assert (out[0, 0, 15:25] == 9).all() and (out[0, 0, :15] == 0).all()


def test_fit_images_channels() -> None:
    grey = np.arange(16, dtype=np.uint8).reshape(1, 1, 4, 4)
    rgb = fit_images(grey, 4, 3)
    assert rgb.shape == (1, 3, 4, 4) and all((rgb[:, c] == grey[:, 0]).all() for c in range(3))
    colours = np.array([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30], dtype=np.uint8)
    pixels = colours.reshape(4, 3).T.reshape(1, 3, 2, 2)  # 4 pixels (R, G, B, mixed)
    luma = fit_images(pixels, 2, 1)
    np.testing.assert_array_equal(luma.ravel(), [76, 150, 29, 18])  # 0.299, 0.587, 0.114 of 255
    with pytest.raises(FreezecacheError, match="channels 1 or 3"):
        fit_images(grey, 4, 2)


# --- prepare / load_prepared ------------------------------------------------------------------


def run_prepare(root: Path, out: Path, **kw) -> dict:
    """prepare on the tiny Fashion-MNIST with small defaults."""
    args = dict(img_size=32, channels=None, train_size=20, test_size=10, seed=0) | kw
    return prepare("fashion_mnist", root, out, **args)


def test_prepare_writes_files_and_meta(tmp_path: Path) -> None:
    root = make_fashion(tmp_path / "fm")
    out = tmp_path / "prepared" / "fm"
    meta = run_prepare(root, out, channels=3)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "test.npz", "train.npz"]
    assert json.loads((out / "meta.json").read_text()) == meta
    train, test, loaded = load_prepared(out)
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (10, 3, 32, 32)
    np.testing.assert_array_equal(np.bincount(train.labels), [2] * 10)
    assert (meta["train_size"], meta["test_size"], meta["num_classes"]) == (20, 10, 10)
    assert meta["channels"] == 3 and meta["img_size"] == 32 and meta["seed"] == 0
    # images are filled with 10*label+5 inside a 2-pixel zero border
    np.testing.assert_array_equal(train.images[:, 0, 16, 16], train.labels * 10 + 5)
    scaled = train.images / 255.0
    np.testing.assert_allclose(meta["mean"], scaled.mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(meta["std"], scaled.std(axis=(0, 2, 3)), rtol=1e-7)
    assert len(meta["source_fingerprint"]) == 64
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_prepare_seeded_and_fingerprinted(tmp_path: Path) -> None:
    root = make_fashion(tmp_path / "fm")
    a = run_prepare(root, tmp_path / "a", seed=5)
    b = run_prepare(root, tmp_path / "b", seed=5)
    c = run_prepare(root, tmp_path / "c", seed=6)
    train_a, _, _ = load_prepared(tmp_path / "a")
    train_b, _, _ = load_prepared(tmp_path / "b")
    train_c, _, _ = load_prepared(tmp_path / "c")
    np.testing.assert_array_equal(train_a.labels, train_b.labels)
    assert not np.array_equal(train_a.labels, train_c.labels)
    assert a["source_fingerprint"] == b["source_fingerprint"] == c["source_fingerprint"]
    write_idx(root / "t10k-labels-idx1-ubyte.gz", (np.arange(20) + 1) % 10)
    d = run_prepare(root, tmp_path / "a")  # replaces the existing output
    assert d["source_fingerprint"] != a["source_fingerprint"]
    assert json.loads((tmp_path / "a" / "meta.json").read_text()) == d


def test_prepare_failure_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    root = make_fashion(tmp_path / "fm")
    out = tmp_path / "prepared" / "fm"

    def broken(path: Path, meta: dict) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(data, "_write_meta", broken)
    with pytest.raises(OSError, match="disk full"):
        run_prepare(root, out)
    assert list((tmp_path / "prepared").iterdir()) == []
    (root / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FreezecacheError, match="is missing"):
        run_prepare(root, out)
    assert not out.exists()


def test_prepare_size_larger_than_available_and_bad_args(tmp_path: Path) -> None:
    root = make_fashion(tmp_path / "fm")
    meta = run_prepare(root, tmp_path / "out", train_size=1000, channels=1, img_size=20)
    assert meta["train_size"] == 40 and meta["channels"] == 1 and meta["img_size"] == 20
    with pytest.raises(FreezecacheError) as err:
        run_prepare(root, tmp_path / "x", img_size=0, channels=2, test_size=-1)
    assert all(k in str(err.value) for k in ("data.img_size", "data.channels", "data.test_size"))
    assert not (tmp_path / "x").exists()


def test_load_prepared_errors(tmp_path: Path) -> None:
    with pytest.raises(FreezecacheError, match="dvc repro prepare") as err:
        load_prepared(tmp_path / "missing")
    assert str(tmp_path / "missing" / "meta.json") in str(err.value)
    out = tmp_path / "out"
    run_prepare(make_fashion(tmp_path / "fm"), out)
    (out / "train.npz").write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(FreezecacheError, match="corrupt.*dvc repro prepare") as err:
        load_prepared(out)
    assert str(out / "train.npz") in str(err.value)
    (out / "meta.json").write_text("{not json")
    with pytest.raises(FreezecacheError, match="corrupt") as err:
        load_prepared(out)
    assert str(out / "meta.json") in str(err.value)
