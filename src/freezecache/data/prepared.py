"""Prepare a dataset once: class subset, seeded stratified splits, fitted uint8 images on disk.

``plan_splits`` opens the source (an image folder is scanned: every bad file found at once) and
picks seeded class-balanced subsets from the labels alone, so ``check`` can list every problem
before any stage runs; ``prepare`` then decodes only what it keeps (a small subset of a large JPEG
dataset decodes only that subset), fits each image (:class:`freezecache.data.images.Fit`), and
writes ``train.npz`` / ``test.npz`` (uint8,
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
import time
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from freezecache.core.errors import FreezecacheError
from freezecache.data.base import LazySplit, Source, Split
from freezecache.data.classes import class_problems
from freezecache.data.images import Fit
from freezecache.data.scan import bad_file_lines
from freezecache.data.sources import known_class_names, known_num_classes
from freezecache.data.splits import SPLIT_NAMES, SplitPlan, plan_splits

log = logging.getLogger(__name__)
FINGERPRINT_METHOD = "sha256 over (name, size, sha256 of content) of every source file read"
_DECODE_CHUNK = 1024  # image files decoded before they are fitted and released
_FIX = "run `dvc repro prepare`"
_PROGRESS_S = 5.0  # seconds between progress lines


def _chunks(idx: np.ndarray, size: int) -> Iterator[tuple[int, np.ndarray]]:
    """(offset, indices) pieces of idx."""
    for start in range(0, len(idx), size):
        yield start, idx[start : start + size]


def _take(split: LazySplit, idx: np.ndarray, fit: Fit, what: str) -> Split:
    """The samples idx of a lazy split, decoded and fitted chunk by chunk (image files one at a
    time), with a progress line every few seconds."""
    images = np.empty((len(idx), fit.channels, fit.img_size, fit.img_size), dtype=np.uint8)
    last = start_t = time.monotonic()
    for start, piece in _chunks(idx, _DECODE_CHUNK):
        decoded = split.decode(piece)
        if isinstance(decoded, np.ndarray):
            images[start : start + len(piece)] = fit.arrays(decoded)
            continue
        for i, img in enumerate(decoded, start):
            images[i] = fit.image(img)
            if time.monotonic() - last > _PROGRESS_S:
                last = time.monotonic()
                log.info("decoded %d/%d %s images", i + 1, len(idx), what)
        log.info("decoded %d %s images in %.1f s", len(idx), what, time.monotonic() - start_t)
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


def _fingerprint(source: Source) -> str:
    """The source fingerprint: from an image folder's scan (which hashed every file once),
    else from the files read."""
    if source.scan is not None:
        return source.scan.fingerprint()
    return source_fingerprint(source.files)


def _check_prepare_args(
    name: str,
    img_size: int,
    channels: int | None,
    sizes: dict[str, int | None],
    classes: list[int | str] | None,
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
        problems += class_problems(
            classes, known_num_classes(name), dataset=name, names=known_class_names(name)
        )
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


def _report(plan: SplitPlan, root: object, bad_images: str) -> None:
    """Stop with every problem at once (bad files unless skipped, classes too small); log what
    is skipped, ignored or missing."""
    scan = plan.source.scan
    lines = bad_file_lines(root, plan.bad, bad_images)
    if bad_images == "skip" and lines:
        for line in lines:
            log.warning("%s", line)
        lines = []
    lines += plan.problems
    if lines:
        raise FreezecacheError("\n".join(lines))
    for w in plan.warnings:
        log.warning("%s", w)
    if scan is not None:
        log.info("%s", scan.summary())
        if scan.ignored:
            shown = ", ".join(scan.ignored[:5]) + (", ..." if len(scan.ignored) > 5 else "")
            log.info("ignored %d hidden, system or non-image files: %s", len(scan.ignored), shown)
        for n, fmt in scan.misnamed:
            log.info("%s holds a %s image; it is used as read", n, fmt)


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
    classes: list[int | str] | None = None,
    val_size: int | None = None,
    resize: str = "crop",
    crop_pct: float = 1.0,
    interpolation: str = "bicubic",
    bad_images: str = "error",
    test_fraction: float = 0.2,
    cache_dir: Path | None = None,
) -> dict:
    """Writes out_dir/train.npz, test.npz, val.npz when there is a validation set (keys images,
    labels), and meta.json. Returns the meta.

    classes: source class ids or names to keep, relabelled 0..k-1 in the order given (None:
    all). val_size: a seeded class-balanced validation set carved from the training pool,
    disjoint from the training subset (or a subset of the dataset's own validation set, an
    image folder's val/); the training subset is the same as without it unless train_size is
    None (then it is every other training image). The test set is never touched. Subsets are
    drawn after the class filter. channels None -> the dataset's native count. resize,
    crop_pct, interpolation: how images become img_size (:class:`freezecache.data.images.Fit`).
    bad_images: "error" stops listing every file an image folder's scan could not use; "skip"
    leaves them out (meta.json lists them). test_fraction, cache_dir: an image folder's
    one-pool split and where its scan is remembered.

    meta.json: name, classes (names of the kept classes, index = label), class_ids (their
    source ids), num_classes (k), channels, img_size, resize (the fit), train_size, val_size,
    test_size (sizes written; val_size 0 without a validation set), class_counts (images per
    class in each split), mean/std per channel of the prepared train images in [0, 1],
    source_fingerprint (see ``FINGERPRINT_METHOD``), fingerprint_method, seed, and for an image
    folder its layout and the skipped files with their reasons. The output is written to a
    temp dir next to out_dir and renamed into place, so a failure leaves nothing half-written.
    """
    sizes = {"train_size": train_size, "test_size": test_size, "val_size": val_size}
    _check_prepare_args(name, img_size, channels, sizes, classes)
    out_dir = Path(out_dir)
    plan = plan_splits(
        name, root, train_size=train_size, test_size=test_size, seed=seed, download=download,
        classes=classes, val_size=val_size, test_fraction=test_fraction, cache_dir=cache_dir,
    )  # fmt: skip
    source = plan.source
    try:
        _report(plan, root or name, bad_images)
        fit = Fit(img_size, channels or source.channels, resize, crop_pct, interpolation)
        splits = {
            s: _take(plan.pools[s], idx, fit, SPLIT_NAMES[s]) for s, idx in plan.indices.items()
        }
    finally:
        source.close()
    meta = _meta(name, plan, fit, splits, seed)
    _write_all(out_dir, splits, meta)
    log.info(
        "prepared %s: %d train / %d val / %d test at %d px into %s",
        name, meta["train_size"], meta["val_size"], meta["test_size"], img_size, out_dir,
    )  # fmt: skip
    return meta


def _meta(name: str, plan: SplitPlan, fit: Fit, splits: dict[str, Split], seed: int) -> dict:
    """What meta.json records about a prepared dataset (see ``prepare``)."""
    source = plan.source
    mean, std = _channel_stats(splits["train"].images)
    meta = {
        "name": name,
        "classes": plan.classes,
        "class_ids": plan.ids,
        "num_classes": len(plan.ids),
        "channels": fit.channels,
        "img_size": fit.img_size,
        "resize": {
            "mode": fit.resize,
            "crop_pct": fit.crop_pct,
            "interpolation": fit.interpolation,
        },  # fmt: skip
        "train_size": len(splits["train"]),
        "val_size": len(splits["val"]) if "val" in splits else 0,
        "test_size": len(splits["test"]),
        "class_counts": plan.counts(),
        "mean": mean,
        "std": std,
        "source_fingerprint": _fingerprint(source),
        "fingerprint_method": FINGERPRINT_METHOD,
        "seed": seed,
    }
    if source.scan is not None:
        meta["layout"] = source.scan.layout
        meta["skipped"] = [{"file": n, "reason": why} for n, why in plan.bad]
    return meta


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


def read_meta(out_dir: Path) -> dict:
    """meta.json of a prepared folder (checked as every reader needs it)."""
    return _read_meta(Path(out_dir))


def load_labels(out_dir: Path, part: str = "test") -> np.ndarray:
    """The labels of one prepared split, without reading its images."""
    path = Path(out_dir) / f"{part}.npz"
    try:
        with np.load(path, allow_pickle=False) as npz:
            return npz["labels"].astype(np.int64)
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise FreezecacheError(f"{path} is missing or corrupt ({exc}) — {_FIX}") from exc


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
