"""`dvc plots show` without a network, the charts a reader looks at first leading the page.

DVC's HTML loads vega from a CDN, so its plots are blank offline. This writes an HTML template
with Vega, Vega-Lite and Vega-Embed inlined (bundled by the vl-convert package, no download),
renders DVC's plots through it, and arranges the page in two sections: the lead charts (dvc.yaml's
top-level ``plots:``, :data:`LEAD`, in that order) and below them the per-stage DVCLive curves.
A lead chart without data says so on the page and in :func:`render`'s answer."""

from __future__ import annotations

import html
import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from freezecache.core.errors import FreezecacheError, optional
from freezecache.core.io import atomic_write_text
from freezecache.pipeline import STAGES

# What needs vl-convert (the Vega bundle); the tables and `dvc plots show` (online) do not.
VL_CONVERT_NEEDED_FOR = (
    "`freezecache plots` and the sweep's SVG plot need it (`dvc plots show` does not, online)"
)
# `make bench`'s epoch breakdown as a long table (setting, part, seconds), in the results folder
# beside bench.json (benchmarks/bench_cache.py writes it).
BENCH_BREAKDOWN = "bench_breakdown.csv"
# `make bench-scale`'s wall time per method and training-set size, measured and predicted
# (benchmarks/bench_scale.py writes it, with bench_scale.json, .md and .svg beside it).
BENCH_SCALE = "bench_scale.csv"


def _report(role: str) -> str:
    """A report output's path as dvc.yaml spells it ({paths.results} -> ${paths.results})."""
    return STAGES["report"].outs[role].path.replace("{paths.", "${paths.")


@dataclass(frozen=True)
class Chart:
    """One lead chart: a column against another of one table, through a template of
    .dvc/plots/. The templates read the spread of y from the column ``<y>_std`` when there is one
    (error bars, bands; 0 or absent: none drawn) and colour by ``method`` (or ``part``)."""

    name: str
    file: str
    x: str
    y: str
    template: str
    title: str
    x_label: str
    y_label: str
    made_by: str  # what writes the file, for a chart without data

    def plot(self) -> dict:
        """The chart as a dvc.yaml top-level plot."""
        props = {"template": self.template, "x": self.x, "y": {self.file: self.y}}
        props |= {"title": self.title, "x_label": self.x_label, "y_label": self.y_label}
        return {self.name: props}


REPRO = "the report stage (`dvc repro`)"
LEAD = (
    Chart("wall_time_vs_training_set", "${paths.results}/" + BENCH_SCALE, "train_size", "wall_s",
          "scale", "Wall time after the shared run against the training-set size (dashed: the "
          "plan's prediction)", "training images", "wall time after the shared run (s)",
          "`make bench-scale`"),
    Chart("test_accuracy_vs_wall_time", _report("summary"), "wall_time_s", "test_acc",
          "errorbars", "Test accuracy against wall time (mean and std over seeds)",
          "wall time of the method's stages, shared prefix included (s)", "test accuracy (%)",
          REPRO),
    Chart("test_accuracy_vs_training_flops", _report("summary"), "train_flops", "test_acc",
          "errorbars", "Test accuracy against training FLOPs (mean and std over seeds)",
          "training FLOPs (cache builds included)", "test accuracy (%)", REPRO),
    Chart("validation_accuracy", _report("curves"), "epoch", "val_acc", "band",
          "Validation accuracy per epoch (mean, band: std over seeds)", "epoch",
          "validation accuracy", REPRO),
    Chart("memory_per_freezing_state", _report("memory"), "epoch", "memory_mb", "by_method",
          "Accounted memory per epoch, by freezing state", "epoch", "accounted memory (MB)",
          REPRO),
    Chart("epoch_breakdown", "${paths.results}/" + BENCH_BREAKDOWN, "seconds", "setting",
          "stacked", "One epoch after the freeze point, by part (make bench)",
          "seconds per epoch (fastest round)", "setting", "`make bench`"),
)  # fmt: skip
PLOTS = [c.plot() for c in LEAD]

PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<title>freezecache plots</title>
<script type="text/javascript">
{bundle}
</script>
<script type="text/javascript">
// SVG rather than canvas: crisp charts whose marks a headless browser's DOM shows.
const embedCanvas = window.vegaEmbed;
window.vegaEmbed = (el, spec, opt) => embedCanvas(el, spec, {{renderer: "svg", ...opt}});
</script>
<style>
body {{ font-family: sans-serif; margin: 16px; }}
section > div {{ display: inline-block; vertical-align: top; margin: 0 24px 24px 0; }}
.missing {{ width: 300px; padding: 12px; border: 1px dashed #b00; color: #b00; }}
</style>
</head>
<body>
<!-- plots:start -->
{{plot_divs}}
<!-- plots:end -->
</body>
</html>
"""
_DIV = re.compile(
    r'<div id = "(?P<id>[^"]+)">\s*<script type = "text/javascript">\s*var spec = (?P<spec>.*?);'
    r"\s*vegaEmbed\(.*?</script>\s*</div>",
    re.S,
)


def template() -> str:
    """The page, with the libraries inline (window.vegaEmbed is what DVC's divs call)."""
    vl_convert = optional("vl_convert", "vl-convert-python", why=VL_CONVERT_NEEDED_FOR)
    bundle = vl_convert.javascript_bundle().replace("</script", "<\\/script")
    return PAGE.format(bundle=bundle)


def charts(page: str) -> dict[str, dict]:
    """Every chart of a page DVC wrote: div id -> its Vega-Lite spec, in page order."""
    return {m["id"]: json.loads(m["spec"]) for m in _DIV.finditer(page)}


def rows(spec: dict) -> int:
    """Data rows a chart draws from (DVC writes ``{}`` for a plot without any)."""
    values = spec.get("data", {}).get("values")
    return len(values) if isinstance(values, list) else 0


def empty_lead(page: str) -> list[str]:
    """The lead charts with no data rows (or missing from the page)."""
    found = charts(page)
    return [c.name for c in LEAD if rows(found.get(c.name, {})) == 0]


def _missing(chart: Chart, paths: dict) -> str:
    file = re.sub(r"\$\{paths\.(\w+)\}", lambda m: str(paths.get(m[1], m[0])), chart.file)
    return (
        f'<div id="{chart.name}"><p class="missing"><b>{html.escape(chart.title)}</b>: no data — '
        f"{html.escape(file)} is missing or empty; {html.escape(chart.made_by)} writes it.</p>"
        "</div>"
    )


def arrange(page: str, paths: dict | None = None) -> str:
    """The page in two sections: the lead charts in :data:`LEAD` order (a note in place of one
    without data, its file's ``${paths.x}`` filled from ``paths``), then the per-stage DVCLive
    curves in DVC's order, with an index on top."""
    head, rest = page.split("<!-- plots:start -->", 1)
    divs, tail = rest.split("<!-- plots:end -->", 1)
    blocks = {m["id"]: (m.group(0), rows(json.loads(m["spec"]))) for m in _DIV.finditer(divs)}
    names = {c.name for c in LEAD}
    lead = [
        blocks[c.name][0] if blocks.get(c.name, ("", 0))[1] else _missing(c, paths or {})
        for c in LEAD
    ]
    stages = [b for name, (b, _) in blocks.items() if name not in names]
    count = len(stages)
    stages.append(_DIV.sub("", divs).strip())  # anything else DVC wrote (an image plot's div)
    index = "".join(f'<li><a href="#{c.name}">{html.escape(c.title)}</a></li>' for c in LEAD)
    body = [
        "<h1>freezecache results</h1>",
        f'<ol>{index}<li><a href="#per-stage">Per-stage DVCLive curves ({count} '
        f"chart{'s' * (count != 1)})</a></li></ol>",
        '<h2 id="lead">Methods side by side</h2>',
        f'<section id="lead-charts">{"".join(lead)}</section>',
        '<h2 id="per-stage">Per-stage DVCLive curves</h2>',
        "<p>One chart per file of each stage's DVCLive folder (dvc.yaml's stage plots): one "
        "method, one seed, one freeze point each.</p>",
        f'<section id="per-stage-charts">{"".join(stages)}</section>',
    ]
    return head + "\n".join(body) + tail


def render(out: Path) -> tuple[Path, list[str]]:
    """Writes out/index.html from `dvc plots show` through the offline template, arranged by
    :func:`arrange`; returns it with the names of the lead charts that have no data."""
    out.mkdir(parents=True, exist_ok=True)
    page = out / "template.html"
    atomic_write_text(page, template())
    done = subprocess.run(
        ["dvc", "plots", "show", "--html-template", str(page), "-o", str(out)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise FreezecacheError(f"dvc plots show failed: {done.stderr.strip()[-300:]}")
    index = out / "index.html"
    text = index.read_text()
    atomic_write_text(index, arrange(text, _paths(Path("params.yaml"))))
    return index, empty_lead(text)


def _paths(params: Path) -> dict:
    """params.yaml's ``paths`` (what dvc.yaml's ${paths.x} read), {} without it."""
    from freezecache.core.yamlio import load_yaml

    raw = load_yaml(params) if params.is_file() else None
    return (raw or {}).get("paths") or {}


# -- the page as a browser draws it ---------------------------------------------------------------
_MARKS = re.compile(r'<g class="mark-\w+ role-mark[^"]*"[^>]*>(.*?)</g>', re.S)
_SHAPE = re.compile(r"<(?:path|line|rect|circle|text)\b")


def drawn_marks(dom: str) -> dict[str, int]:
    """Per lead chart, the shapes its data marks drew in a browser's DOM (Vega's SVG: a
    ``mark-* role-mark`` group per mark, holding one shape per datum; axes and legends not
    counted); a chart absent from the DOM counts 0."""
    at = {m[1]: m.start() for m in re.finditer(r'<div id="([^"]+)"', dom)}
    starts = sorted(at.values()) + [len(dom)]
    out = {}
    for c in LEAD:
        if c.name not in at:
            out[c.name] = 0
            continue
        end = next(s for s in starts if s > at[c.name])
        part = dom[at[c.name] : end]
        out[c.name] = sum(len(_SHAPE.findall(g)) for g in _MARKS.findall(part))
    return out


CHROMIUM = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--proxy-server=127.0.0.1:9", "--virtual-time-budget=10000",
)  # fmt: skip


def dump_dom(page: Path, profile: Path, chromium: str = "chromium") -> str:
    """The page's DOM after its scripts ran, from headless Chromium with the network off
    (``profile``: an empty folder for the browser's profile)."""
    done = subprocess.run(
        [chromium, *CHROMIUM, f"--user-data-dir={profile}", "--dump-dom", page.resolve().as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise FreezecacheError(f"chromium failed: {done.stderr.strip()[-300:]}")
    return done.stdout
