"""The codec sweep's bookkeeping: experiments found in `dvc exp show`, rows per seed and method,
the table against the lossless cache, and the plot file."""

import csv
import json
import os
import subprocess

import pytest

from freezecache.tooling import sweep


def _report(accs: dict[str, list[float]], ratio: float) -> dict:
    return {
        "seeds": [0, 1],
        "methods": {m: {"accuracy_per_seed": a} for m, a in accs.items()},
        "cache": [
            {"method": m, "stored_mb": 10.0 * ratio, "compression_ratio": ratio}
            for m in accs
            if m != "normal"
        ],
    }


def test_rows_skip_methods_without_a_cache_and_count_bits_per_value():
    report = _report({"normal": [95.0, 96.0], "discard": [94.0, 94.5]}, ratio=0.125)
    rows = sweep.rows_of(report, "quant", 0.1, False)
    assert [r["method"] for r in rows] == ["discard", "discard"]
    assert [r["seed"] for r in rows] == [0, 1]
    assert rows[0]["bits_per_value"] == pytest.approx(4.0)
    assert rows[1]["accuracy"] == 94.5


def test_the_table_gives_each_setting_against_the_lossless_cache(tmp_path):
    rows = sweep.rows_of(_report({"discard": [94.0, 95.0]}, 1.0), "none", 0.1, False)
    rows += sweep.rows_of(_report({"discard": [93.0, 93.5]}, 0.0625), "quant", 0.5, True)
    md = sweep.render_markdown(rows)
    assert "| none | – | 32.00 | Ours w/ Discard | 94.50 ± 0.71 | +0.00 |" in md
    assert "| quant | 0.5 × channel std | 2.00 | Ours w/ Discard | 93.25 ± 0.35 | -1.25 |" in md
    rows += sweep.rows_of(_report({"discard": [93.0, 93.5]}, 0.05), "quant", 0.5, True, "rans")
    md = sweep.render_markdown(rows)
    assert (
        "| quant + rans | 0.5 × channel std | 1.60 | Ours w/ Discard | 93.25 ± 0.35 | -1.25 |" in md
    )
    sweep.write(rows, tmp_path)
    with open(tmp_path / "codec_sweep.csv") as f:
        got = list(csv.DictReader(f))
    assert len(got) == 6 and [r["coding"] for r in got[-2:]] == ["rans", "rans"]
    assert json.loads((tmp_path / "codec_sweep.json").read_text()) == rows
    assert all(set(r) == set(sweep.COLUMNS) for r in rows)
    svg = (tmp_path / "codec_sweep.svg").read_text()
    assert svg.lstrip().startswith("<svg") and "Discard" in svg


def test_experiments_are_found_on_head_first_then_the_newest(tmp_path, monkeypatch):
    def git(*args, date="2026-01-01T00:00:00"):
        env = {**os.environ, "GIT_COMMITTER_DATE": date, "GIT_AUTHOR_DATE": date}
        done = subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
            cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        return done.stdout.strip()

    def experiment(baseline, name, date):
        rev = git("commit-tree", "-m", name, "-p", baseline, f"{baseline}^{{tree}}", date=date)
        git("update-ref", f"refs/exps/{baseline[:2]}/{baseline[2:]}/{name}", rev)
        return rev

    git("init", "-q")
    git("commit", "-q", "--allow-empty", "-m", "old")
    old = git("rev-parse", "HEAD")
    a_old = experiment(old, "sweep-a", "2026-01-02T00:00:00")
    b_old = experiment(old, "sweep-b", "2026-01-02T00:00:00")
    git("commit", "-q", "--allow-empty", "-m", "code changed")
    mid = git("rev-parse", "HEAD")
    b_newer = experiment(mid, "sweep-b", "2026-01-04T00:00:00")  # run again on a later commit
    git("commit", "-q", "--allow-empty", "-m", "results committed")
    head = git("rev-parse", "HEAD")
    a_head = experiment(head, "sweep-a", "2026-01-03T00:00:00")
    experiment(head, "other", "2026-01-05T00:00:00")  # not the sweep's
    monkeypatch.chdir(tmp_path)
    assert sweep._experiments() == {"sweep-a": a_head, "sweep-b": b_newer}
    assert a_old != a_head and b_old != b_newer
