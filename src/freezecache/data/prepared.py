"""Prepare a dataset once: class subset, seeded stratified splits, fitted uint8 images on disk.

``prepare`` picks seeded class-balanced subsets *before* decoding images, so a small subset of a
large JPEG dataset decodes only what it keeps, and writes ``train.npz`` / ``test.npz`` (uint8,
N×C×H×W), ``val.npz`` when a validation set is asked for, and ``meta.json`` into ``out_dir``
atomically. ``load_prepared`` and ``load_val`` read them back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from freezecache.core.errors import FreezecacheError
from freezecache.data.base import LazySplit, Source, Split
from freezecache.data.classes import class_problems, select_classes
from freezecache.data.fit import fit_images, fit_list
from freezecache.data.sources import known_num_classes, open_source
from freezecache.data.subset import stratified_indices, train_val_indices

log = logging.getLogger(__name__)
FINGERPRINT_METHOD = "sha256 over (name, size, sha256 of content) of every source file read"
_DECODE_CHUNK = 1024  # image files decoded before they are fitted and released
_FIX = "run `dvc repro prepare`"


def _chunks(idx: np.ndarray, size: int) -> Iterator[tuple[int, np.ndarray]]:
    """(offset, indices) pieces of idx."""
    for start in range(0, len(idx), size):
        yield start, idx[start : start + size]


def _take(split: LazySplit, idx: np.ndarray, img_size: int, channels: int) -> Split:
    """The samples idx of a lazy split, decoded and fitted chunk by chunk."""
    images = np.empty((len(idx), channels, img_size, img_size), dtype=np.uint8)
    for start, piece in _chunks(idx, _DECODE_CHUNK):
        decoded = split.decode(piece)
        fit = fit_images if isinstance(decoded, np.ndarray) else fit_list
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
    name: str,
    img_size: int,
    channels: int | None,
    sizes: dict[str, int | None],
    classes: list[int] | None,
) -> None:
    """Report every bad argument at once, before any data is read."""
    problems = []
    if not isinstance(img_size, int) or img_size < 1:
        problems.append(f"data.img_size must be a positive integer, got {img_size!r}")
    if channels not in (None, 1, 3):
        problems.append(f"data.channels must be 1, 3 or null, got {channels!r}")
    for key, value in sizes.items():
        if value is not None and (not isinstance(value, int) or value < 1):
            problems.append(f"data.{key} must be a positive integer or null, got {value!r}")
    if classes is not None:
        problems += class_problems(classes, known_num_classes(name), dataset=name)
    if problems:
        raise FreezecacheError("; ".join(problems) + " — fix params.yaml")


def _class_ids(source: Source, classes: list[int] | None, where: str) -> list[int]:
    """The source class ids to keep, checked against the classes the files hold."""
    if classes is None:
        return list(range(len(source.classes)))
    problems = class_problems(classes, len(source.classes), dataset=where)
    if problems:
        raise FreezecacheError("; ".join(problems) + " — fix data.classes in params.yaml")
    return [int(c) for c in classes]


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


def _folder_mode() -> int:
    """The mode a new folder gets here (0777 less the umask), as every other output has."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o777 & ~mask


