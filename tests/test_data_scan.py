"""Your own images: one scan lists every bad file at once, junk is ignored and counted, the three
layouts, classes by name, classes too small for the splits, and the scan's memory."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fake_datasets import (
    MESSY_BAD,
    MESSY_CLASSES,
    MESSY_IGNORED,
    make_imagefolder,
    make_messy_folder,
)
from freezecache.core.errors import FreezecacheError
from freezecache.data import load_prepared, load_val, prepare, scan_folder
from freezecache.data import scan as scan_module


def prep(root, out, **kw):
    args = dict(img_size=32, channels=None, train_size=None, test_size=None, seed=0)
    return prepare("imagefolder", root, out, **{**args, **kw})


def test_the_messy_folder_is_scanned_once_listing_every_bad_file(tmp_path):
    root = make_messy_folder(tmp_path / "shapes")
    scan = scan_folder(root)
    assert scan.classes == MESSY_CLASSES and scan.layout == "classes"
    assert [n for n, _ in scan.bad] == sorted(MESSY_BAD)
    for name, why in scan.bad:
        assert MESSY_BAD[name] in why, (name, why)
    assert scan.ignored == sorted(MESSY_IGNORED)
    used = [n for n, _ in scan.files["all"]]
    assert len(used) == 30  # upper-case extensions, BMP, WebP, TIFF, GIF, a space: all used
    assert {Path(n).suffix for n in used} >= {".JPG", ".PNG", ".bmp", ".webp", ".tif", ".gif"}
    assert any(n.startswith("plus sign/") for n in used)
    with pytest.raises(FreezecacheError) as err:  # error: one stop, every bad file
        prep(root, tmp_path / "out")
    lines = str(err.value).splitlines()
    assert "3 files cannot be used" in lines[0] and "data.bad_images: skip" in lines[0]
    assert [line.split(":")[0].strip() for line in lines[1:]] == sorted(MESSY_BAD)
    assert not (tmp_path / "out").exists()


def test_skip_prepares_the_rest_and_records_what_it_skipped(tmp_path):
    root = make_messy_folder(tmp_path / "shapes")
    meta = prep(root, tmp_path / "out", bad_images="skip", val_size=5)
    assert [s["file"] for s in meta["skipped"]] == sorted(MESSY_BAD)
    assert meta["classes"] == MESSY_CLASSES and meta["channels"] == 3
    assert meta["class_counts"] == {"train": [4] * 5, "val": [1] * 5, "test": [1] * 5}
    train, test, _ = load_prepared(tmp_path / "out")
    assert train.images.shape == (20, 3, 32, 32) and len(test) == 5
    assert len(load_val(tmp_path / "out")) == 5
    again = prep(root, tmp_path / "again", bad_images="skip", val_size=5)
    assert again == meta  # the same seed, the same bytes
    assert (tmp_path / "again/train.npz").read_bytes() == (tmp_path / "out/train.npz").read_bytes()


def test_a_misnamed_image_is_used_and_said(tmp_path):
    root = make_imagefolder(tmp_path / "if", ((16, 16),))
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buf, format="PNG")
    (root / "train/cat/photo.jpg").write_bytes(buf.getvalue())
    scan = scan_folder(root)
    assert scan.misnamed == [("train/cat/photo.jpg", "PNG")] and not scan.bad


def _folder(root: Path, layout: dict[str, dict[str, int]]) -> Path:
    """split -> class -> images (split '' for the one-pool layout); pixel value = class index."""
    for split, classes in layout.items():
        for c, (cls, n) in enumerate(classes.items()):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("L", (8, 8), 40 * c + i).save(d / f"{i}.png")
    return root


def test_layouts(tmp_path):
    two = {"a": 3, "b": 3}
    # train/ + val/: val is the test set, the validation set is carved from train
    meta = prep(_folder(tmp_path / "tv", {"train": two, "val": {"a": 2, "b": 1}}), tmp_path / "o1",
                val_size=2)  # fmt: skip
    assert meta["class_counts"] == {"train": [2, 2], "val": [1, 1], "test": [2, 1]}
    # train/ + val/ + test/: each as given
    root = _folder(
        tmp_path / "tvt", {"train": two, "val": {"a": 1, "b": 2}, "test": {"a": 2, "b": 2}}
    )
    meta = prep(root, tmp_path / "o2")
    assert meta["class_counts"] == {"train": [3, 3], "val": [1, 2], "test": [2, 2]}
    assert meta["layout"] == "splits" and meta["channels"] == 1
    # one pool: each class split by test_fraction, seeded
    pool = _folder(tmp_path / "pool", {"": {"a": 10, "b": 5}})
    meta = prep(pool, tmp_path / "o3", test_fraction=0.2)
    assert meta["class_counts"] == {"train": [8, 4], "test": [2, 1]} and meta["layout"] == "classes"
    prep(pool, tmp_path / "o4", test_fraction=0.2, seed=1)
    _, t3, _ = load_prepared(tmp_path / "o3")
    _, t4, _ = load_prepared(tmp_path / "o4")
    assert not np.array_equal(t3.images, t4.images)  # another seed, other test images
    # refused: train/ alone, and a class test/ has that train/ lacks
    with pytest.raises(FreezecacheError, match="has train/ but no test/ or val/"):
        scan_folder(_folder(tmp_path / "t", {"train": two}))
    shutil.copytree(tmp_path / "tv", tmp_path / "stray")
    _folder(tmp_path / "stray", {"val": {"zebra": 1}})
    with pytest.raises(FreezecacheError, match="zebra is a class that train/ does not have"):
        scan_folder(tmp_path / "stray")


def test_classes_by_name(tmp_path):
    root = make_messy_folder(tmp_path / "shapes")
    meta = prep(root, tmp_path / "out", bad_images="skip", classes=["ring", "plus sign", 0])
    assert meta["classes"] == ["ring", "plus sign", "circle"] and meta["class_ids"] == [2, 1, 0]
    with pytest.raises(FreezecacheError, match="has 'Ring', .* .did you mean 'ring'"):
        prep(root, tmp_path / "bad", bad_images="skip", classes=["Ring"])
    with pytest.raises(FreezecacheError) as err:  # with error: the bad files too, at once
        prep(root, tmp_path / "bad", classes=["Ring"])
    assert "3 files cannot be used" in str(err.value) and "did you mean 'ring'" in str(err.value)


def test_a_class_too_small_for_the_splits_is_listed_with_the_bad_files(tmp_path):
    root = _folder(tmp_path / "pool", {"": {"big": 12, "tiny": 2}})
    (root / "big" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20))
    with pytest.raises(FreezecacheError) as err:
        prep(root, tmp_path / "out", val_size=4, test_fraction=0.25)
    text = str(err.value)
    assert "big/broken.png: " in text
    assert (
        "class 'tiny' has 1 training-pool images and none left to train on (1 to validation, "
        "1 to test)" in text
    )
    assert "lower data.val_size" in text


def test_the_scan_remembers_unchanged_files(tmp_path, monkeypatch):
    root = make_messy_folder(tmp_path / "shapes")
    first = scan_folder(root, tmp_path / "ckpt")
    calls = []
    real = scan_module.check_file
    monkeypatch.setattr(scan_module, "check_file", lambda d, n: calls.append(n) or real(d, n))
    again = scan_folder(root, tmp_path / "ckpt")
    assert calls == [] and again.fingerprint() == first.fingerprint()
    edited = root / "circle" / "img_0000.jpg"
    Image.new("RGB", (50, 50), (9, 9, 9)).save(edited)
    changed = scan_folder(root, tmp_path / "ckpt")
    assert calls == ["circle/img_0000.jpg"] and changed.fingerprint() != first.fingerprint()
    cache = next((tmp_path / "ckpt" / "scan").glob("*.json"))
    assert json.loads(cache.read_text())["version"] == 1
