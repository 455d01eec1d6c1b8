"""The paper-style report from fixture metrics, and the README sections it regenerates."""

import csv
import json
import re

import numpy as np
import pytest

from conftest import load_profile
from freezecache.accounting.stats import pack_correct
from freezecache.config import parse_config
from freezecache.core.errors import FreezecacheError
from freezecache.core.records import COSTS_VERSION
from freezecache.pipeline import STAGES
from freezecache.reporting.report import README_MARK, update_readme, write_report
from freezecache.training.train import RunState

ACC = {
    "normal": [0.90, 0.92],
    "freezeout": [0.89, 0.91],
    "discard": [0.88, 0.90],
    "discard_aug": [0.89, 0.89],
}
MEM = {
    "normal": (100.0, 100.0),
    "freezeout": (70.0, 40.0),
    "discard": (60.0, 20.0),
    "discard_aug": (60.0, 20.0),
}


def _states(method: str, low: float) -> list[dict]:
    """Smoke schedule: 3 epochs, points at epochs 1 and 2."""
    if method == "normal":
        return [{"state": "full", "position": 0, "epochs": 3, "accounted_memory_mb": low}]
    kind = "freeze" if method == "freezeout" else "discard"
    return [
        {"state": s, "position": p, "epochs": 1, "accounted_memory_mb": mb, "cache_in_ram_mb": ram}
        for s, p, mb, ram in (("full", 0, 100.0, 0.0), (kind, 2, 50.0, 1.0), (kind, 5, low, 2.0))
    ]


def _state(path, acc: float, seed: int) -> None:
    """A final run state with per-image correctness at accuracy ``acc`` on 400 images, the
    same images wrong for every method at a seed, up to its accuracy (nested: a known gap)."""
    rank = np.random.default_rng(seed).permutation(400)
    correct = rank < round(acc * 400)
    test = {"test_acc": acc, "correct": pack_correct(correct), "images": 400}
    RunState(model={}, extra={"test": test}).save(path)


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


NAMES = ["circle", "plus sign", "ring", "square", "triangle"]
TEST_LABELS = np.arange(400) % 5  # 80 test images per class


def _prepared(folder) -> None:
    """A prepared folder as the report reads it: meta.json and the test labels (a class with
    no validation images)."""
    folder.mkdir(parents=True, exist_ok=True)
    counts = {"train": [10] * 5, "val": [2, 2, 0, 2, 2], "test": [80] * 5}
    skipped = [{"file": "ring/empty.jpg", "reason": "empty (0 bytes)"}]
    meta = {"classes": NAMES, "class_counts": counts, "img_size": 28, "channels": 1,
            "skipped": skipped}  # fmt: skip
    (folder / "meta.json").write_text(json.dumps(meta))
    np.savez(folder / "test.npz", images=np.zeros((400, 1, 1, 1), np.uint8), labels=TEST_LABELS)


def _fixture(tmp_path, name: str = "fashion_mnist"):
    raw = load_profile("smoke")
    raw["paths"] = {k: str(tmp_path / k) for k in raw["paths"]}
    raw["seeds"] = [0, 1]
    raw["data"]["name"] = name
    cfg = parse_config(raw)
    _prepared(STAGES["prepare"].path("data", cfg))
    for i, seed in enumerate(cfg.seeds):
        _write(
            STAGES["train_prefix"].path("costs", cfg, seed=seed),
            {"stage_wall_s": 4.0, "peak_rss_mb": 900.0, "version": COSTS_VERSION},
        )
        first = cfg.points[0]
        decision = {"block": first.block, "epoch": first.epoch, "why": "freeze.points"}
        _write(STAGES["train_prefix"].path("decision", cfg, seed=seed), decision)
        for m in cfg.methods.all:
            item = {"seed": seed, "method": m}
            if m in cfg.methods.baselines:
                folder = STAGES["baseline"].path("state", cfg, **item).parent
            else:
                folder = STAGES["train_suffix"].path("state", cfg, **item, p=cfg.points[-1]).parent
            _write(folder / "live/metrics.json", {"test_acc": ACC[m][i], "step": 3})
            _state(folder / "state.pt", ACC[m][i], seed)
            tsv = folder / "live/plots/metrics/val_acc.tsv"
            tsv.parent.mkdir(parents=True, exist_ok=True)
            tsv.write_text("step\tval_acc\n1\t0.5\n2\t0.6\n3\t" + str(ACC[m][i]) + "\n")
            avg, low = MEM[m]
            costs = {
                "avg_memory_mb": avg,
                "min_memory_mb": low,
                "train_flops": 1e12 * avg / 100,
                "states": _states(m, low),
                "stage_wall_s": 10.0,
                "peak_rss_mb": 1000.0 + i,
                "version": COSTS_VERSION,
                # the baseline trains 2 epochs after the prefix, each discard point 1
                "timings": {"epochs": 1, "train_s": 2.0, "validation_s": 0.25}
                if m in cfg.methods.discard
                else {"epochs": 2, "train_s": 6.0, "validation_s": 1.0},
            }
            _write(folder / "costs.json", costs)
            if m in cfg.methods.discard:
                _write(STAGES["train_suffix"].path("costs", cfg, **item, p=cfg.points[0]), costs)
                for k, p in enumerate(cfg.points, start=1):
                    stats = {
                        "point": k,
                        "stage_wall_s": 2.0,
                        "peak_rss_mb": 800.0,
                        "block": p.block,
                        "codec": "zfp",
                        "tolerance": 0.01,
                        "chunk_size": 1,
                        "compression_ratio": 0.2 * k,
                        "max_abs_error": 0.004,
                        "encode_mb_s": 100.0,
                        "decode_mb_s": 300.0,
                        "stored_bytes": 2e6,
                        "stored_channels": 4,
                    }
                    _write(STAGES["cache"].path("stats", cfg, **item, p=p), stats)
    return cfg


