"""The codec sweep: the default profile run again over a grid of codecs and tolerances (lossless
included) as queued DVC experiments, then every experiment's report gathered into one table.

Only the caches and what trains from them rerun in each experiment; the rest comes from DVC's
run cache. Each queued experiment commits its git-tracked report (results/report.json), which
is where the per-seed accuracies are read from.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import subprocess
import time
from pathlib import Path

from freezecache.core.errors import FreezecacheError, optional
from freezecache.core.io import atomic_write_json, atomic_write_text
from freezecache.reporting.labels import label
from freezecache.reporting.plots import VL_CONVERT_NEEDED_FOR

log = logging.getLogger(__name__)

# (name, codec, tolerance, relative, coding): the grid `make sweep` runs; lossless first. rANS
# codes the same quant codes as zstd (the same decoded features, so the same accuracy when
# training is deterministic): its entries measure the bits and check that.
GRID = (
    ("lossless", "none", 0.1, False, "zstd"),
    ("abs-0.1", "quant", 0.1, False, "zstd"),
    ("rel-0.1", "quant", 0.1, True, "zstd"),
    ("rel-0.25", "quant", 0.25, True, "zstd"),
    ("rel-0.5", "quant", 0.5, True, "zstd"),
    ("rel-1.0", "quant", 1.0, True, "zstd"),
    ("rel-0.25-rans", "quant", 0.25, True, "rans"),
    ("rel-0.5-rans", "quant", 0.5, True, "rans"),
)
PREFIX = "sweep-"
COLUMNS = (
    "codec", "coding", "tolerance", "relative", "bits_per_value", "seed", "method", "accuracy",
)  # fmt: skip


def _run(*cmd: str) -> str:
    """stdout of ``cmd`` (dvc or git); one line with the end of its stderr when it fails."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise FreezecacheError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-300:]}")
    return done.stdout


def _dvc(*args: str) -> str:
    return _run("dvc", *args)


def entries(names: list[str]) -> tuple:
    """The entries of GRID named (all of it when none is)."""
    known = [g[0] for g in GRID]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise FreezecacheError(
            f"--only {unknown[0]}: not in the sweep's grid — choose from {', '.join(known)}"
        )
    return tuple(g for g in GRID if g[0] in names) if names else GRID


def queue(grid=GRID) -> list[str]:
    """Queues one experiment per grid entry; returns their names.

    Failed tasks of an earlier sweep leave the queue first (their logs with them), so that
    `run_queue` judges this run alone. Entries that an earlier run finished cost a run-cache
    checkout: their stages' inputs are unchanged."""
    _dvc("queue", "remove", "--failed")
    names = []
    for name, codec, tol, relative, coding in grid:
        exp = PREFIX + name
        _dvc(
            "exp", "run", "--queue", "--name", exp,
            "-S", f"cache.codec={codec}", "-S", f"cache.tolerance={tol}",
            "-S", f"cache.relative={str(relative).lower()}", "-S", f"cache.coding={coding}",
        )  # fmt: skip
        names.append(exp)
    return names


def run_queue(poll_s: float = 10.0) -> None:
    """Runs the queue one experiment at a time (two would fight over the cores) to its end."""
    _dvc("queue", "start", "-j", "1")
    while re.search(r"\b(Queued|Running)\b", _dvc("queue", "status")):
        time.sleep(poll_s)
    if "Failed" in (status := _dvc("queue", "status")):
        raise FreezecacheError(f"a sweep experiment failed — see `dvc queue logs`:\n{status}")


def _experiments() -> dict[str, str]:
    """name -> commit of each finished sweep experiment.

    DVC keeps an experiment under refs/exps/<baseline commit>/<name>. One run on HEAD wins;
    otherwise the newest, so that committing the results (a new HEAD) does not hide the runs
    that made them, as `dvc exp show` (HEAD's experiments only) would.
    """
    head = _run("git", "rev-parse", "HEAD").strip()
    listed = _run(
        "git", "for-each-ref", "--sort=-committerdate",
        "--format=%(refname) %(objectname)", "refs/exps",
    )  # fmt: skip
    found: dict[str, str] = {}
    on_head: set[str] = set()
    for line in listed.splitlines():
        ref, rev = line.split()
        parts = ref.split("/")  # refs, exps, baseline[:2], baseline[2:], name
        if len(parts) != 5 or not parts[4].startswith(PREFIX) or parts[4] in on_head:
            continue
        name = parts[4]
        if parts[2] + parts[3] == head:
            found[name] = rev
            on_head.add(name)
        else:
            found.setdefault(name, rev)  # newest first
    return found


def _bits_per_value(cache_rows: list[dict], method: str) -> float:
    """Stored bits per cached float32 value over every freeze point of a method."""
    rows = [c for c in cache_rows if c["method"] == method]
    stored = sum(c["stored_mb"] for c in rows)
    raw = sum(c["stored_mb"] / c["compression_ratio"] for c in rows)
    return 32.0 * stored / raw


