"""Datasets: read a real dataset from local files, subset it, fit it to the model, store it.

Sources are read in their published formats (IDX gzip, CIFAR python tarballs, the Tiny-ImageNet
zip, an image-folder tree). ``prepare`` picks seeded class-balanced subsets *before* decoding
images, so a small subset of a large JPEG dataset decodes only what it keeps, and writes
``train.npz`` / ``test.npz`` (uint8, N×C×H×W) plus ``meta.json`` into ``out_dir`` atomically.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import pickle
import re
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from freezecache.errors import FreezecacheError

log = logging.getLogger(__name__)

SOURCES = ("fashion_mnist", "cifar10", "cifar100", "tiny_imagenet", "imagefolder")
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, what PIL's convert("L") uses
FINGERPRINT_METHOD = "sha256 over (name, size, sha256 of content) of every source file read"
_FIT_CHUNK = 1024  # images per interpolate call: bounds the float32 copy
_DECODE_CHUNK = 1024  # image files decoded before they are fitted and released


@dataclass
class Split:
    """One split of a dataset held in memory."""

    images: np.ndarray  # uint8 (N, C, H, W)
    labels: np.ndarray  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)


# ---------------------------------------------------------------------------------------------
# Internal source representation: labels now, pixels on demand.


@dataclass
class _LazySplit:
    """A split whose labels are known and whose images are decoded on request."""

    labels: np.ndarray  # int64 (N,)
    # indices -> uint8 (n, C, H, W) array, or a list of uint8 (C, H, W) arrays of any size
    decode: Callable[[np.ndarray], np.ndarray | list[np.ndarray]]


@dataclass
class _Source:
    """A dataset opened for reading: both splits, class names, native channels, files read."""

    train: _LazySplit
    test: _LazySplit
    classes: list[str]
    channels: int
    files: list[tuple[str, Path]]  # (name recorded in the fingerprint, path)
    close: Callable[[], None] = field(default=lambda: None)


def _array_split(images: np.ndarray, labels: np.ndarray) -> _LazySplit:
    """Wrap images already in memory."""
    return _LazySplit(labels=labels.astype(np.int64), decode=lambda idx: images[idx])


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST: IDX gzip files.

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_gzip(path: Path) -> bytes:
    """Whole content of a gzip file, with a clear error when it is truncated or not gzip."""
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise
    except (OSError, EOFError, zlib.error) as exc:
        raise FreezecacheError(
            f"{path} is not a complete gzip file ({exc}) — download or reinstall it"
        ) from exc


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX(.gz) file: magic 00 00 <dtype> <ndim>, ndim big-endian uint32 dims, data."""
    raw = _read_gzip(path) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise FreezecacheError(
            f"{path} is not an IDX file (magic {raw[:4].hex() or 'missing'}) — replace it with "
            "the original download"
        )
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise FreezecacheError(f"{path}: IDX header is truncated — replace it with the original")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise FreezecacheError(
            f"{path}: IDX dims {dims} need {expected} bytes, file has {len(raw)} — the file is "
            "truncated or corrupt; replace it with the original"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _idx_pair(root: Path, prefix: str) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    """Images (N, 1, H, W) and labels (N,) of one Fashion-MNIST split."""
    paths = [root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"]
    for path in paths:
        if not path.is_file():
            raise FreezecacheError(
                f"{path} is missing — `apt-get install dataset-fashion-mnist` or set data.root "
                "to a folder with the four Fashion-MNIST .gz files"
            )
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise FreezecacheError(
            f"{paths[0]} and {paths[1]} do not pair up (shapes {images.shape}, {labels.shape}) "
            "— replace them with the original files"
        )
    return images.astype(np.uint8)[:, None], labels.astype(np.int64), paths  # (N,H,W)->(N,1,H,W)


def _open_fashion_mnist(root: Path | None, download: bool) -> _Source:
    """Fashion-MNIST from the Debian package folder (or data.root)."""
    root = Path(root or FASHION_MNIST_ROOT)
    if not root.is_dir():
        raise FreezecacheError(
            f"Fashion-MNIST folder {root} does not exist — `apt-get install dataset-fashion-mnist` "
            "or set data.root"
        )
    train_x, train_y, train_files = _idx_pair(root, "train")
    test_x, test_y, test_files = _idx_pair(root, "t10k")
    classes = list(FASHION_MNIST_CLASSES)
    _check_labels(train_y, len(classes), train_files[1])
    _check_labels(test_y, len(classes), test_files[1])
    return _Source(
        train=_array_split(train_x, train_y),
        test=_array_split(test_x, test_y),
        classes=classes,
        channels=1,
        files=[(p.name, p) for p in train_files + test_files],
    )


def _check_labels(labels: np.ndarray, num_classes: int, where: Path | str) -> None:
    """Every label must index a class."""
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise FreezecacheError(
            f"{where}: labels span {labels.min()}..{labels.max()} but there are {num_classes} "
            "classes — the file is corrupt or belongs to another dataset"
        )


# ---------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100: python-version tarballs of pickled batches.


@dataclass(frozen=True)
class _CifarSpec:
    archive: str
    folder: str
    train: str  # regex of train batch file names
    test: str
    meta: str
    label_key: bytes
    names_key: bytes
    num_classes: int


_CIFAR = {
    "cifar10": _CifarSpec(
        "cifar-10-python.tar.gz", "cifar-10-batches-py", r"data_batch_(\d+)", "test_batch",
        "batches.meta", b"labels", b"label_names", 10,
    ),
    "cifar100": _CifarSpec(
        "cifar-100-python.tar.gz", "cifar-100-python", r"(train)", "test",
        "meta", b"fine_labels", b"fine_label_names", 100,
    ),
}  # fmt: skip

# What a CIFAR pickle may reference: numpy array reconstruction and bytes. Anything else in a
# "dataset" pickle would be code execution, so it is refused.
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _DataUnpickler(pickle.Unpickler):
    """Unpickler limited to plain containers and numpy arrays."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        # numpy 2 renamed numpy.core to numpy._core; pickles written by numpy 1 use the old name
        return super().find_class(module.replace("numpy.core", "numpy._core"), name)


def _unpickle(data: bytes, where: str) -> dict:
    """Load one CIFAR pickle (written by Python 2, hence encoding='bytes')."""
    try:
        obj = _DataUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # pickle raises many types on garbage input
        raise FreezecacheError(
            f"{where} is not a readable CIFAR pickle ({exc}) — replace the archive"
        ) from exc
    if not isinstance(obj, dict):
        raise FreezecacheError(f"{where} holds a {type(obj).__name__}, not a CIFAR batch dict")
    # Python 2 pickles give bytes keys; a batch re-pickled by Python 3 has str keys
    return {k.encode() if isinstance(k, str) else k: v for k, v in obj.items()}


def _find_dataset(root: Path, archive: str, folder: str, marker: str) -> Path | None:
    """The archive (preferred: it is what a fingerprint should name) or the extracted folder."""
    if root.is_file():
        return root
    if (root / archive).is_file():
        return root / archive
    if (root / folder / marker).exists():
        return root / folder
    if (root / marker).exists():
        return root
    return None


def _read_cifar_tar(path: Path, spec: _CifarSpec) -> dict[str, bytes]:
    """Member base name -> bytes for every batch/meta file of the tarball, in one pass."""
    wanted = re.compile(rf"(?:.*/)?({spec.train}|{spec.test}|{re.escape(spec.meta)})$")
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                match = wanted.match(member.name)
                if member.isfile() and match:
                    found[match.group(1)] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise FreezecacheError(
            f"{path} is not a complete tar.gz archive ({exc}) — download {spec.archive} again"
        ) from exc
    return found


def _read_cifar_dir(folder: Path, spec: _CifarSpec) -> tuple[dict[str, bytes], list[Path]]:
    """Base name -> bytes for the batch/meta files of an extracted CIFAR folder."""
    wanted = re.compile(rf"({spec.train}|{spec.test}|{re.escape(spec.meta)})$")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and wanted.fullmatch(p.name))
    return {p.name: p.read_bytes() for p in paths}, paths


def _cifar_batches(files: dict[str, bytes], pattern: str, where: Path, spec: _CifarSpec) -> Split:
    """Concatenate the batches whose names match pattern, in numeric order."""
    names = sorted((n for n in files if re.fullmatch(pattern, n)), key=_natural_key)
    if not names:
        raise FreezecacheError(
            f"{where} has no batch file matching {pattern!r} — it is not an intact "
            f"{spec.archive}; download it again"
        )
    images, labels = [], []
    for name in names:
        batch = _unpickle(files[name], _member(where, name))
        data = np.asarray(batch.get(b"data", np.empty(0)))
        ys = np.asarray(batch.get(spec.label_key, []), dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape != (len(ys), 3 * 32 * 32):
            raise FreezecacheError(
                f"{_member(where, name)} has data {data.dtype}{data.shape} for {len(ys)} labels "
                f"(key {spec.label_key!r}), expected uint8 (N, 3072) — replace the archive"
            )
        images.append(data.reshape(-1, 3, 32, 32))  # (N, 3072) -> (N, C, H, W), CIFAR is CHW
        labels.append(ys)
    return Split(np.concatenate(images), np.concatenate(labels))


def _member(where: Path, name: str) -> str:
    """How to name a file of the dataset: archive:member, or the path in an extracted folder."""
    return str(where / name) if where.is_dir() else f"{where}:{name}"


def _natural_key(name: str) -> list:
    """Sort data_batch_10 after data_batch_9."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _cifar_classes(files: dict[str, bytes], where: Path, spec: _CifarSpec) -> list[str]:
    """Class names from the meta pickle; fixed names when the meta file is absent."""
    if spec.meta not in files:
        log.warning("%s has no %s; using generic class names", where, spec.meta)
        if spec.num_classes == 10:
            return list(CIFAR10_CLASSES)
        return [f"class_{i}" for i in range(spec.num_classes)]
    names = _unpickle(files[spec.meta], _member(where, spec.meta)).get(spec.names_key, [])
    if len(names) != spec.num_classes:
        raise FreezecacheError(
            f"{_member(where, spec.meta)} lists {len(names)} class names, expected "
            f"{spec.num_classes} — replace the archive"
        )
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _download_cifar(name: str, root: Path, spec: _CifarSpec) -> None:
    """Fetch the archive with torchvision; any failure becomes an instruction to place it."""
    from torchvision import datasets  # only needed here; keeps import of this module light

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        root.mkdir(parents=True, exist_ok=True)
        cls(root=str(root), train=True, download=True)
    except Exception as exc:  # network errors come as URLError, OSError, RuntimeError, ...
        raise FreezecacheError(
            f"could not download {name} into {root} ({exc}) — put {spec.archive} in {root}"
        ) from exc


def _open_cifar(name: str, root: Path | None, download: bool) -> _Source:
    """CIFAR-10/100 from the tarball, a folder holding it, or the extracted folder."""
    spec = _CIFAR[name]
    if root is None:
        raise FreezecacheError(
            f"data.root is not set for {name} — set it to the folder holding {spec.archive}"
        )
    root = Path(root)
    found = _find_dataset(root, spec.archive, spec.folder, spec.test) if root.exists() else None
    if found is None and download:
        target = root.parent if root.name.endswith((".tar.gz", ".tgz")) else root
        _download_cifar(name, target, spec)
        found = _find_dataset(target, spec.archive, spec.folder, spec.test)
    if found is None:
        what = "does not exist" if not root.exists() else f"holds no {spec.archive}"
        raise FreezecacheError(
            f"{root} {what} — put {spec.archive} (or its extracted {spec.folder}/) there, "
            "or set data.download: true"
        )
    if found.is_file():
        files, read = _read_cifar_tar(found, spec), [(found.name, found)]
    else:
        files, paths = _read_cifar_dir(found, spec)
        read = [(p.name, p) for p in paths]
    train = _cifar_batches(files, spec.train, found, spec)
    test = _cifar_batches(files, spec.test, found, spec)
    classes = _cifar_classes(files, found, spec)
    _check_labels(train.labels, len(classes), found)
    _check_labels(test.labels, len(classes), found)
    return _Source(
        train=_array_split(train.images, train.labels),
        test=_array_split(test.images, test.labels),
        classes=classes,
        channels=3,
        files=read,
    )


# ---------------------------------------------------------------------------------------------
# Image trees (Tiny-ImageNet zip or folder, imagefolder): decoded with PIL on demand.


class _DirTree:
    """Files under a folder, addressed by '/'-separated relative names."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def names(self) -> list[str]:
        return sorted(
            p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file()
        )

    def read(self, name: str) -> bytes:
        path = self.root / name
        if not path.is_file():
            raise FreezecacheError(f"{path} is missing — restore the dataset folder")
        return path.read_bytes()

    def where(self, name: str) -> str:
        return str(self.root / name)

    def close(self) -> None:
        pass


class _ZipTree:
    """Members of a zip under one top folder, addressed by names relative to it."""

    def __init__(self, path: Path, folder: str) -> None:
        self.path = path
        try:
            self._zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise FreezecacheError(
                f"{path} is not a complete zip archive ({exc}) — download it again"
            ) from exc
        tops = {n.split("/", 1)[0] for n in self._zip.namelist() if "/" in n}
        # the official zip nests everything under tiny-imagenet-200/; a re-zipped one may not
        self.prefix = f"{folder}/" if folder in tops else ""

    def names(self) -> list[str]:
        n = len(self.prefix)
        members = self._zip.namelist()
        return sorted(m[n:] for m in members if m.startswith(self.prefix) and not m.endswith("/"))

    def read(self, name: str) -> bytes:
        try:
            return self._zip.read(self.prefix + name)
        except KeyError as exc:
            raise FreezecacheError(
                f"{self.path} has no member {self.prefix + name} — download the archive again"
            ) from exc
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
            raise FreezecacheError(
                f"{self.path}: member {self.prefix + name} is corrupt ({exc}) — download again"
            ) from exc

    def where(self, name: str) -> str:
        return f"{self.path}:{self.prefix + name}"

    def close(self) -> None:
        self._zip.close()


def _decode_image(data: bytes, where: str, channels: int) -> np.ndarray:
    """Decode an image file to uint8 (C, H, W) with C = channels (1 or 3)."""
    from PIL import Image  # PIL comes with torchvision; only image trees need it

    try:
        with Image.open(io.BytesIO(data)) as img:
            arr = np.asarray(img.convert("L" if channels == 1 else "RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise FreezecacheError(
            f"{where} is not a readable image ({exc}) — remove or replace it"
        ) from exc
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # (H,W,C) -> (C,H,W)


def _is_grayscale(path: Path) -> bool:
    """Whether an image file is single-channel; reads only its header."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.mode in ("1", "L", "I", "I;16", "F")
    except OSError:
        return False  # undecodable files are reported when decoded


def _tree_split(
    tree: _DirTree | _ZipTree, names: list[str], labels: list[int], channels: int
) -> _LazySplit:
    """A split of image files in a tree, decoded to `channels` on request."""

    def decode(idx: np.ndarray) -> list[np.ndarray]:
        return [_decode_image(tree.read(names[i]), tree.where(names[i]), channels) for i in idx]

    return _LazySplit(labels=np.asarray(labels, dtype=np.int64), decode=decode)


def _tree_files(tree: _DirTree | _ZipTree, path: Path, names: list[str]) -> list[tuple[str, Path]]:
    """Files to fingerprint: the archive itself, or every file read from the folder."""
    if isinstance(tree, _ZipTree):
        return [(path.name, path)]
    return [(n, tree.root / n) for n in names]


def _open_tiny_imagenet(root: Path | None, download: bool) -> _Source:
    """Tiny-ImageNet-200 from tiny-imagenet-200.zip or its extracted folder; test split = val."""
    if root is None:
        raise FreezecacheError(
            "data.root is not set for tiny_imagenet — set it to the folder holding "
            "tiny-imagenet-200.zip"
        )
    root = Path(root)
    found = _find_dataset(root, "tiny-imagenet-200.zip", "tiny-imagenet-200", "wnids.txt")
    if found is None:
        what = "does not exist" if not root.exists() else "holds no tiny-imagenet-200.zip"
        raise FreezecacheError(
            f"{root} {what} — put tiny-imagenet-200.zip (or its extracted folder) there"
        )
    tree = _ZipTree(found, "tiny-imagenet-200") if found.is_file() else _DirTree(found)
    try:
        wnids = sorted(set(_text(tree, "wnids.txt").split()))
        index = {w: i for i, w in enumerate(wnids)}
        names = tree.names()
        train = [n for n in names if re.fullmatch(r"train/[^/]+/images/[^/]+\.jpe?g", n, re.I)]
        train_labels = [_tiny_label(index, n.split("/")[1], tree.where(n)) for n in train]
        test, test_labels = _tiny_val(tree, index)
    except BaseException:
        tree.close()
        raise
    read = ["wnids.txt", "val/val_annotations.txt", *train, *test]
    return _Source(
        train=_tree_split(tree, train, train_labels, 3),
        test=_tree_split(tree, test, test_labels, 3),
        classes=wnids,
        channels=3,
        files=_tree_files(tree, found, read),
        close=tree.close,
    )


def _text(tree: _DirTree | _ZipTree, name: str) -> str:
    """A small text file of the tree."""
    return tree.read(name).decode("utf-8", errors="replace")


def _tiny_label(index: dict[str, int], wnid: str, where: str) -> int:
    """Label of a wnid, with a clear error when wnids.txt does not list it."""
    if wnid not in index:
        raise FreezecacheError(f"{where}: class {wnid} is not in wnids.txt — restore wnids.txt")
    return index[wnid]


def _tiny_val(tree: _DirTree | _ZipTree, index: dict[str, int]) -> tuple[list[str], list[int]]:
    """Validation images and labels from val/val_annotations.txt (file<TAB>wnid<TAB>bbox...)."""
    where = tree.where("val/val_annotations.txt")
    names, labels = [], []
    for n, line in enumerate(_text(tree, "val/val_annotations.txt").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            raise FreezecacheError(f"{where} line {n} is not 'file<TAB>wnid...' — restore it")
        names.append(f"val/images/{parts[0]}")
        labels.append(_tiny_label(index, parts[1], where))
    return names, labels


def _open_imagefolder(root: Path | None, download: bool) -> _Source:
    """root/train/<class>/*.{png,jpg,jpeg} and root/test/<class>/...; labels follow sorted names."""
    if root is None:
        raise FreezecacheError(
            "data.root is not set for imagefolder — set it to a folder with train/ and test/"
        )
    root = Path(root)
    for part in ("train", "test"):
        if not (root / part).is_dir():
            raise FreezecacheError(
                f"{root / part} does not exist — an imagefolder root needs train/<class>/ and "
                "test/<class>/ folders of .png/.jpg images"
            )
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise FreezecacheError(
            f"{root / 'train'} has no class folders — add train/<class>/ folders"
        )
    tree = _DirTree(root)
    train, train_labels = _folder_files(root, "train", classes)
    test, test_labels = _folder_files(root, "test", classes)
    # native channels: 1 only when every image is grayscale (header scan, no decoding)
    gray = all(_is_grayscale(root / n) for n in train + test)
    channels = 1 if gray else 3
    return _Source(
        train=_tree_split(tree, train, train_labels, channels),
        test=_tree_split(tree, test, test_labels, channels),
        classes=classes,
        channels=channels,
        files=_tree_files(tree, root, train + test),
    )


def _folder_files(root: Path, part: str, classes: list[str]) -> tuple[list[str], list[int]]:
    """Relative image names and labels of root/part/<class>/."""
    names, labels = [], []
    for folder in sorted(p for p in (root / part).iterdir() if p.is_dir()):
        if folder.name not in classes:
            raise FreezecacheError(
                f"{folder} is a class that train/ does not have — add train/{folder.name}/ or "
                "remove it"
            )
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            log.warning("%s holds no .png/.jpg images", folder)
        names += [p.relative_to(root).as_posix() for p in files]
        labels += [classes.index(folder.name)] * len(files)
    if not names:
        raise FreezecacheError(f"{root / part} holds no .png/.jpg images — add some")
    return names, labels


# ---------------------------------------------------------------------------------------------
# Public API.

_OPENERS: dict[str, Callable[[Path | None, bool], _Source]] = {
    "fashion_mnist": _open_fashion_mnist,
    "cifar10": lambda root, download: _open_cifar("cifar10", root, download),
    "cifar100": lambda root, download: _open_cifar("cifar100", root, download),
    "tiny_imagenet": _open_tiny_imagenet,
    "imagefolder": _open_imagefolder,
}


def _open_source(name: str, root: str | Path | None, download: bool) -> _Source:
    """Open a dataset by name without decoding its images."""
    if name not in _OPENERS:
        raise FreezecacheError(
            f"unknown dataset {name!r} in data.name — use one of {', '.join(SOURCES)}"
        )
    return _OPENERS[name](Path(root) if root is not None else None, download)


def _decode_all(split: _LazySplit, where: str) -> np.ndarray:
    """Every image of a split as one uint8 (N, C, H, W) array; they must share a size."""
    images = split.decode(np.arange(len(split.labels)))
    if isinstance(images, np.ndarray):
        return images
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise FreezecacheError(
            f"images in {where} have different sizes {sorted(shapes)[:3]}... — use prepare "
            "(it resizes each image to img_size)"
        )
    return np.stack(images)


def load_source(
    name: str, root: str | None, download: bool = False
) -> tuple[Split, Split, list[str]]:
    """Raw train/test splits at native size and channels + class names."""
    source = _open_source(name, root, download)
    try:
        train = Split(_decode_all(source.train, f"{root} train"), source.train.labels)
        test = Split(_decode_all(source.test, f"{root} test"), source.test.labels)
    finally:
        source.close()
    return train, test, source.classes


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


def _stratified_indices(labels: np.ndarray, size: int | None, seed: int) -> np.ndarray:
    """Indices of a seeded class-balanced subset, in seeded-shuffled order."""
    rng = np.random.default_rng(seed)
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


def stratified_subset(split: Split, size: int | None, seed: int) -> Split:
    """Seeded, class-balanced subset (size None or >= N -> all, still in a seeded order).

    Classes get equal shares (±1); a class with too few samples gives its rest to the others.
    """
    idx = _stratified_indices(split.labels, size, seed)
    return Split(split.images[idx], split.labels[idx])


def _to_channels(x: np.ndarray, channels: int) -> np.ndarray:
    """uint8 (N, C, H, W) -> (N, channels, H, W): 1->3 repeats, 3->1 takes BT.601 luminance."""
    c = x.shape[1]
    if c == channels:
        return x
    if c == 1 and channels == 3:
        return np.repeat(x, 3, axis=1)
    if c == 3 and channels == 1:
        luma = np.tensordot(
            np.asarray(LUMA, dtype=np.float32), x.astype(np.float32), axes=([0], [1])
        )
        return np.clip(np.rint(luma), 0, 255).astype(np.uint8)[:, None]  # (N,H,W) -> (N,1,H,W)
    raise FreezecacheError(f"cannot convert {c}-channel images to {channels} — use channels 1 or 3")


def _resize(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear antialiased resize of uint8 (N, C, H, W), in chunks to bound float memory."""
    out = np.empty((len(x), x.shape[1], height, width), dtype=np.uint8)
    for start in range(0, len(x), _FIT_CHUNK):
        chunk = torch.from_numpy(x[start : start + _FIT_CHUNK]).float()
        resized = F.interpolate(
            chunk, size=(height, width), mode="bilinear", align_corners=False, antialias=True
        )
        out[start : start + _FIT_CHUNK] = resized.round().clamp_(0, 255).to(torch.uint8).numpy()
    return out


def _pad_centre(x: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad uint8 (N, C, h, w) with h, w <= size to (N, C, size, size), image centred."""
    n, c, h, w = x.shape
    out = np.zeros((n, c, size, size), dtype=np.uint8)
    top, left = (size - h) // 2, (size - w) // 2
    out[:, :, top : top + h, left : left + w] = x
    return out


def fit_images(images: np.ndarray, img_size: int, channels: int) -> np.ndarray:
    """Fit images to uint8 (N, channels, img_size, img_size).

    Pad (centre, zeros) when smaller, resize (bilinear, torch interpolate with antialias) when
    larger; 1->3 channels by repeat, 3->1 by luminance (0.299, 0.587, 0.114).

    A non-square image larger than img_size keeps its aspect ratio: its longer side is resized
    to img_size and the shorter side is then padded.
    """
    if images.ndim != 4 or images.dtype != np.uint8:
        raise FreezecacheError(
            f"fit_images needs uint8 (N, C, H, W) images, got {images.dtype}{images.shape}"
        )
    if img_size < 1 or channels not in (1, 3):
        raise FreezecacheError(
            f"img_size {img_size} / channels {channels} are invalid — use img_size >= 1 and "
            "channels 1 or 3"
        )
    if images.shape[1] == 3 and channels == 1:
        images = _to_channels(images, 1)  # before resizing: 3x less to resize
    h, w = images.shape[2:]
    if max(h, w) > img_size:
        scale = img_size / max(h, w)
        images = _resize(images, max(1, round(h * scale)), max(1, round(w * scale)))
    if images.shape[2:] != (img_size, img_size):
        images = _pad_centre(images, img_size)
    return _to_channels(images, channels)  # 1->3 after resizing: 3x less to resize


def _fit_list(images: list[np.ndarray], img_size: int, channels: int) -> np.ndarray:
    """Fit images of mixed sizes: group by shape, fit each group as one batch."""
    out = np.empty((len(images), channels, img_size, img_size), dtype=np.uint8)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(im.shape, []).append(i)
    for ids in groups.values():
        out[ids] = fit_images(np.stack([images[i] for i in ids]), img_size, channels)
    return out


def _chunks(idx: np.ndarray, size: int) -> Iterator[tuple[int, np.ndarray]]:
    """(offset, indices) pieces of idx."""
    for start in range(0, len(idx), size):
        yield start, idx[start : start + size]


def _take(split: _LazySplit, size: int | None, seed: int, img_size: int, channels: int) -> Split:
    """Stratified subset of a lazy split, decoded and fitted chunk by chunk."""
    idx = _stratified_indices(split.labels, size, seed)
    images = np.empty((len(idx), channels, img_size, img_size), dtype=np.uint8)
    for start, piece in _chunks(idx, _DECODE_CHUNK):
        decoded = split.decode(piece)
        fit = fit_images if isinstance(decoded, np.ndarray) else _fit_list
        images[start : start + len(piece)] = fit(decoded, img_size, channels)
    return Split(images, split.labels[idx])


def _channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 (N, C, H, W) scaled to [0, 1], without a float copy."""
    c = images.shape[1]
    total, squares, count = np.zeros(c), np.zeros(c), 0
    for start in range(0, len(images), 4096):
        chunk = images[start : start + 4096].astype(np.float64) / 255.0
        total += chunk.sum(axis=(0, 2, 3))
        squares += (chunk**2).sum(axis=(0, 2, 3))
        count += chunk.shape[0] * chunk.shape[2] * chunk.shape[3]
    if count == 0:
        return [0.0] * c, [0.0] * c
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return [float(m) for m in mean], [float(s) for s in std]


def source_fingerprint(files: Sequence[tuple[str, Path]]) -> str:
    """sha256 over (name, size, sha256 of content) of each file, in name order."""
    outer = hashlib.sha256()
    for name, path in sorted(files, key=lambda f: f[0]):
        inner = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                inner.update(block)
        outer.update(f"{name}\0{path.stat().st_size}\0{inner.hexdigest()}\n".encode())
    return outer.hexdigest()


def _check_prepare_args(
    img_size: int, channels: int | None, train_size: int | None, test_size: int | None
) -> None:
    """Report every bad argument at once, before any data is read."""
    problems = []
    if not isinstance(img_size, int) or img_size < 1:
        problems.append(f"data.img_size must be a positive integer, got {img_size!r}")
    if channels not in (None, 1, 3):
        problems.append(f"data.channels must be 1, 3 or null, got {channels!r}")
    for key, value in (("train_size", train_size), ("test_size", test_size)):
        if value is not None and (not isinstance(value, int) or value < 1):
            problems.append(f"data.{key} must be a positive integer or null, got {value!r}")
    if problems:
        raise FreezecacheError("; ".join(problems) + " — fix params.yaml")


def _write_split(path: Path, split: Split) -> None:
    """One split as an uncompressed npz: uint8 is already compact and loads fast."""
    np.savez(path, images=split.images, labels=split.labels)


def _write_meta(path: Path, meta: dict) -> None:
    """meta.json, human readable."""
    path.write_text(json.dumps(meta, indent=2) + "\n")


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished temp dir to out_dir, replacing an old one only once the new is whole."""
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)


def prepare(
    name: str,
    root: str | Path | None,
    out_dir: Path,
    *,
    img_size: int,
    channels: int | None,
    train_size: int | None,
    test_size: int | None,
    seed: int,
    download: bool = False,
) -> dict:
    """Writes out_dir/train.npz, out_dir/test.npz (keys images, labels) and out_dir/meta.json.

    meta.json: name, classes, num_classes, channels, img_size, train_size, test_size (sizes
    written), mean/std per channel of the prepared train images in [0, 1], source_fingerprint
    (see ``FINGERPRINT_METHOD``; content hashes of the files actually read), seed. The output
    is written to a temp dir next to out_dir and renamed into place, so a failure leaves
    nothing half-written. channels None -> the dataset's native channel count. Returns the meta.
    """
    _check_prepare_args(img_size, channels, train_size, test_size)
    out_dir = Path(out_dir)
    source = _open_source(name, root, download)
    try:
        channels = channels or source.channels
        train = _take(source.train, train_size, seed, img_size, channels)
        test = _take(source.test, test_size, seed, img_size, channels)
    finally:
        source.close()
    mean, std = _channel_stats(train.images)
    meta = {
        "name": name,
        "classes": source.classes,
        "num_classes": len(source.classes),
        "channels": channels,
        "img_size": img_size,
        "train_size": len(train),
        "test_size": len(test),
        "mean": mean,
        "std": std,
        "source_fingerprint": source_fingerprint(source.files),
        "fingerprint_method": FINGERPRINT_METHOD,
        "seed": seed,
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        _write_split(tmp / "train.npz", train)
        _write_split(tmp / "test.npz", test)
        _write_meta(tmp / "meta.json", meta)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "prepared %s: %d train / %d test at %d px into %s",
        name,
        len(train),
        len(test),
        img_size,
        out_dir,
    )
    return meta


def _load_split(path: Path, meta: dict) -> Split:
    """One npz written by prepare, checked against meta."""
    fix = "run `dvc repro prepare`"
    if not path.is_file():
        raise FreezecacheError(f"{path} is missing — {fix}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            split = Split(npz["images"], npz["labels"])
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise FreezecacheError(f"{path} is corrupt ({exc}) — {fix}") from exc
    size = meta["img_size"]
    expected = (meta["channels"], size, size)
    if (
        split.images.dtype != np.uint8
        or split.images.ndim != 4
        or split.images.shape[1:] != expected
        or split.labels.shape != (len(split.images),)
    ):
        raise FreezecacheError(
            f"{path} holds images {split.images.dtype}{split.images.shape} and labels "
            f"{split.labels.shape}, meta.json says (N, {expected}) — {fix}"
        )
    split.labels = split.labels.astype(np.int64, copy=False)
    return split


def load_prepared(out_dir: Path) -> tuple[Split, Split, dict]:
    """Read what prepare wrote; FreezecacheError naming the file when it is missing or corrupt."""
    out_dir = Path(out_dir)
    meta_path = out_dir / "meta.json"
    if not meta_path.is_file():
        raise FreezecacheError(f"{meta_path} is missing — run `dvc repro prepare`")
    try:
        meta = json.loads(meta_path.read_text())
        int(meta["img_size"]), int(meta["channels"]), list(meta["classes"])
    except (ValueError, KeyError, TypeError) as exc:
        raise FreezecacheError(
            f"{meta_path} is corrupt ({exc!r}) — run `dvc repro prepare`"
        ) from exc
    train = _load_split(out_dir / "train.npz", meta)
    test = _load_split(out_dir / "test.npz", meta)
    return train, test, meta
