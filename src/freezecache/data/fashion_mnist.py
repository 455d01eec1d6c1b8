"""Fashion-MNIST from its IDX gzip files (Debian's dataset-fashion-mnist, or data.root)."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from freezecache.core.errors import FreezecacheError
from freezecache.data.base import Source, array_split, check_labels

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


def _idx_names(prefix: str) -> tuple[str, str]:
    """File names of one split's images and labels (prefix train or t10k)."""
    return f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"


FASHION_MNIST_FILES = (*_idx_names("train"), *_idx_names("t10k"))
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
    paths = [root / name for name in _idx_names(prefix)]
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


def open_fashion_mnist(root: Path | None, download: bool) -> Source:
    """Fashion-MNIST from the Debian package folder (or data.root)."""
    root = Path(root) if root else FASHION_MNIST_ROOT
    if not root.is_dir():
        raise FreezecacheError(
            f"Fashion-MNIST folder {root} does not exist — `apt-get install dataset-fashion-mnist` "
            "or set data.root"
        )
    train_x, train_y, train_files = _idx_pair(root, "train")
    test_x, test_y, test_files = _idx_pair(root, "t10k")
    classes = list(FASHION_MNIST_CLASSES)
    check_labels(train_y, len(classes), train_files[1])
    check_labels(test_y, len(classes), test_files[1])
    return Source(
        train=array_split(train_x, train_y),
        test=array_split(test_x, test_y),
        classes=classes,
        channels=1,
        files=[(p.name, p) for p in train_files + test_files],
    )
