"""The cache benchmark runs end to end on a tiny setup and writes sane numbers (no timing)."""

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import ROOT
from freezecache import bench, store
from freezecache.codec import make_codec

TINY = {
    "paths": {"data": "data", "cache": "cache", "runs": "runs", "results": "results"},
    "methods": ["normal", "discard"],
    "data": {"name": "fashion_mnist", "img_size": 12},
    "model": {"name": "resnet20"},
    # One thread: two torch threads on a shared 2-core CPU make tiny steps crawl.
    "train": {"epochs": 3, "batch_size": 32, "eval_batch_size": 64, "device": "cpu", "threads": 1},
    "freeze": {"points": [{"block": 3, "epoch": 1}, {"block": 6, "epoch": 2}]},
    "cache": {"codec": "zfp", "tolerance": 0.01, "loader_workers": 0},
}


def load_script():
    """benchmarks/bench_cache.py as a module (benchmarks/ is not a package)."""
    path = ROOT / "benchmarks" / "bench_cache.py"
    spec = importlib.util.spec_from_file_location("bench_cache", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_prepared(folder, n: int = 200, size: int = 12) -> None:
    """A prepared split as `prepare` writes it: smooth uint8 images, 10 classes."""
    g = torch.Generator().manual_seed(0)
    smooth = F.avg_pool2d(torch.rand(n + 40, 1, size, size, generator=g), 3, 1, 1)
    images = (smooth * 255).to(torch.uint8).numpy()
    labels = np.arange(n + 40) % 10
    folder.mkdir(parents=True)
    np.savez(folder / "train.npz", images=images[:n], labels=labels[:n])
    np.savez(folder / "test.npz", images=images[n:], labels=labels[n:])
    meta = {
        "name": "fashion_mnist",
        "classes": [str(i) for i in range(10)],
        "num_classes": 10,
        "channels": 1,
        "img_size": size,
        "train_size": n,
        "test_size": 40,
        "mean": [float(images.mean() / 255)],
        "std": [float(images.std() / 255)],
    }
    (folder / "meta.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    """Runs the whole benchmark once on the tiny setup; returns (bench.json, bench.md text)."""
    root = tmp_path_factory.mktemp("bench")
    paths = {key: str(root / value) for key, value in TINY["paths"].items()}
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({**TINY, "paths": paths}))
    write_prepared(root / "data")
    threads = torch.get_num_threads()
    try:
        load_script().main(params=params, samples=160, codec_samples=16, repeats=1, warmup_steps=1)
    finally:
        torch.set_num_threads(threads)  # the bench set the config's threads process-wide
    results = root / "results"
    return json.loads((results / "bench.json").read_text()), (results / "bench.md").read_text()


def test_bench_json_has_every_measurement(bench_out):
    res, markdown = bench_out
    for key in ("p1_cache_vs_ram", "p2_vs_flops_ideal", "p4_build_mb_s", "p4_baseline_mb_s"):
        assert math.isfinite(res[key]) and res[key] > 0, key
        assert key in markdown
    assert res["setup"]["samples"] == 160
    assert "trained 1 epoch" in res["setup"]["weights"]  # no runs/ here: the fallback ran
    assert [p["block"] for p in res["p3"]] == [3, 6]
    assert res["p3"][1]["feature_shape"] == [32, 6, 6]  # point 2 = point 1 pushed on
    epochs = res["p1_p2"]["epochs"]
    assert set(epochs) == {"cache zfp", "cache quant", "ram", "full"}
    assert all(e["min_s"] > 0 for e in epochs.values())
    assert all(e["other_cores"] is None or e["other_cores"] >= 0 for e in epochs.values())
    assert 0 < res["p1_p2"]["suffix_vs_full_flops"] < 1
    assert set(res["p1_p2"]["p1_by_codec"]) == {"zfp", "quant"}
    goals = {(g["metric"], g["codec"]) for g in res["goals"]}
    assert {("p1_cache_vs_ram", "zfp"), ("p4_build_mb_s", "quant")} <= goals


def test_per_sample_zfp_beats_paper_chunks_on_relu_maps(bench_out):
    res, _ = bench_out
    for point in res["p3"]:
        assert 0 < point["p3_ratio"] < point["p3_paper_chunk2_ratio"]
        assert 0 < point["quant_ratio"] and point["p3_ratio"] == point["zfp_ratio"]
        for codec in ("zfp", "quant"):
            assert point[f"{codec}_max_abs_error"] <= point["tolerance"]
    paper_rows = [g for g in res["goals"] if g["metric"].endswith("vs paper chunk 2")]
    assert paper_rows and all(g["pass"] for g in paper_rows if g["codec"] == "zfp")


def test_codec_table_keeps_the_bounds(bench_out):
    res, markdown = bench_out
    rows = res["codecs"]
    assert len(rows) == 12 and "### Codecs" in markdown
    for row in rows:
        assert row["ratio"] > 0 and row["encode_mb_s"] > 0 and row["decode_mb_s"] > 0
        if not row["codec"].startswith("none"):
            assert row["max_abs_error"] <= row["tolerance"]
        assert (row["unpack_mb_s"] is not None) == (row["codec"] == "quant")
    fp16 = [r["ratio"] for r in rows if r["codec"] == "none fp16"]
    assert fp16 == pytest.approx([0.5] * 3)


def test_ram_batches_follow_the_cache_loader_order(tmp_path):
    x = np.maximum(np.random.default_rng(0).standard_normal((11, 2, 4, 4)), 0).astype(np.float32)
    y = np.arange(11)
    path = tmp_path / "c.h5"
    bench.build_cache(path, x, y, make_codec("none", 0.0), chunk_size=3, workers=1)
    info = store.open_cache(path)
    loader = store.make_loader(path, info, batch_size=7, seed=4, workers=0)
    loaded = list(bench.loader_batches(loader, info, 1, torch.device("cpu")))
    orders = bench.batch_orders(11, 3, 7, seed=4, epoch=1)
    from_ram = list(bench.ram_batches(torch.from_numpy(x), torch.from_numpy(y), orders))
    assert len(loaded) == len(from_ram) == 2  # chunks of 3, 3, 3, 2; two chunks per batch
    for (xa, ya), (xb, yb) in zip(loaded, from_ram, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_goals_and_codec_comparison():
    assert bench.GOALS["p1_cache_vs_ram"].met(1.05)
    assert not bench.GOALS["p4_build_mb_s"].met(10.0)
    assert bench.Goal("<", 0.5).met(0.4) and not bench.Goal("<", 0.5).met(0.5)
    rows = [
        {"codec": "a", "tolerance": 0.01, "ratio": 0.2, "encode_mb_s": 9.0, "decode_mb_s": 9.0},
        {"codec": "b", "tolerance": 0.01, "ratio": 0.4, "encode_mb_s": 5.0, "decode_mb_s": 9.5},
    ]
    result = bench.compare_codecs(rows, 0.012, "a", "b")
    assert result["tolerance"] == 0.01 and result["ratio_a"] == 0.2
    assert not result["better"]  # b decodes faster
    assert "a is not better" in bench.comparison_text(result)