def _write_all(out_dir: Path, splits: dict[str, Split], meta: dict) -> None:
    """Write splits and meta.json into a temp dir next to out_dir, then rename it into place."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        tmp.chmod(_folder_mode())  # mkdtemp's 0700 would stay on the published folder
        for part, split in splits.items():
            _write_split(tmp / f"{part}.npz", split)
        _write_meta(tmp / "meta.json", meta)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    classes: list[int] | None = None,
    val_size: int | None = None,
) -> dict:
    """Writes out_dir/train.npz, test.npz, val.npz when val_size is set (keys images, labels),
    and meta.json. Returns the meta.

    classes: source class ids to keep, relabelled 0..k-1 in the order given (None: all).
    val_size: a seeded class-balanced validation set carved from the training pool, disjoint
    from the training subset; the training subset is the same as without it unless train_size
    is None (then it is every other training image). The test set is never touched.
    Subsets are drawn after the class filter. channels None -> the dataset's native count.

    meta.json: name, classes (names of the kept classes, index = label), class_ids (their
    source ids), num_classes (k), channels, img_size, train_size, val_size, test_size (sizes
    written; val_size 0 without a validation set), mean/std per channel of the prepared train
    images in [0, 1], source_fingerprint (see ``FINGERPRINT_METHOD``; content hashes of the
    files actually read), fingerprint_method, seed. The output is written to a temp dir next to
    out_dir and renamed into place, so a failure leaves nothing half-written.
    """
    sizes = {"train_size": train_size, "test_size": test_size, "val_size": val_size}
    _check_prepare_args(name, img_size, channels, sizes, classes)
    out_dir = Path(out_dir)
    source = open_source(name, root, download)
    try:
        ids = _class_ids(source, classes, f"{name} at {root or 'its default folder'}")
        pool, test_pool = source.train, source.test
        if classes is not None:
            pool, test_pool = select_classes(pool, ids), select_classes(test_pool, ids)
        channels = channels or source.channels
        train_idx, val_idx = train_val_indices(pool.labels, train_size, val_size, seed)
        splits = {"train": _take(pool, train_idx, img_size, channels)}
        if val_size is not None:
            splits["val"] = _take(pool, val_idx, img_size, channels)
        test_idx = stratified_indices(test_pool.labels, test_size, seed)
        splits["test"] = _take(test_pool, test_idx, img_size, channels)
    finally:
        source.close()
    meta = _meta(name, source, ids, channels, img_size, splits, seed)
    _write_all(out_dir, splits, meta)
    log.info(
        "prepared %s: %d train / %d val / %d test at %d px into %s",
        name, meta["train_size"], meta["val_size"], meta["test_size"], img_size, out_dir,
    )  # fmt: skip
    return meta


def _meta(
    name: str,
    source: Source,
    ids: list[int],
    channels: int,
    img_size: int,
    splits: dict[str, Split],
    seed: int,
) -> dict:
    """What meta.json records about a prepared dataset (see ``prepare``)."""
    mean, std = _channel_stats(splits["train"].images)
    return {
        "name": name,
        "classes": [source.classes[i] for i in ids],
        "class_ids": ids,
        "num_classes": len(ids),
        "channels": channels,
        "img_size": img_size,
        "train_size": len(splits["train"]),
        "val_size": len(splits["val"]) if "val" in splits else 0,
        "test_size": len(splits["test"]),
        "mean": mean,
        "std": std,
        "source_fingerprint": source_fingerprint(source.files),
        "fingerprint_method": FINGERPRINT_METHOD,
        "seed": seed,
    }


def _load_split(path: Path, meta: dict) -> Split:
    """One npz written by prepare, checked against meta."""
    if not path.is_file():
        raise FreezecacheError(f"{path} is missing — {_FIX}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            split = Split(npz["images"], npz["labels"])
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise FreezecacheError(f"{path} is corrupt ({exc}) — {_FIX}") from exc
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
            f"{split.labels.shape}, meta.json says (N, {expected}) — {_FIX}"
        )
    split.labels = split.labels.astype(np.int64, copy=False)
    return split


def _read_meta(out_dir: Path) -> dict:
    """meta.json of a prepared folder, with the fields every reader relies on checked."""
    meta_path = out_dir / "meta.json"
    if not meta_path.is_file():
        raise FreezecacheError(f"{meta_path} is missing — {_FIX}")
    try:
        meta = json.loads(meta_path.read_text())
        int(meta["img_size"]), int(meta["channels"]), list(meta["classes"])
        int(meta.get("val_size", 0))  # written before validation sets existed: none
    except (ValueError, KeyError, TypeError) as exc:
        raise FreezecacheError(f"{meta_path} is corrupt ({exc!r}) — {_FIX}") from exc
    return meta


def load_prepared(out_dir: Path) -> tuple[Split, Split, dict]:
    """Read what prepare wrote; FreezecacheError naming the file when it is missing or corrupt."""
    out_dir = Path(out_dir)
    meta = _read_meta(out_dir)
    train = _load_split(out_dir / "train.npz", meta)
    test = _load_split(out_dir / "test.npz", meta)
    return train, test, meta


def load_val(out_dir: Path) -> Split | None:
    """The validation split prepare carved from the training pool; None when it made none."""
    out_dir = Path(out_dir)
    meta = _read_meta(out_dir)
    if not meta.get("val_size", 0):
        return None
    return _load_split(out_dir / "val.npz", meta)
