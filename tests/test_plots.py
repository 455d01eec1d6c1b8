"""`freezecache plots`: the lead charts come first, each with data from the report's tables and
`make bench`'s breakdown; the per-stage DVCLive curves below them; in headless Chromium (when
installed) every lead chart draws marks, and an empty one is caught."""

import csv
import importlib.util
import json
import shutil

import pytest
import yaml

import _epochs
import bench_scale
from conftest import ROOT, env_with_venv, run
from freezecache.core.yamlio import load_yaml
from freezecache.pipeline import STAGES
from freezecache.reporting import plots
from freezecache.reporting.plots import BENCH_BREAKDOWN, BENCH_SCALE, LEAD, PLOTS
from freezecache.reporting.report import write_report
from test_bench_scale import _result as scale_result
from test_report import _fixture

LIVE = "runs/s0/normal/live/plots/metrics"  # a DVCLive folder the report fixture writes
DRAWS = shutil.which("chromium") is not None and importlib.util.find_spec("vl_convert") is not None


def _dvc_project(root, cfg) -> None:
    """A DVC project at ``root`` with dvc.yaml's top-level plots, one stage's DVCLive plots and
    the report's outputs (the fixture's, two seeds), plus the committed bench breakdown and a
    bench-scale table."""
    write_report(cfg)
    shutil.copy(ROOT / "results" / BENCH_BREAKDOWN, root / "results" / BENCH_BREAKDOWN)
    (root / "results" / BENCH_SCALE).write_text(bench_scale.to_csv(scale_result()))
    run(["dvc", "init", "--no-scm", "-q"], root)
    shutil.copytree(ROOT / ".dvc/plots", root / ".dvc/plots")
    (root / "params.yaml").write_text(yaml.safe_dump({"paths": {"results": "results"}}))
    stage = {"cmd": "true", "plots": [{LIVE: {"x": "step"}}]}
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": stage}, "plots": PLOTS}))


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """The page of a project with every lead chart's file, and of one without the bench's."""
    root = tmp_path_factory.mktemp("plots")
    _dvc_project(root, _fixture(root))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("PATH", env_with_venv()["PATH"])  # render() calls this interpreter's dvc
        mp.setenv("DVC_NO_ANALYTICS", "1")
        if not DRAWS:  # the data side needs no Vega bundle (nor vl-convert)
            mp.setattr(plots, "template", lambda: plots.PAGE.format(bundle=""))
        full = plots.render(root / "full")
        bench = root / "results" / BENCH_BREAKDOWN
        bench.rename(root / "aside.csv")
        missing = plots.render(root / "missing")
        (root / "aside.csv").rename(bench)
    return root, full, missing


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_lead_charts_are_dvc_yaml_top_level_plots():
    rendered = load_yaml(ROOT / "dvc.yaml")["plots"]
    assert [next(iter(p)) for p in rendered] == [c.name for c in LEAD]
    report = {o.path.replace("{paths.", "${paths.") for o in STAGES["report"].outs.values()}
    for c in LEAD:
        assert (ROOT / f".dvc/plots/{c.template}.json").is_file(), c.template
        assert c.file in report or c.file.endswith(("/" + BENCH_BREAKDOWN, "/" + BENCH_SCALE))
    assert "compression_vs_tolerance" not in {c.name for c in LEAD}  # one point per freeze point


def test_every_lead_chart_has_data_and_comes_before_the_stage_curves(pages):
    root, (page, empty), _ = pages
    assert empty == []
    text = page.read_text()
    found = plots.charts(text)
    names = list(found)
    assert names[: len(LEAD)] == [c.name for c in LEAD]  # in LEAD's order, first
    stage = [n for n in names if n not in {c.name for c in LEAD}]
    assert stage and all("live_plots_metrics" in n for n in stage)  # DVCLive's val_acc.tsv
    assert text.index('id="lead"') < text.index(f'id = "{LEAD[0].name}"')
    assert text.index(f'id = "{LEAD[-1].name}"') < text.index('id="per-stage"')
    assert text.index('id="per-stage"') < text.index(f'id = "{stage[0]}"')
    tables = {c.name: _rows(root / c.file.replace("${paths.results}", "results")) for c in LEAD}
    assert len(tables["test_accuracy_vs_wall_time"]) == 4  # methods
    assert len(tables["validation_accuracy"]) == 4 * 3  # methods x epochs
    for c in LEAD:
        values = found[c.name]["data"]["values"]
        assert len(values) == len(tables[c.name]) > 0, c.name
        assert all(c.x in v and c.y in v for v in values), c.name
        if c.template in ("errorbars", "band"):  # the spread the template draws
            assert all(f"{c.y}_std" in v for v in values), c.name
    rows = found["test_accuracy_vs_wall_time"]["data"]["values"]
    spread = {v["method"]: float(v["test_acc_std"]) for v in rows}
    assert spread["normal"] == pytest.approx(1.4142, abs=1e-3)  # two seeds: a real error bar


