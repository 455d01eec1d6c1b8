"""Tests for freezecache.data.prepared: the prepared folder, its meta, validation sets."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import needs_fashion
from fake_datasets import (
    make_cifar10,
    make_fashion,
    make_imagefolder,
    make_unique_fashion,
    write_idx,
)
from freezecache.core.errors import FreezecacheError
from freezecache.data import load_prepared, load_val, prepare, prepared


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
    assert meta["class_ids"] == list(range(10)) and meta["val_size"] == 0
    assert load_val(out) is None
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_the_prepared_folder_gets_the_mode_of_other_outputs(tmp_path: Path) -> None:
    """Not mkdtemp's 0700: the umask's mode, as the other outputs and a plain mkdir get."""
    import os

    root = make_fashion(tmp_path / "fm")
    out = tmp_path / "prepared" / "fm"
    run_prepare(root, out)
    (tmp_path / "plain").mkdir()
    mask = os.umask(0o027)  # a umask the folder must follow, whatever this machine's is
    try:
        run_prepare(root, tmp_path / "masked")
    finally:
        os.umask(mask)
    assert out.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
    assert (tmp_path / "masked").stat().st_mode & 0o777 == 0o750


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

    monkeypatch.setattr(prepared, "_write_meta", broken)
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


# --- validation sets --------------------------------------------------------------------------


def sample_ids(split) -> set[int]:
    """Which source images a split holds (make_unique_fashion writes the index at (0, 0))."""
    return set(split.images[:, 0, 0, 0].tolist())


def test_val_is_disjoint_stratified_and_leaves_train_and_test_alone(tmp_path: Path) -> None:
    root = make_unique_fashion(tmp_path / "fm", n_train=60, n_test=30)
    args = dict(img_size=28, train_size=30, test_size=20)
    meta = run_prepare(root, tmp_path / "v", val_size=20, **args)
    plain = run_prepare(root, tmp_path / "p", **args)
    out = tmp_path / "v"
    assert sorted(p.name for p in out.iterdir()) == [
        "meta.json",
        "test.npz",
        "train.npz",
        "val.npz",
    ]
    train, test, loaded = load_prepared(out)
    val = load_val(out)
    assert loaded == meta and meta["val_size"] == 20 and len(val) == 20
    np.testing.assert_array_equal(np.bincount(val.labels), [2] * 10)
    assert not sample_ids(train) & sample_ids(val)
    # labels still match the images: value 10 * label + 5 away from pixel (0, 0)
    np.testing.assert_array_equal(val.images[:, 0, 5, 5], val.labels * 10 + 5)
    for part in ("train.npz", "test.npz"):
        assert (out / part).read_bytes() == (tmp_path / "p" / part).read_bytes()
    differ = ("val_size", "class_counts")
    assert {k: v for k, v in meta.items() if k not in differ} == {
        k: v for k, v in plain.items() if k not in differ
    }  # mean/std come from train only
    assert meta["class_counts"]["val"] == [2] * 10 and "val" not in plain["class_counts"]
    again = run_prepare(root, tmp_path / "again", val_size=20, **args)
    assert (tmp_path / "again" / "val.npz").read_bytes() == (out / "val.npz").read_bytes()
    assert again == meta


def test_val_with_every_training_image(tmp_path: Path) -> None:
    root = make_unique_fashion(tmp_path / "fm", n_train=60)
    meta = run_prepare(root, tmp_path / "out", img_size=28, train_size=None, val_size=10)
    train, _, _ = load_prepared(tmp_path / "out")
    val = load_val(tmp_path / "out")
    assert (meta["train_size"], meta["val_size"]) == (50, 10)
    assert sample_ids(train) | sample_ids(val) == set(range(60))
    assert not sample_ids(train) & sample_ids(val)


def test_val_errors(tmp_path: Path) -> None:
    root = make_fashion(tmp_path / "fm")  # 40 training images
    with pytest.raises(FreezecacheError, match="data.val_size must be a positive integer"):
        run_prepare(root, tmp_path / "out", val_size=0)
    with pytest.raises(FreezecacheError, match="data.val_size 30 is more than the 20"):
        run_prepare(root, tmp_path / "out", train_size=20, val_size=30)
    assert not (tmp_path / "out").exists()
    run_prepare(root, tmp_path / "out", val_size=5)
    (tmp_path / "out" / "val.npz").unlink()
    with pytest.raises(FreezecacheError, match="val.npz is missing"):
        load_val(tmp_path / "out")


# --- the call without the new options writes what it wrote before them -----------------------

# md5 of train.npz, test.npz written by the code before class subsets and validation sets
# (commit 697c06a) for the calls below; the committed results were trained on such files.
BEFORE = {
    "fashion_mnist": ("9d086ce54f753a61e5cdda4c283b8b52", "678b466173386c11947d52ae76f92315"),
    "cifar10": ("cb3ce3aef549efc816303f224b1e463e", "c9eb0e7b56507dfa9c4f7dd205708583"),
    "imagefolder": ("f2c236a414f578076cc7e698b8142b9b", "f2c236a414f578076cc7e698b8142b9b"),
}
# data/prepared of the default profile behind dvc.lock at 697c06a (its .dir md5 400e504a...)
BEFORE_DEFAULT = ("6b4458d4c4cde78a1477f0208fb3fe6e", "35d6bf7370ff030b58045f4e9a05b866")


def md5s(out: Path) -> tuple[str, str]:
    return tuple(hashlib.md5((out / f).read_bytes()).hexdigest() for f in ("train.npz", "test.npz"))


def test_old_call_writes_the_same_bytes(tmp_path: Path) -> None:
    roots = {
        "fashion_mnist": make_fashion(tmp_path / "fm"),
        "cifar10": make_cifar10(tmp_path / "c10")[0],
        "imagefolder": make_imagefolder(tmp_path / "if", ((20, 20), (40, 30))),
    }
    for name, root in roots.items():
        out = tmp_path / f"out_{name}"
        # resize "pad" is what prepare did before data.resize (the new default, crop, resizes
        # the shorter side as timm does: other bytes for images not already img_size)
        prepare(name, root, out, img_size=16, channels=None, train_size=7, test_size=5, seed=3,
                resize="pad")  # fmt: skip
        assert md5s(out) == BEFORE[name], name


@needs_fashion
def test_default_profile_data_is_unchanged(tmp_path: Path) -> None:
    prepare("fashion_mnist", None, tmp_path / "out", img_size=28, channels=None,
            train_size=12000, test_size=10000, seed=0)  # fmt: skip
    assert md5s(tmp_path / "out") == BEFORE_DEFAULT
