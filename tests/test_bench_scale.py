"""`make bench-scale`: bad sizes are refused in one line before anything runs or is written; the
page, the CSV the lead chart draws and the ratio against the goal, from a synthetic result."""

import csv
import io
import sys

import pytest

import bench_scale as scale
from conftest import ROOT, load_profile, needs_fashion, run
from freezecache.config import parse_config
from freezecache.core.errors import FreezecacheError


def _cfg(**data):
    raw = load_profile("default")
    raw["data"].update(data)
    return parse_config(raw)


def test_sizes_are_parsed_sorted_and_once():
    assert scale.parse_sizes("4000, 2000,4000") == [2000, 4000]
    with pytest.raises(FreezecacheError, match="integers separated by commas"):
        scale.parse_sizes("2k,4k")
    with pytest.raises(FreezecacheError, match="at least one"):
        scale.parse_sizes(" , ")


def test_each_limit_is_named():
    cfg = _cfg()
    scale.check_sizes(cfg, [64, 29000], pool=29000)
    with pytest.raises(FreezecacheError, match=r"--sizes 32 is smaller than one batch \(train"):
        scale.check_sizes(cfg, [32, 4000], pool=29000)
    with pytest.raises(FreezecacheError, match="--sizes 30000 is more than the 29000 training"):
        scale.check_sizes(cfg, [4000, 30000], pool=29000)


@needs_fashion
def test_the_pool_is_the_classes_training_images_less_the_validation_split():
    assert scale.training_pool(_cfg()) == 30000 - 1000  # classes 5-9: 6000 training images each
    assert scale.training_pool(_cfg(classes=[5], val_size=500)) == 6000 - 500


@needs_fashion
@pytest.mark.parametrize(
    "sizes,limit", [("4000,40000", "at most 29000"), ("16,4000", "at least 64")]
)
def test_bad_sizes_exit_with_one_line_and_write_nothing(tmp_path, sizes, limit):
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [sys.executable, str(ROOT / "benchmarks/bench_scale.py"), "--sizes", sizes]
    done = run([*cmd, "--out", str(out), "--workdir", str(work)], ROOT, check=False)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: --sizes") and limit in errors[0]
    assert "Traceback" not in done.stderr
    assert not out.exists() and not work.exists()


def _time(wall: float, epoch: float) -> dict:
    return {"wall_s": wall, "epochs": 7, "epoch_s": epoch, "one_off_s": wall - 7 * epoch}


def _result() -> dict:
    """Two sizes; at the larger Discard & Aug. takes 0.85 of FreezeOut's time."""
    rows = []
    for n, fo, d, da in ((2000, 20.0, 24.0, 24.5), (25000, 200.0, 168.0, 170.0)):
        measured = {
            "freezeout": _time(fo, fo / 8),
            "discard": _time(d, d / 9),
            "discard_aug": _time(da, da / 9),
        }
        rows.append({
            "train_size": n, "block": 3, "epochs_after": 7, "measured": measured,
            "predicted_s": {"freezeout": fo * 1.1, "discard": d * 0.9, "discard_aug": da},
            "break_even": {m: {"measured": 5.0, "predicted": None} for m in ("discard",
                                                                             "discard_aug")},
            "load_avg_1m": {m: 0.5 for m in measured},
        })  # fmt: skip
    machine = {"cpu": "a CPU", "cpu_count": 2, "device": "cpu", "torch": "2",
               "load_avg_1m": 0.1, "load_avg_1m_end": 0.2}  # fmt: skip
    setup = {"model": "resnet20", "dataset": "fashion_mnist", "classes": [5, 6, 7, 8, 9],
             "val_size": 1000, "epochs": 8, "points": [{"block": 3, "epoch": 1}], "seed": 0,
             "methods": ["freezeout", "discard", "discard_aug"], "weights": "w"}  # fmt: skip
    return {"machine": machine, "setup": setup, "sizes": rows, "minutes": 12.0,
            "goal": {"method": "discard_aug", "vs": "freezeout", "at_most": 0.9}}  # fmt: skip


def test_the_page_has_a_row_per_size_and_the_ratio_against_the_goal():
    text = scale.markdown(_result())
    assert text.count("\n| 2000 |") == 1 and text.count("\n| 25000 |") == 1
    assert "| 25000 | 200.0 | 220.0 | 168.0 | 151.2 | 170.0 | 170.0 | 0.840 | 0.850 |" in text
    assert "| 5.0 / never |" in text
    assert "Ours w/ Discard & Aug. takes 0.850 of FreezeOut's wall time" in text
    assert "(goal <= 0.90: met)" in text
    assert "![Wall time after the shared run against the training-set size]" in text


def test_the_csv_has_a_measured_and_a_predicted_row_per_size_and_method():
    rows = list(csv.DictReader(io.StringIO(scale.to_csv(_result()))))
    assert len(rows) == 2 * 3 * 2
    assert {r["kind"] for r in rows} == {"measured", "predicted (plan)"}
    fo = [r for r in rows if r["method"] == "FreezeOut" and r["kind"] == "measured"]
    assert [(int(r["train_size"]), float(r["wall_s"])) for r in fo] == [
        (2000, 20.0),
        (25000, 200.0),
    ]
    spec = scale.chart_spec(_result())
    assert len(spec["data"]["values"]) == len(rows) and len(spec["layer"]) == 2
