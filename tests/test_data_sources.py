"""What the check stage records of the datasets: the fingerprint DVC compares, so an edited,
added or removed image (or a replaced archive) reruns prepare, and a Finder's .DS_Store does
not; an image folder's problems stop the check, every one listed."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from conftest import load_profile
from fake_datasets import MESSY_BAD, make_cifar10, make_messy_folder
from freezecache.config import parse_config
from freezecache.core.errors import FreezecacheError
from freezecache.pipeline import STAGES
from freezecache.steps.sources import write_sources


def _cfg(tmp_path, **data):
    raw = load_profile("smoke")
    raw["paths"] = {k: str(tmp_path / k) for k in raw["paths"]}
    raw["pretrain"] = None
    sizes = {"classes": None, "train_size": None, "val_size": None, "test_size": None}
    raw["data"].update({**sizes, **data})
    return parse_config(raw)


def _fingerprint(cfg) -> str:
    write_sources(cfg)
    return json.loads(STAGES["check"].path("data_source", cfg).read_text())["fingerprint"]


def test_an_image_folder_record_follows_its_images(tmp_path):
    root = make_messy_folder(tmp_path / "shapes")
    cfg = _cfg(tmp_path, name="imagefolder", root=str(root), bad_images="skip")
    first = _fingerprint(cfg)
    record = json.loads(STAGES["check"].path("data_source", cfg).read_text())
    assert [s["file"] for s in record["skipped"]] == sorted(MESSY_BAD)
    assert record["classes"][1] == "plus sign" and record["layout"] == "classes"
    assert json.loads(STAGES["check"].path("pretrain_source", cfg).read_text()) is None
    assert _fingerprint(cfg) == first
    (root / "circle" / ".DS_Store").write_bytes(b"Bud1" + bytes(40))  # ignored: nothing changes
    assert _fingerprint(cfg) == first
    seen = {first}
    image = root / "square" / "img_0000.jpg"
    Image.new("RGB", (60, 60), (5, 5, 5)).save(image)  # edited
    seen.add(_fingerprint(cfg))
    Image.new("RGB", (60, 60), (5, 5, 5)).save(root / "square" / "new.png")  # added
    seen.add(_fingerprint(cfg))
    image.unlink()  # removed
    seen.add(_fingerprint(cfg))
    assert len(seen) == 4


def test_a_bad_folder_stops_the_check_listing_every_problem(tmp_path):
    root = make_messy_folder(tmp_path / "shapes")
    cfg = _cfg(tmp_path, name="imagefolder", root=str(root), val_size=24)  # of 25 in the pool
    with pytest.raises(FreezecacheError) as err:
        write_sources(cfg)
    lines = str(err.value).splitlines()
    assert lines[0].startswith("data: ") and "3 files cannot be used" in lines[0]
    assert sum(any(n in line for line in lines) for n in MESSY_BAD) == 3
    assert sum("training-pool images and none left to train on" in line for line in lines) == 4
    assert not STAGES["check"].path("data_source", cfg).exists()


def test_an_archive_record_follows_the_archive(tmp_path):
    path, _ = make_cifar10(tmp_path / "c10")
    cfg = _cfg(tmp_path, name="cifar10", root=str(path.parent), img_size=32)
    first = _fingerprint(cfg)
    assert _fingerprint(cfg) == first
    path.write_bytes(path.read_bytes() + b"\0")  # a different archive
    assert _fingerprint(cfg) != first
    gone = _cfg(tmp_path, name="cifar10", root=str(tmp_path / "none"), download=True)
    assert _fingerprint(gone) is None  # prepare downloads it; the next check fingerprints it
    with pytest.raises(FreezecacheError, match="holds no cifar-10-python.tar.gz"):
        write_sources(_cfg(tmp_path, name="cifar10", root=str(tmp_path / "none")))
