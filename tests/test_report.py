"""The paper-style report from fixture metrics, and the README sections it regenerates."""

import json

import pytest

from conftest import load_profile
from freezecache.config import parse_config
from freezecache.errors import FreezecacheError
from freezecache.layout import COSTS, METRICS, Layout
from freezecache.report import README_MARK, update_readme, write_report

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
        return [
            {
                "state": "full",
                "position": 0,
                "epochs": 3,
                "accounted_memory_mb": low,
                "cuda_peak_mb": None,
            }
        ]
    kind = "freeze" if method == "freezeout" else "discard"
    return [
        {"state": s, "position": p, "epochs": 1, "accounted_memory_mb": mb, "cuda_peak_mb": None}
        for s, p, mb in (("full", 0, 100.0), (kind, 2, 50.0), (kind, 5, low))
    ]


def _fixture(tmp_path):
    raw = load_profile("smoke")
    raw["paths"] = {k: str(tmp_path / k) for k in raw["paths"]}
    raw["seeds"] = [0, 1]
    cfg = parse_config(raw)
    L = Layout(cfg.paths)
    for i, seed in enumerate(cfg.seeds):
        for m in cfg.methods:
            folder = tmp_path.joinpath(L.method_result(seed, m, 2))
            folder.mkdir(parents=True, exist_ok=True)
            (folder / METRICS).write_text(json.dumps({"test_acc": ACC[m][i], "wall_time_s": 10.0}))
            avg, low = MEM[m]
            costs = {
                "avg_memory_mb": avg,
                "min_memory_mb": low,
                "train_flops": 1e12 * avg / 100,
                "states": _states(m, low),
            }
            (folder / COSTS).write_text(json.dumps(costs))
        for v in cfg.discard_methods:
            for k in (1, 2):
                stats = {
                    "build_s": 2.0,
                    "block": 2 * k,
                    "codec": "zfp",
                    "tolerance": 0.01,
                    "chunk_size": 1,
                    "compression_ratio": 0.2 * k,
                    "max_abs_error": 0.004,
                    "encode_mb_s": 100.0,
                    "decode_mb_s": 300.0,
                    "stored_channels": 4,
                }
                path = tmp_path.joinpath(L.cache_stats(seed, v, k))
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(stats))
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
    assert report["methods"]["discard"]["wall_time_s"] == pytest.approx(10.0 + 2 * 2.0)
    assert len(report["cache"]) == 4
    memory = (tmp_path / "results/memory.csv").read_text().splitlines()
    assert memory == [
        "epoch,normal,freezeout,discard,discard_aug",
        "1,100.0,100.0,100.0,100.0",
        "2,100.0,50.0,50.0,50.0",
        "3,100.0,40.0,20.0,20.0",
    ]
    assert (tmp_path / "results/cache.csv").read_text().startswith("method,point,tolerance,")
    for key in (
        "point",
        "tolerance",
        "compression_ratio",
        "max_abs_error",
        "compress_mb_s",
        "decompress_mb_s",
    ):
        assert key in report["cache"][0]


def test_report_markdown_has_savings_against_normal(tmp_path):
    write_report(_fixture(tmp_path))
    text = (tmp_path / "results/report.md").read_text()
    assert "| Normal | 91.00 ± 1.41 | 100.0 | 100.0 |" in text
    assert "| Ours w/ Discard | 89.00 ± 1.41 | 60.0 (-40.0%) | 20.0 (-80.0%) |" in text
    assert "| Ours w/ Discard & Aug. | 2 (4) | zfp | 0.01 | 1 | 0.400 |" in text


def test_missing_metrics_is_a_clear_error(tmp_path):
    cfg = _fixture(tmp_path)
    (tmp_path / "runs/s1/freezeout/metrics.json").unlink()
    with pytest.raises(FreezecacheError, match="runs/s1/freezeout/metrics.json: missing"):
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