def test_a_lead_chart_without_data_says_so(pages):
    _, _, (page, empty) = pages
    assert empty == ["epoch_breakdown"]
    text = page.read_text()
    assert "epoch_breakdown" not in plots.charts(text)
    assert f"results/{BENCH_BREAKDOWN} is missing or empty; `make bench` writes it" in text


@pytest.mark.skipif(not DRAWS, reason="no chromium (apt-get install it) or no vl-convert")
def test_every_lead_chart_draws_in_chromium(pages, tmp_path):
    root, (page, _), (missing, _) = pages
    marks = plots.drawn_marks(plots.dump_dom(page, tmp_path / "profile"))
    for c in LEAD:  # every datum draws at least one shape (a point, a bar, a line's path)
        data = plots.charts(page.read_text())[c.name]["data"]["values"]
        assert marks[c.name] >= len(data), (c.name, marks)
    assert plots.drawn_marks(plots.dump_dom(missing, tmp_path / "p2"))["epoch_breakdown"] == 0


def test_bench_breakdown_csv_from_both_bench_json_shapes(tmp_path):
    committed = json.loads((ROOT / "results/bench.json").read_text())
    out = _epochs.write_breakdown_csv(committed, tmp_path / BENCH_BREAKDOWN)
    assert out.read_text() == (ROOT / "results" / BENCH_BREAKDOWN).read_text()  # in step
    if "breakdown" not in committed["p1_p2"]:  # before the breakdown: data wait and the rest
        rows = _rows(out)
        assert len(rows) == 2 * len(committed["p1_p2"]["epochs"])
        full = [float(r["seconds"]) for r in rows if r["setting"] == "Normal (full model)"]
        assert sum(full) == pytest.approx(committed["p1_p2"]["epochs"]["full"]["min_s"])
    breakdown = {
        "labels": {"normal": "Normal", "discard": "Ours w/ Discard"},
        "epochs": {
            "normal": {"parts_s": {"forward": 1.0, "backward": 2.0}, "validation_s": 0.5},
            "discard": {"parts_s": {"read + unpack": 0.25, "forward": 0.5}, "validation_s": 0.5},
        },
    }
    rows = _epochs.bench_breakdown_rows({"p1_p2": {"breakdown": breakdown}})
    assert [(r["setting"], r["part"], r["seconds"]) for r in rows] == [
        ("Normal", "forward", 1.0), ("Normal", "backward", 2.0), ("Normal", "validation", 0.5),
        ("Ours w/ Discard", "read + unpack", 0.25), ("Ours w/ Discard", "forward", 0.5),
        ("Ours w/ Discard", "validation", 0.5),
    ]  # fmt: skip


def _div(name: str, spec: dict) -> str:
    """A chart's div as dvc-render writes it."""
    return (f'<div id = "{name}">\n<script type = "text/javascript">\nvar spec = '
            f"{json.dumps(spec)};\nvegaEmbed('#{name}', spec);\n</script>\n</div>")  # fmt: skip


def test_arrange_puts_the_lead_first_and_keeps_every_other_chart():
    one_row = {"data": {"values": [{"x": 1}]}}
    divs = [_div("runs_s0_live_a_tsv", one_row), '<div id="image"><img src="a.png"></div>',
            _div(LEAD[1].name, one_row), _div(LEAD[0].name, {})]  # fmt: skip
    page = plots.PAGE.format(bundle="").replace("{plot_divs}", "\n".join(divs))
    out = plots.arrange(page, {"results": "res"})
    assert list(plots.charts(out)) == [LEAD[1].name, "runs_s0_live_a_tsv"]
    assert out.index(f'id="{LEAD[0].name}"') < out.index(f'id = "{LEAD[1].name}"')  # LEAD order
    assert f"{LEAD[0].file.replace('${paths.results}', 'res')} is missing or empty" in out
    assert out.index('id="per-stage"') < out.index('id = "runs_s0_live_a_tsv"')
    assert out.index('id="per-stage"') < out.index('<img src="a.png">')
    assert "Per-stage DVCLive curves (1 chart)" in out
    assert plots.empty_lead(page) == [c.name for c in LEAD if c.name != LEAD[1].name]
