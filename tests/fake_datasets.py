"""Builders of tiny datasets in their published formats, for the freezecache.data tests."""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from freezecache.data import CIFAR10_CLASSES


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
        names = [c.encode() for c in CIFAR10_CLASSES]
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


def make_unique_fashion(root: Path, n_train: int = 60, n_test: int = 30) -> Path:
    """Like make_fashion, but pixel (0, 0) of image i holds i: every sample can be told apart."""
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = np.repeat(labels * 10 + 5, 28 * 28).reshape(n, 28, 28)
        images[:, 0, 0] = np.arange(n)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root