def test_report_json_shape_and_statistics(tmp_path):
    cfg = _fixture(tmp_path)
    report = write_report(cfg)
    on_disk = json.loads((tmp_path / "results/report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    normal = report["methods"]["normal"]
    assert normal["accuracy_mean"] == pytest.approx(91.0)
    assert normal["accuracy_std"] == pytest.approx(1.4142, abs=1e-3)  # sample std over seeds
    for m, r in report["methods"].items():
        for key in (
            "accuracy_mean",
            "accuracy_std",
            "avg_memory_mb",
            "min_memory_mb",
            "train_flops",
            "wall_time_s",
        ):
            assert key in r, (m, key)
    # every stage process of the method: the shared prefix, two suffixes, two cache builds
    assert report["methods"]["discard"]["wall_time_s"] == pytest.approx(4.0 + 2 * 10.0 + 2 * 2.0)
    assert report["methods"]["normal"]["wall_time_s"] == pytest.approx(4.0 + 10.0)
    # the whole run, each stage once: per seed the prefix, 2 baselines, 2 x (2 suffixes, 2 caches)
    assert report["stage_seconds"] == pytest.approx(2 * (4.0 + 2 * 10.0 + 2 * (2 * 10.0 + 2 * 2.0)))
    assert report["methods"]["discard"]["peak_rss_mb"] == 1001.0
    # accounted memory plus each point's cache held in RAM (1 MB at block 2, 2 MB at block 5)
    assert report["methods"]["discard"]["avg_host_memory_mb"] == pytest.approx((100 + 51 + 22) / 3)
    assert report["methods"]["discard"]["min_host_memory_mb"] == pytest.approx(22.0)
    # paired per seed: discard - normal = -2.0 and -2.0
    assert report["methods"]["discard"]["gap_to_normal"] == pytest.approx(-2.0)
    assert report["methods"]["discard"]["gap_to_normal_std"] == pytest.approx(0.0, abs=1e-9)
    # Discard lost 2 points, Discard & Aug. won back 0 of them on average
    assert report["summary"]["discard_gap_won_back"] == pytest.approx(0.0, abs=1e-9)
    assert len(report["cache"]) == 4
    memory = (tmp_path / "results/memory.csv").read_text().splitlines()
    assert memory[0] == "epoch,method,memory_mb"
    assert (
        "3,normal,100.0" in memory and "3,discard,20.0" in memory and "2,freezeout,50.0" in memory
    )
    curves = _table(tmp_path / "results/curves.csv")
    assert list(curves[0]) == ["epoch", "method", "val_acc", "val_acc_std", "seeds"]
    assert len(curves) == 3 * 4  # epochs x methods
    last = next(r for r in curves if (r["epoch"], r["method"]) == ("3", "normal"))
    assert float(last["val_acc"]) == pytest.approx(0.91) and last["seeds"] == "2"
    assert float(last["val_acc_std"]) == pytest.approx(0.01414, abs=1e-4)  # 0.90 and 0.92
    first = next(r for r in curves if (r["epoch"], r["method"]) == ("1", "normal"))
    assert float(first["val_acc_std"]) == 0.0  # both seeds 0.5
    headline = json.loads((tmp_path / "results/metrics.json").read_text())
    assert headline["acc"]["normal"] == pytest.approx(91.0)
    assert headline["flops_saved"]["discard"] == pytest.approx(0.4)
    assert all(
        isinstance(v, float) for d in headline.values() if isinstance(d, dict) for v in d.values()
    )
    assert (tmp_path / "results/cache.csv").read_text().startswith("method,point,block,tolerance,")
    for key in (
        "point",
        "tolerance",
        "compression_ratio",
        "max_abs_error",
        "compress_mb_s",
    ):
        assert key in report["cache"][0]


def _table(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_summary_csv_has_one_row_per_method_for_the_lead_plots(tmp_path):
    cfg = _fixture(tmp_path)
    write_report(cfg)
    rows = {r["method"]: r for r in _table(tmp_path / "results/summary.csv")}
    assert list(rows) == cfg.methods.all
    columns = ["method", "label", "seeds", "test_acc", "test_acc_std", "wall_time_s",
               "wall_time_s_std", "train_flops"]  # fmt: skip
    assert all(list(r) == columns for r in rows.values())
    normal, discard = rows["normal"], rows["discard"]
    assert normal["label"] == "Normal" and normal["seeds"] == "2"
    assert float(normal["test_acc"]) == pytest.approx(91.0)
    assert float(normal["test_acc_std"]) == pytest.approx(1.4142, abs=1e-3)
    assert float(discard["test_acc"]) == pytest.approx(89.0)
    # the prefix run, two suffixes and two cache builds; every seed took as long
    assert float(discard["wall_time_s"]) == pytest.approx(4.0 + 2 * 10.0 + 2 * 2.0)
    assert float(discard["wall_time_s_std"]) == 0.0
    assert float(discard["train_flops"]) == pytest.approx(0.6e12)


def test_one_seed_has_a_zero_spread(tmp_path):
    cfg = _fixture(tmp_path)
    cfg = cfg.model_copy(update={"seeds": [0]})
    write_report(cfg)
    summary = _table(tmp_path / "results/summary.csv")
    assert {r["seeds"] for r in summary} == {"1"}
    assert {float(r["test_acc_std"]) for r in summary} == {0.0}
    assert {float(r["val_acc_std"]) for r in _table(tmp_path / "results/curves.csv")} == {0.0}


def test_report_markdown_has_savings_against_normal(tmp_path):
    write_report(_fixture(tmp_path))
    text = (tmp_path / "results/report.md").read_text()
    assert "| Normal | 91.00 ± 1.41 | – | –0" not in text
    interval = r"\[[+-]\d\.\d\d, [+-]\d\.\d\d\]"
    assert re.search(rf"\| Normal \| 91\.00 ± 1\.41 \| – \| \+1\.00 {interval} \| 100\.0 \|", text)
    assert re.search(
        rf"\| Ours w/ Discard \| 89\.00 ± 1\.41 \| -2\.00 {interval} \| -1\.00 {interval} \| "
        r"60\.0 \(-40\.0%\) \| 20\.0 \(-80\.0%\) \|",
        text,
    )
    # 2 of 100 images right for Normal only, at both seeds: an interval clear of 0
    assert "Ours w/ Discard against Normal -2.00 points (significant)" in text
    # one-off 24 - 4.5 = 19.5 s against FreezeOut's 10 - 7 = 3 s; 3.5 - 2.25 s saved per epoch
    assert "overtakes FreezeOut after 13.2 epochs from the freeze point" in text
    assert "| Ours w/ Discard & Aug. | 2 (5) | zfp | 0.01 | 0.400 | 2.0 |" in text
    assert "wins back 0% of Discard's gap" in text


def test_the_report_names_the_classes_and_gives_accuracy_per_class(tmp_path):
    cfg = _fixture(tmp_path, "imagefolder")
    report = write_report(cfg)
    assert report["class_names"] == NAMES
    for m in cfg.methods.all:  # every seed's per-image hits, averaged within each class
        correct = np.stack(
            [np.random.default_rng(s).permutation(400) < round(ACC[m][i] * 400)
             for i, s in enumerate(cfg.seeds)]
        ).mean(axis=0)  # fmt: skip
        expected = [100 * correct[TEST_LABELS == c].mean() for c in range(5)]
        assert report["per_class_accuracy"][m] == pytest.approx(expected), m
    assert report["data_warnings"] == [
        "class 'ring' has no validation images: its validation accuracy is not measured"
    ]
    text = (tmp_path / "results/report.md").read_text()
    assert "on imagefolder (5 classes: circle, plus sign, ring, square, triangle)" in text
    assert "| Class | Test images | Normal | FreezeOut |" in text
    row = " | ".join(f"{report['per_class_accuracy'][m][1]:.1f}" for m in cfg.methods.all)
    assert f"| plus sign | 80 | {row} |" in text
    assert "**Warning:** class 'ring' has no validation images" in text
    assert "Skipped 1 files that could not be used (data.bad_images: skip): ring/empty.jpg" in text


def test_a_flip_repair_that_stored_nothing_is_said_to_be_discard(tmp_path):
    cfg = _fixture(tmp_path)
    write_report(cfg)
    assert "stores no flipped channels" not in (tmp_path / "results/report.md").read_text()
    for seed in cfg.seeds:  # what the cache stage records with train.flip_p 0
        for p in cfg.points:
            path = STAGES["cache"].path("stats", cfg, seed=seed, method="discard_aug", p=p)
            stats = json.loads(path.read_text())
            _write(path, {**stats, "stored_channels": 0, "stores_flips": False})
    report = write_report(cfg)
    assert {c["stores_flips"] for c in report["cache"] if c["method"] == "discard_aug"} == {False}
    text = (tmp_path / "results/report.md").read_text()
    assert "Ours w/ Discard & Aug. stores no flipped channels or tokens here" in text
    assert "Its cache is Ours w/ Discard's" in text and text.count("stores no flipped") == 1


def test_a_steady_epoch_is_the_median_and_the_first_one_s_warm_up_is_one_off(tmp_path):
    from freezecache.accounting.wall import method_time

    cfg = _fixture(tmp_path)
    before = method_time(cfg, 0, "freezeout")  # records without a median: the mean
    assert before["epoch_s"] == pytest.approx((6.0 + 1.0) / 2)
    path = STAGES["baseline"].path("costs", cfg, seed=0, method="freezeout")
    costs = json.loads(path.read_text())
    costs["timings"]["epoch_median_s"] = 2.5  # epochs of 3.5 and 2.5 s: 1 s of warm-up
    _write(path, costs)
    after = method_time(cfg, 0, "freezeout")
    assert after["epoch_s"] == pytest.approx((2 * 2.5 + 1.0) / 2)
    assert after["one_off_s"] == pytest.approx(before["one_off_s"] + 1.0)
    assert after["wall_s"] == before["wall_s"]


def test_missing_metrics_is_a_clear_error(tmp_path):
    cfg = _fixture(tmp_path)
    (tmp_path / "runs/s1/freezeout/live/metrics.json").unlink()
    with pytest.raises(FreezecacheError, match="runs/s1/freezeout/live/metrics.json: missing"):
        write_report(cfg)


def test_update_readme_replaces_only_the_marked_sections(tmp_path):
    begin, end = (README_MARK.format(name="results", edge=e) for e in ("start", "end"))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{begin}\nold table\n{end}\noutro\n")
    source = tmp_path / "report.md"
    source.write_text("new table\n")
    update_readme({"results": source}, readme)
    assert readme.read_text() == f"intro\n{begin}\nnew table\n{end}\noutro\n"
    with pytest.raises(FreezecacheError, match="no bench markers"):
        update_readme({"bench": source}, readme)
    update_readme({"results": tmp_path / "absent.md"}, readme)
    assert "Not measured in this revision" in readme.read_text()


@pytest.mark.parametrize(
    "gap,std,words",
    [(0.75, 0.35, "flips hurt"), (-1.0, 0.2, "flips help"), (0.1, 0.3, "no measurable")],
)
def test_the_flip_control_is_read_out_in_words(gap, std, words):
    from freezecache.reporting.markdown import _flip_lines

    lines = _flip_lines({"normal_noflip": {"gap_to_normal": gap, "gap_to_normal_std": std}})
    assert words in lines[-1] and f"{gap:+.2f} ± {std:.2f}" in lines[-1]
    assert _flip_lines({"normal": {}}) == []
