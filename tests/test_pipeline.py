"""The pipeline's declarations, the dvc.yaml rendered from them, and the smoke pipeline under
real DVC in a fresh git repository."""

import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import (
    ROOT,
    edit_params,
    experiment_runs,
    load_profile,
    needs_fashion,
    run,
    smoke_copy,
)
from freezecache.core.yamlio import load_yaml
from freezecache.pipeline import STAGES
from freezecache.reporting import plots
from freezecache.reporting import provenance as prov
from freezecache.tooling import render
from freezecache.tooling.render import code_deps

PROFILES = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))


def test_committed_dvc_yaml_is_rendered_from_the_declarations():
    assert (ROOT / "dvc.yaml").read_text() == render.render_text(), (
        "dvc.yaml is stale: run `freezecache pipeline`"
    )


def test_dvc_yaml_is_short_and_templated():
    text = (ROOT / "dvc.yaml").read_text()
    # code deps per module where a folder is not whole (220 lines before the integrity and
    # provenance modules; 260 after)
    assert len(text.splitlines()) <= 280
    stages = yaml.safe_load(text)["stages"]
    assert stages["train_suffix"]["matrix"] == {
        "seed": "${seeds}",
        "method": "${methods.discard}",
        "p": render.slots(len(load_yaml(ROOT / "params.yaml")["freeze"]["points"])),
    }
    # each rendered point names the run it continues from: that is the chain
    assert any("${item.p.prev}" in d for d in stages["cache"]["deps"])
    assert any("${item.p.prev}" in d for d in stages["train_suffix"]["deps"])
    assert render.slots(2)[1] == {"i": 1, "name": "p1", "prev": "p0"}


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def _imported_modules(script: Path) -> list[str]:
    """Project modules in sys.modules after importing a stage script (its top-level imports)."""
    code = (
        "import runpy, sys, json; sys.argv = ['x', '--help'];"
        f"sys.path.insert(0, {str(script.parent)!r});"
        f"runpy.run_path({str(script)!r}, run_name='not_main');"
        "print(json.dumps([getattr(m, '__file__', None) for n, m in sys.modules.items()"
        " if n == 'freezecache' or n.startswith('freezecache.')]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    files = [Path(f).resolve() for f in json.loads(out.stdout.splitlines()[-1]) if f]
    return [f.relative_to(ROOT).as_posix() for f in files]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_code_deps_cover_every_module_the_stage_imports(name):
    deps = load_yaml(ROOT / "dvc.yaml")["stages"][name]["deps"]
    deps = [d.replace("${lib}", "src/freezecache") for d in deps]
    for module in _imported_modules(ROOT / STAGES[name].script):
        assert _covered(module, deps), f"{name} imports {module}, which its deps do not list"


def test_code_deps_follow_imports_including_lazy_ones():
    deps = {n: code_deps(ROOT / s.script) for n, s in STAGES.items()}
    assert "src/freezecache/accounting/flops.py" in deps["train_suffix"]
    assert "src/freezecache/accounting/costs.py" in deps["baseline"]
    assert "src/freezecache/cache/writer.py" in deps["cache"]
    assert "src/freezecache/training/train.py" not in deps["report"]
    assert "src/freezecache/cache" not in deps["baseline"]


@pytest.mark.parametrize("profile", PROFILES)
def test_every_param_a_stage_lists_is_in_the_profile(profile):
    # DVC refuses to run a stage whose listed param key is missing from params.yaml.
    raw = load_profile(profile)
    for name, stage in STAGES.items():
        for key in stage.params:
            node = raw
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"{profile}: {name} lists {key}"
                node = node[part]


def test_no_output_file_name_is_spelled_outside_the_declarations():
    names = {Path(out.path).name for s in STAGES.values() for out in s.outs.values()}
    names = {n for n in names if "{" not in n and n != "metrics"}
    offenders = []
    for folder in ("src", "stages", "benchmarks"):
        for f in (ROOT / folder).rglob("*.py"):
            if f.name in ("pipeline.py", "render.py"):
                continue
            text = f.read_text()
            offenders += [f"{f.relative_to(ROOT)}: {n}" for n in names if f'"{n}"' in text]
    assert not offenders, offenders


def test_a_stage_without_the_venv_says_so_in_one_line(tmp_path):
    base = Path(sys.base_prefix) / "bin" / "python3"
    if not base.is_file():
        pytest.skip("no base interpreter")
    done = subprocess.run(
        [str(base), "-s", str(ROOT / "stages/check.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert done.returncode != 0
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert "activate the project's venv" in done.stderr and "Traceback" not in done.stderr


def _status_stages(repo) -> set[str]:
    out = run(["dvc", "status", "--json"], repo).stdout
    return set(json.loads(out or "{}"))


def _points(*pairs) -> list[dict]:
    return [{"block": b, "epoch": e} for b, e in pairs]


def _hydra(points: list[dict]) -> str:
    return "[" + ",".join(f"{{block:{p['block']},epoch:{p['epoch']}}}" for p in points) + "]"


@pytest.mark.slow
@needs_fashion
def test_smoke_pipeline_in_a_fresh_git_repo(smoke_run, tmp_path):
    repo = smoke_copy(smoke_run, tmp_path / "repo")  # `dvc repro` of the smoke profile, done
    assert "Running stage 'train_prefix@0'" in smoke_run[1]
    report = json.loads((repo / "results/report.json").read_text())
    assert set(report["methods"]) == {"normal", "freezeout", "discard", "discard_aug"}
    m = report["methods"]
    for r in m.values():
        assert 0.0 <= r["accuracy_mean"] <= 100.0 and r["train_flops"] > 0 and r["peak_rss_mb"] > 0
    assert m["discard_aug"]["min_memory_mb"] < m["freezeout"]["min_memory_mb"]
    assert m["freezeout"]["min_memory_mb"] < m["normal"]["min_memory_mb"]
    assert m["discard"]["train_flops"] < m["normal"]["train_flops"]
    for c in report["cache"]:
        assert c["max_abs_error"] <= c["tolerance"] and 0 < c["compression_ratio"] < 1
    assert (repo / "data/cache/s0/discard_aug/p1.h5").is_file()
    headline = json.loads((repo / "results/metrics.json").read_text())
    assert set(headline["acc"]) == set(m)
    shown = run(["dvc", "metrics", "show", "--json"], repo).stdout
    assert "results/metrics.json" in shown and "live" not in shown  # the headline only
    made = prov.read(repo / "results/report.provenance.json")  # where the report came from
    assert made["profile"] == "smoke" and made["commit"] and not made["dirty"]
    assert set(made["files"]) == {f"results/{n}" for n in (
        "report.md", "report.json", "metrics.json", "summary.csv", "curves.csv", "memory.csv",
        "cache.csv")}  # fmt: skip

    # only check runs again: it fingerprints the data on every repro and reruns nothing else
    again = run(["dvc", "repro"], repo).stdout
    assert re.findall(r"Running stage '([^']+)'", again) == ["check"], again
    run(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], repo)
    assert (tmp_path / "plots/index.html").is_file()
    summary = (repo / "results/summary.csv").read_text().splitlines()
    assert summary[0].startswith("method,label,seeds,test_acc,test_acc_std,wall_time_s,")
    assert len(summary) == 1 + len(m)
    if importlib.util.find_spec("vl_convert") is not None:  # what `freezecache plots` needs
        # the page leads with the crossover (`make bench-scale`), then the report's charts,
        # each with data, then the bench's breakdown (`make bench`): no benchmark ran here
        shown = run(["freezecache", "plots", "--out", str(tmp_path / "page")], repo).stdout
        benches = ("wall_time_vs_training_set", "epoch_breakdown")
        assert all(f"lead chart {b} has no data" in shown for b in benches), shown
        assert shown.count("no data") == 2, shown
        charts = plots.charts((tmp_path / "page/index.html").read_text())
        report_charts = [c.name for c in plots.LEAD[1:5]]
        assert [n for n in charts if n in report_charts] == report_charts
        assert all(plots.rows(charts[n]) > 0 for n in report_charts)
        assert len(charts) > 4  # the per-stage DVCLive curves, below

    # editing a module reruns exactly the stages that import it
    edited = repo / "src/freezecache/accounting/flops.py"
    edited.write_text(edited.read_text() + "\n# a comment\n")
    importers = {
        n
        for n, s in STAGES.items()
        if "src/freezecache/accounting/flops.py" in code_deps(repo / s.script, repo)
    }
    stale = {s.split("@")[0] for s in _status_stages(repo)} - {"check"}  # always changed
    assert stale == importers and "report" not in stale, (stale, importers)
    run("git checkout -q src", repo)

    # one param reruns only what reads it (the cache's params: test_dvc_day.py)
    edit_params(repo, "augment.noise_std", 0.1)
    stale = _status_stages(repo)
    # the plan times an augmented batch (its break-even prediction); what it allows is unchanged,
    # so nothing between it and the suffix stages reruns
    assert {s for s in stale if s != "check"} == {"plan"} | {
        f"train_suffix@0-{m}-p{i}" for m in ("discard", "discard_aug") for i in (0, 1)
    }, stale
    run("git checkout -q params.yaml", repo)

    # bad params stop at check and delete nothing: test_dvc_day.py


@pytest.mark.slow
@pytest.mark.extended  # two pipelines of their own beyond the smoke run
def test_more_freeze_points_render_then_run_and_queue(smoke_run, tmp_path):
    repo = smoke_copy(smoke_run, tmp_path / "repo")
    # three freeze points: one line of ours says to render first; then plain `dvc repro`
    edit_params(repo, "train.epochs", 4)
    edit_params(repo, "freeze.points", _points((2, 1), (4, 2), (6, 3)))
    edit_params(repo, "cache.tolerance", 0.1)
    done = run(["dvc", "repro"], repo, check=False)
    said = done.stdout + done.stderr
    assert done.returncode != 0 and "run `freezecache pipeline`" in said, said
    assert "Traceback" not in said
    run(["freezecache", "pipeline"], repo)
    out = run(["dvc", "repro"], repo).stdout
    assert "Running stage 'train_suffix@0-discard_aug-p2'" in out
    assert (repo / "data/cache/s0/discard_aug/p2.h5").is_file()
    run("git checkout -q params.yaml dvc.yaml dvc.lock", repo)

    # a queued experiment: other blocks and epochs for the same number of points (one is
    # enough: the queue runs its experiments one after the other, each a pipeline of its own)
    run(
        ["dvc", "exp", "run", "--queue", "-S", "train.epochs=4",
         "-S", f"freeze.points={_hydra(_points((2, 1), (6, 3)))}"],
        repo,
    )  # fmt: skip
    run(["dvc", "queue", "start"], repo)
    deadline = time.time() + 1200
    while time.time() < deadline:
        status = run(["dvc", "queue", "status"], repo).stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        time.sleep(5)
    assert "Failed" not in status and status.count("Success") == 1, status
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    assert 2 in _experiment_points(shown), _experiment_points(shown)


def _experiment_points(shown) -> dict[int, dict]:
    """Number of freeze points -> headline accuracies, per experiment in `dvc exp show`."""
    return {
        len(params["freeze"]["points"]): metrics["acc"]
        for params, metrics in experiment_runs(shown)
        if params.get("freeze", {}).get("points")
    }
