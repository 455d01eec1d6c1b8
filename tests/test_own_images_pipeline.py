"""Your own images under real DVC: a messy folder runs end to end on the smoke shape with
data.bad_images: skip; with error the run stops once, at check, listing every bad file; an
edited, added or removed image makes prepare and what follows stale, and nothing else (shown
by `dvc status` after prepare reran: the stages `dvc repro` would run next; running them all
again would double the test's time for what DVC itself guarantees)."""

import json
import re

import pytest
import yaml
from PIL import Image

from conftest import load_profile, project_copy, run
from fake_datasets import MESSY_BAD, make_messy_folder

DATA_STAGES = {"check", "prepare", "plan", "train_prefix@0", "baseline@0-normal", "tradeoffs",
               "cache@0-discard-p0", "train_suffix@0-discard-p0", "report"}  # fmt: skip


def _ran(out: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", out))


def _status(repo) -> set[str]:
    return set(json.loads(run(["dvc", "status", "--json"], repo).stdout or "{}"))


def _params(root) -> dict:
    """The smoke profile's shape, lean: one baseline, one discard method, one freeze point."""
    raw = load_profile("smoke")
    raw["data"] = {**raw["data"], "name": "imagefolder", "root": str(root), "classes": None,
                   "img_size": 32, "channels": 3, "train_size": None, "val_size": 5,
                   "test_size": None, "bad_images": "skip"}  # fmt: skip
    raw["pretrain"] = None
    raw["methods"] = {"baselines": ["normal"], "discard": ["discard"]}
    raw["train"]["epochs"] = 2
    raw["freeze"]["points"] = [{"block": 2, "epoch": 1}]
    raw["rank"]["samples"] = 16
    return raw


@pytest.mark.slow
@pytest.mark.extended  # the image folder's whole pipeline of its own
def test_a_messy_folder_end_to_end_and_what_reruns_when_an_image_changes(tmp_path):
    root = make_messy_folder(tmp_path / "shapes")
    repo = project_copy(tmp_path / "repo")
    (repo / "params.yaml").write_text(yaml.safe_dump(_params(root), sort_keys=False))
    run("git init -q && git config user.email ci@example.com && git config user.name ci", repo)
    run(["freezecache", "pipeline"], repo)
    run("git add -A && git commit -qm shapes", repo)

    out = run(["dvc", "repro"], repo).stdout
    assert _ran(out) >= DATA_STAGES | {"pretrain"}
    report = json.loads((repo / "results/report.json").read_text())
    assert report["class_names"] == ["circle", "plus sign", "ring", "square", "triangle"]
    assert [s["file"] for s in report["skipped_files"]] == sorted(MESSY_BAD)
    assert set(report["per_class_accuracy"]) == {"normal", "discard"}
    assert "(5 classes: circle, plus sign" in (repo / "results/report.md").read_text()
    run("git add -A && git commit -qm ran", repo)
    assert _ran(run(["dvc", "repro"], repo).stdout) == {"check"}  # it fingerprints, no more

    # DVC sees the folder through check's record: after `freezecache check`, status says so
    image = root / "triangle" / "img_0000.jpg"
    Image.new("RGB", (80, 60), (0, 0, 0)).save(image)
    assert _status(repo) == {"check"}  # always changed: it runs on every repro
    run(["freezecache", "check"], repo)
    assert "prepare" in _status(repo)
    assert _ran(run(["dvc", "repro", "prepare"], repo).stdout) == {"check", "prepare"}
    # what is stale now is what follows prepare, and nothing else (not pretrain: its data did
    # not change); `dvc repro` would run exactly these (status = what repro runs)
    assert _status(repo) == DATA_STAGES - {"prepare"}, _status(repo)
    run(["dvc", "commit", "-f", "-q"], repo)  # the lock takes the new state: the next change
    for change in ("add", "remove", "junk"):
        if change == "add":
            Image.new("RGB", (50, 50), (1, 1, 1)).save(root / "ring" / "new.png")
        elif change == "remove":
            (root / "ring" / "new.png").unlink()
            image.unlink()
        else:  # a hidden file is ignored: nothing to rerun
            (root / "ring" / ".DS_Store").write_bytes(b"Bud1" + bytes(40))
        run(["freezecache", "check"], repo)
        assert ("prepare" in _status(repo)) == (change != "junk"), change
        run(["dvc", "commit", "-f", "-q"], repo)

    # error: the run stops once, at check, every bad file listed, every output still there
    mine = {"runs/params.ok", "runs/sources/data.json", "runs/sources/pretrain.json"}  # check's
    before = {p for p in (repo / "runs").rglob("*") if p.is_file()}
    before = {p for p in before if p.relative_to(repo).as_posix() not in mine}
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["data"]["bad_images"] = "error"
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    done = run(["dvc", "repro"], repo, check=False)
    said = done.stdout + done.stderr
    assert done.returncode != 0 and "Traceback" not in said
    assert "3 files cannot be used" in said and all(n in said for n in MESSY_BAD)
    assert _ran(done.stdout) == {"check"}
    assert before <= {p for p in (repo / "runs").rglob("*") if p.is_file()}
