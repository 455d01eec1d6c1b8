"""The cache benchmark runs end to end on a tiny setup, writes every measurement, and times the
train_suffix stage's own batch functions (no timing asserted)."""

import csv
import importlib.util
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import _epochs
import benchlib as bench
from conftest import ROOT, load_profile
from freezecache.cache.features import features_for
from freezecache.cache.format import Layout, open_cache
from freezecache.cache.writer import Build, CacheWriter
from freezecache.codecs.registry import make_codec
from freezecache.core.yamlio import dump_yaml
from freezecache.reporting import provenance as prov
from freezecache.steps import suffix

SIZE, TRAIN, VAL, TEST = 12, 96, 32, 40
EPOCHS = {
    "normal", "freezeout", "discard", "discard_aug", "discard_aug, cache file",
    "discard_aug, features in RAM", "discard_aug, compressed in RAM",
    "discard_aug, CachedFeatures in a DataLoader",
}  # fmt: skip


def load_profile_config():
    from freezecache.config import parse_config

    return parse_config(load_profile("smoke"))


def load_script():
    """benchmarks/bench_cache.py as a module (benchmarks/ is not a package)."""
    path = ROOT / "benchmarks" / "bench_cache.py"
    spec = importlib.util.spec_from_file_location("bench_cache", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_prepared(folder) -> None:
    """A prepared folder as `prepare` writes it: smooth uint8 images, 5 classes, a val split."""
    n = TRAIN + VAL + TEST
    g = torch.Generator().manual_seed(0)
    smooth = F.avg_pool2d(torch.rand(n, 1, SIZE, SIZE, generator=g), 3, 1, 1)
    images = (smooth * 255).to(torch.uint8).numpy()
    labels = np.arange(n) % 5
    folder.mkdir(parents=True)
    cuts = {"train": (0, TRAIN), "val": (TRAIN, TRAIN + VAL), "test": (TRAIN + VAL, n)}
    for name, (lo, hi) in cuts.items():
        np.savez(folder / f"{name}.npz", images=images[lo:hi], labels=labels[lo:hi])
    meta = {
        "name": "fashion_mnist",
        "classes": [str(i) for i in range(5)],
        "num_classes": 5,
        "channels": 1,
        "img_size": SIZE,
        "train_size": TRAIN,
        "val_size": VAL,
        "test_size": TEST,
        "mean": [float(images.mean() / 255)],
        "std": [float(images.std() / 255)],
    }
    (folder / "meta.json").write_text(json.dumps(meta))


def tiny_params(root) -> dict:
    """The smoke profile (the default's shape) on the tiny prepared folder, one thread."""
    raw = load_profile("smoke")
    raw["paths"] = {k: str(root / k) for k in raw["paths"]}
    raw["data"].update(img_size=SIZE, train_size=TRAIN, val_size=VAL, test_size=TEST)
    raw["pretrain"] = None
    raw["rank"]["samples"] = 32
    raw["train"]["batch_size"] = 32
    # One thread: two torch threads on a shared 2-core CPU make tiny steps crawl.
    raw["runtime"]["threads"] = 1
    return raw


def spy(monkeypatch, calls: dict, name: str) -> None:
    """Record the calls of ``steps.suffix.<name>`` and pass them through."""
    real = getattr(suffix, name)

    def recorded(*args, **kwargs):
        calls.setdefault(name, []).append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(suffix, name, recorded)


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    """Runs the whole benchmark once on the tiny setup, with the stage functions spied on.

    Returns (bench.json, bench.md text, the recorded calls, bench_breakdown.csv's rows)."""
    root = tmp_path_factory.mktemp("bench")
    params = root / "params.yaml"
    params.write_text(dump_yaml(tiny_params(root)))
    write_prepared(root / "data")
    threads, calls = torch.get_num_threads(), {}
    try:
        with pytest.MonkeyPatch.context() as mp:
            for name in ("cached_features", "suffix_spec"):
                spy(mp, calls, name)
            load_script().main(
                params=params, method=None, repeats=1, warmup_steps=1, codec_samples=64,
                coding_json=root / "missing.json", only_epochs=False, out=None, breakdown_from=None,
            )  # fmt: skip
    finally:
        torch.set_num_threads(threads)  # the bench set the config's threads process-wide
    results = root / "results"
    made = prov.read(prov.sidecar(results / "bench.md"))  # where it came from
    assert set(made["files"]) >= {str(results / n) for n in ("bench.md", "bench.json",
                                                              "bench_breakdown.csv")}  # fmt: skip
    assert "benchmarks/bench_cache.py" in made["code"] and made["params_digest"]
    markdown = (results / "bench.md").read_text()
    with open(results / "bench_breakdown.csv", newline="") as f:
        breakdown = list(csv.DictReader(f))
    return json.loads((results / "bench.json").read_text()), markdown, calls, breakdown


@pytest.mark.slow
def test_the_epochs_only_bench_writes_the_breakdown(tmp_path):
    """`--epochs-only` (what `make gpu-check` runs): every method's epoch, P1 and P2, no codec
    table (so no zfp), into the folder asked for."""
    params = tmp_path / "params.yaml"
    params.write_text(dump_yaml(tiny_params(tmp_path)))
    write_prepared(tmp_path / "data")
    threads = torch.get_num_threads()
    try:
        load_script().main(
            params=params, method=None, repeats=1, warmup_steps=1, codec_samples=64,
            coding_json=tmp_path / "missing.json", only_epochs=True, out=tmp_path / "gpu",
            breakdown_from=None,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    res = json.loads((tmp_path / "gpu/bench_epochs.json").read_text())
    assert set(res["p1_p2"]["breakdown"]["epochs"]) == EPOCHS
    assert res["p1_cache_vs_ram"] > 0 and res["p2_vs_flops_ideal"] > 0 and "codecs" not in res
    text = (tmp_path / "gpu/bench_epochs.md").read_text()
    assert text.startswith("Epoch breakdown on") and "P1 (cache in memory" in text
    assert not (tmp_path / "results/bench.json").exists()


def test_bench_json_has_every_measurement(bench_out):
    res, markdown, _, _ = bench_out
    for key in (
        "p1_cache_vs_ram", "p1_file_cache_vs_ram", "p2_vs_flops_ideal", "p4_build_mb_s",
        "p4_baseline_mb_s",
    ):  # fmt: skip
        assert math.isfinite(res[key]) and res[key] > 0, key
        assert key in markdown
    assert res["setup"]["samples"] == TRAIN and res["setup"]["method"] == "discard_aug"
    assert "trained 1 epoch from the random init" in res["setup"]["weights"]  # no runs/ here
    b = res["p1_p2"]["breakdown"]
    epochs = b["epochs"]
    assert set(epochs) == EPOCHS and all(e["epoch_s"] > 0 for e in epochs.values())
    ratio = (
        epochs["discard_aug, cache file"]["epoch_s"]
        / epochs["discard_aug, features in RAM"]["epoch_s"]
    )
    assert res["p1_file_cache_vs_ram"] == pytest.approx(ratio)
    assert 0 < res["p1_p2"]["suffix_vs_full_flops"] < 1
    assert res["p1_p2"]["p2_cache"] == "codes in memory"  # in_memory auto: a tiny cache fits
    for name in ("discard", "discard_aug"):
        parts = epochs[name]["parts_s"]
        assert parts["forward"] > 0 and parts["backward"] > 0 and parts["read + unpack"] > 0
        assert parts["decode + augment (fused)"] > 0  # the CPU's one pass
        g = b["goals"][name]
        assert g["flops_vs_freezeout"] < 1 and g["epoch_vs_freezeout"] > 0
        assert sum(b["fixed_s"][name].values()) > sum(b["fixed_s"]["freezeout"].values())
    assert "augment" in epochs["normal"]["parts_s"] and epochs["normal"]["validation_s"] > 0
    assert "### Where an epoch goes" in markdown
    # the CSV `make plots` stacks: every setting's parts and validation, adding up to its epoch
    rows = bench_out[3]
    assert {r["setting"] for r in rows} == {b["labels"][n] for n in EPOCHS}
    for name, e in epochs.items():
        mine = [r for r in rows if r["setting"] == b["labels"][name]]
        assert [r["part"] for r in mine] == [*e["parts_s"], "validation"]
        total = sum(float(r["seconds"]) for r in mine)
        assert total == pytest.approx(sum(e["parts_s"].values()) + e["validation_s"])
    assert set(res["p4_build_mb_s_by_setting"]) == {"profile", "quant relative", "zfp"}
    metrics = {g["metric"] for g in res["goals"]}
    # per method: 1.05 x its FLOPs ratio, in the bench's epochs and the pipeline's own
    assert metrics == {*bench.GOALS, "epoch_vs_freezeout", "pipeline_epoch_vs_freezeout"}


def test_the_pipeline_s_own_stages_run_side_by_side(bench_out):
    """FreezeOut and each discard method after the shared run as stage processes: their wall
    time, epochs and one-off from the stages' own records; the one-off split into its parts
    (the bench's one-off table) and each discard method's against its floor."""
    res, markdown, _, _ = bench_out
    t = res["p1_p2"]
    stages, pipeline = t["stages"], t["pipeline"]
    assert list(stages) == ["freezeout", "discard", "discard_aug"]
    for name, s in stages.items():
        assert s["epochs"] == 2 and len(s["epochs_s"]) == 2  # smoke: 3 epochs, the first shared
        assert s["wall_s"] > s["one_off_s"] > 0 and s["median_epoch_s"] > 0
        parts = s["one_off_parts_s"]
        assert parts["start-up"] > 0 and parts["test"] > 0
        assert sum(parts.values()) == pytest.approx(s["one_off_s"])
        assert t["breakdown"]["fixed_s"][name] == parts  # the one-off table shows them
    # the smoke profile flips: Discard & Aug. ranks and runs the flipped pass, Discard not
    assert "ranking" in stages["discard_aug"]["one_off_parts_s"]
    assert "cache build: flipped pass" not in stages["discard"]["one_off_parts_s"]
    for name in ("discard", "discard_aug"):
        g = pipeline[name]
        assert g["floor_s"] > 0 and g["one_off_vs_floor"] == pytest.approx(
            (stages[name]["one_off_s"] - stages["freezeout"]["one_off_s"]) / g["floor_s"]
        )
        assert g["epoch_vs_bench"] > 0 and 0 < g["epoch_goal"] < 1.05
    assert "### The pipeline's own stages, side by side (this run)" in markdown


def test_p3_per_freeze_point(bench_out):
    res, _, _, _ = bench_out
    assert [p["block"] for p in res["p3"]] == [2, 5]
    assert res["p3"][1]["feature_shape"] == [32, 6, 6]
    for point in res["p3"]:
        builds = point["builds"]
        # the profile's build of the same features reproduces the cache stage's cache
        assert builds["profile"]["ratio"] == pytest.approx(point["p3_ratio"])
        channels = point["feature_shape"][0]
        assert point["p3_cache_ratio"] > 0 and point["stored_channels"] == channels // 4  # gamma
        assert 0 < point["p3_ratio"] < builds["zfp"]["ratio"] < point["p3_paper_chunk2_ratio"]
        for b in builds.values():
            assert b["max_abs_error"] <= b["max_bound"]
        rel = builds["quant relative"]
        assert rel["relative"] and rel["max_bound"] != point["tolerance"]


def test_the_bench_times_the_stages_batch_functions(bench_out):
    _, _, calls, _ = bench_out
    feeds = [(kw.get("in_memory", "auto"), args[2]) for args, kw in calls["cached_features"]]
    # each discard method as its stage reads the cache, then the timed one from the file and
    # (decoded into RAM) through the same augmentation, and the public CachedFeatures through a
    # DataLoader (api_loader_vs_stage)
    assert sorted(feeds, key=str) == sorted(
        [("auto", "discard"), ("auto", "discard_aug"), (True, "discard_aug"),
         (False, "discard_aug"), ("auto", "discard_aug"), ("auto", "discard_aug")], key=str,
    )  # fmt: skip
    assert len(calls["suffix_spec"]) == 6  # the five epochs above and the DataLoader's


def test_coding_ideas_in_bench_json(bench_out, tmp_path):
    res, markdown, _, _ = bench_out
    ideas = res["coding_ideas"]
    assert ideas["source"].startswith("this run")
    assert {p["block"] for p in ideas["points"]} == {2, 5}
    rows = [r for p in ideas["points"] for r in p["rows"] if "note" not in r]
    assert rows and all(r["ratio"] > 0 and r["encode_mb_s"] > 0 for r in rows)
    assert "### Coding ideas" in markdown
    saved = tmp_path / "bench_coding.json"
    saved.write_text(json.dumps({"machine": {"load_avg_1m_end": 0.5}, "samples": 9, "points": []}))
    read = load_script().coding_ideas(saved, {})
    assert read["source"] == str(saved) and read["samples"] == 9


def test_codec_table_keeps_the_bounds(bench_out):
    res, markdown, _, _ = bench_out
    rows = res["codecs"]
    assert len(rows) == 12 and "### Codecs" in markdown
    for row in rows:
        assert row["ratio"] > 0 and row["encode_mb_s"] > 0 and row["decode_mb_s"] > 0
        if not row["codec"].startswith("none"):
            assert row["max_abs_error"] <= row["tolerance"]
        assert (row["unpack_mb_s"] is not None) == (row["codec"] == "quant")
    fp16 = [r["ratio"] for r in rows if r["codec"] == "none fp16"]
    assert fp16 == pytest.approx([0.5] * 3)


def cache_with_extras(path, chunk_size: int):
    """A quant cache of ReLU maps with 2 stored flipped channels, as discard_aug's cache."""
    rng = np.random.default_rng(0)
    x = np.maximum(rng.standard_normal((11, 4, 6, 6)), 0).astype(np.float32)
    extra = np.maximum(rng.standard_normal((11, 2, 6, 6)), 0).astype(np.float32)
    with CacheWriter(
        path,
        make_codec("quant", 0.05),
        Layout(
            sample_shape=x.shape[1:],
            num_samples=len(x),
            chunk_size=chunk_size,
            extra_shape=extra.shape[1:],
            extra_index=[1, 3],
        ),
        prefix_hash="t",
        build=Build(workers=0),
    ) as writer:
        writer.add(x, np.arange(len(x)), extra=extra)
    return open_cache(path)


@pytest.mark.parametrize("chunk_size,device_decode", [(1, True), (3, False)])
def test_ram_baseline_batches_equal_the_stage_batches(tmp_path, chunk_size, device_decode):
    """Bit for bit: the RAM baseline gets the batches train_suffix trains on, in the same order
    and with the same augmentation draws (flips with stored channels, crops, noise), though the
    stage decodes and augments its packed codes in one CPU pass and the baseline uses torch."""
    path = tmp_path / "c.h5"
    info = cache_with_extras(path, chunk_size)
    cfg = load_profile_config()
    loader_cfg = cfg.loader.model_copy(update={"device_decode": device_decode, "in_memory": True})
    train = cfg.train.model_copy(update={"batch_size": 7})
    train = train.model_copy(update={"flip_p": 0.5})
    aug = cfg.augment.model_copy(update={"crop_pad": 2, "noise_std": 0.05})
    cfg = cfg.model_copy(update={"loader": loader_cfg, "train": train, "augment": aug})
    features = features_for(
        cfg, info, "discard_aug", layout="nchw", img_size=12, device=torch.device("cpu"), seed=4
    )
    assert features.feed(7).fused == device_decode
    stage = list(features.batches(7, seed=4, epoch=1))
    ram = _epochs.RamFeed(features, 7)
    from_ram = list(ram.batches(7, seed=4, epoch=1))
    assert len(stage) == len(from_ram) == features.num_batches(7) >= 2
    for (xa, ya), (xb, yb) in zip(stage, from_ram, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_goals_and_codec_comparison():
    assert bench.GOALS["p1_file_cache_vs_ram"].met(1.05)
    assert not bench.GOALS["p3_ratio"].met(0.07)
    assert not bench.GOALS["p4_build_mb_s"].met(10.0)
    assert bench.Goal("<", 0.5).met(0.4) and not bench.Goal("<", 0.5).met(0.5)
    row = bench.goal_row("p1_cache_vs_ram", "cache file", 1.2)
    assert row["setting"] == "cache file" and not row["pass"] and row["goal"] == "<= 1.1"
    rows = [
        {"codec": "a", "tolerance": 0.01, "ratio": 0.2, "encode_mb_s": 9.0, "decode_mb_s": 9.0},
        {"codec": "b", "tolerance": 0.01, "ratio": 0.4, "encode_mb_s": 5.0, "decode_mb_s": 9.5},
    ]
    result = bench.compare_codecs(rows, 0.012, "a", "b")
    assert result["tolerance"] == 0.01 and result["ratio_a"] == 0.2
    assert not result["better"]  # b decodes faster
    assert "a is not better" in bench.comparison_text(result)