def rows_of(
    report: dict, codec: str, tolerance: float, relative: bool, coding: str = "zstd"
) -> list[dict]:
    """One row per seed and discard method of one experiment's report."""
    out = []
    for m, r in report["methods"].items():
        if not any(c["method"] == m for c in report["cache"]):
            continue
        bits = _bits_per_value(report["cache"], m)
        for seed, acc in zip(report["seeds"], r["accuracy_per_seed"], strict=True):
            out.append(
                {
                    "codec": codec,
                    "coding": coding,
                    "tolerance": tolerance,
                    "relative": relative,
                    "bits_per_value": round(bits, 4),
                    "seed": seed,
                    "method": m,
                    "accuracy": round(acc, 3),
                }
            )
    return out


def collect(grid=GRID) -> list[dict]:
    """Rows of every finished sweep experiment, in grid order."""
    exps = _experiments()
    rows = []
    for name, codec, tol, relative, coding in grid:
        rev = exps.get(PREFIX + name)
        if rev is None:
            raise FreezecacheError(f"no experiment {PREFIX + name} — run `make sweep`")
        shown = subprocess.run(
            ["git", "show", f"{rev}:results/report.json"], capture_output=True, text=True
        )
        if shown.returncode != 0:
            raise FreezecacheError(f"experiment {PREFIX + name} has no results/report.json")
        rows += rows_of(json.loads(shown.stdout), codec, tol, relative, coding)
    return rows


def render_markdown(rows: list[dict]) -> str:
    """Mean ± std over seeds per codec setting and method, against the lossless cache."""
    import statistics

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        codec = r["codec"] if r.get("coding", "zstd") == "zstd" else f"{r['codec']} + {r['coding']}"
        groups.setdefault((codec, r["tolerance"], r["relative"], r["method"]), []).append(r)
    base = {
        k[3]: statistics.fmean(x["accuracy"] for x in v)
        for k, v in groups.items()
        if k[0] == "none"
    }
    lines = [
        "| Codec | Tolerance | Bits per value | Method | Accuracy (%) | vs lossless |",
        "|---|---|---|---|---|---|",
    ]
    for (codec, tol, relative, m), v in groups.items():
        accs = [x["accuracy"] for x in v]
        mean = statistics.fmean(accs)
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        tol_text = "–" if codec == "none" else f"{tol:g}{' × channel std' if relative else ''}"
        gap = f"{mean - base[m]:+.2f}" if m in base else "–"
        lines.append(
            f"| {codec} | {tol_text} | {v[0]['bits_per_value']:.2f} | {label(m)} | "
            f"{mean:.2f} ± {std:.2f} | {gap} |"
        )
    lines += [
        "",
        "![Codec sweep: test accuracy against stored bits per value](results/codec_sweep.svg)",
    ]
    return "\n".join(lines) + "\n"


def plot_spec(rows: list[dict]) -> dict:
    """Vega-Lite: accuracy (mean and std over seeds) against stored bits per value, per method."""
    values = [
        {
            **r,
            "method": label(r["method"]),
            "stage": "rANS" if r.get("coding") == "rans" else "zstd (and lossless fp32)",
        }
        for r in rows
    ]
    x = {
        "field": "bits_per_value",
        "type": "quantitative",
        "scale": {"type": "log"},
        "title": "stored bits per cached value (log scale; 32 = lossless fp32)",
    }
    color = {"field": "method", "type": "nominal", "title": None}
    # One line per method and lossless stage: rANS and zstd store the same values (the same
    # accuracy) at different sizes, so a line through both would zigzag.
    dash = {"field": "stage", "type": "nominal", "title": "lossless stage"}
    return {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
        "title": "Codec sweep: test accuracy against cache size, mean ± std over seeds",
        "width": 480,
        "height": 280,
        "data": {"values": values},
        "layer": [
            {
                "mark": {"type": "errorbar", "extent": "stdev", "ticks": True},
                "encoding": {
                    "x": x,
                    "y": {"field": "accuracy", "type": "quantitative", "title": None},
                    "color": color,
                    "detail": {"field": "stage", "type": "nominal"},
                },
            },
            {
                "mark": {"type": "line", "point": True},
                "encoding": {
                    "x": x,
                    "y": {
                        "field": "accuracy",
                        "type": "quantitative",
                        "aggregate": "mean",
                        "scale": {"zero": False},
                        "title": "test accuracy (%)",
                    },
                    "color": color,
                    "strokeDash": {**dash, "legend": None},  # the shape's legend says it
                    "shape": dash,
                },
            },
        ],
    }


def write(rows: list[dict], results: Path) -> list[Path]:
    """results/codec_sweep.csv, .json, .md and .svg (the plot); returns the files written, the
    Markdown first."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(results / "codec_sweep.csv", buf.getvalue())
    atomic_write_json(results / "codec_sweep.json", rows)
    atomic_write_text(results / "codec_sweep.md", render_markdown(rows))
    written = [results / f"codec_sweep.{x}" for x in ("md", "csv", "json")]
    try:  # the plot is the one part that needs vl-convert: the tables are written anyway
        vl_convert = optional("vl_convert", "vl-convert-python", why=VL_CONVERT_NEEDED_FOR)
    except FreezecacheError as err:
        log.warning("no codec_sweep.svg: %s", err)
        return written
    svg = vl_convert.vegalite_to_svg(plot_spec(rows))
    atomic_write_text(results / "codec_sweep.svg", svg)
    return [*written, results / "codec_sweep.svg"]
