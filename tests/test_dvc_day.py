"""The user's DVC day on a finished smoke run, asserted from DVC's own output: what an edit of
params.yaml reruns, bad params that stop at check and delete nothing, an experiment of another
tolerance listed by `dvc exp show` with its metrics, a sweep queued and collected, and the
README's commands that need a finished run.

One smoke run serves every test here (module fixture); each test leaves it as it found it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import edit_params, experiment_runs, needs_fashion, run, smoke_copy
from test_readme import SMOKE, readme_commands

pytestmark = [pytest.mark.slow, needs_fashion]

# What the smoke profile's stages are (one seed, two points, four methods).
DISCARD = {f"{s}@0-{m}-p{i}" for s in ("cache", "train_suffix") for m in ("discard", "discard_aug")
           for i in (0, 1)}  # fmt: skip
UPSTREAM = {"prepare", "pretrain", "train_prefix@0"}


@pytest.fixture(scope="module")
def smoke(smoke_run, tmp_path_factory) -> Path:
    """A copy of the session's finished smoke run (conftest.smoke_run), shared by this module's
    tests: each leaves it as committed."""
    return smoke_copy(smoke_run, tmp_path_factory.mktemp("day") / "repo")


def _status(repo: Path) -> dict:
    return json.loads(run(["dvc", "status", "--json"], repo).stdout or "{}")


def _restore(repo: Path) -> None:
    """params.yaml and dvc.lock as committed, the outputs as they record them."""
    run("git checkout -q params.yaml dvc.lock && dvc checkout -q", repo)
    assert set(_status(repo)) == {"check"}  # always changed: it fingerprints the data


def _outputs(repo: Path) -> set[Path]:
    folders = ("runs", "data/cache", "data/prepared", "results")
    return {p.relative_to(repo) for f in folders for p in (repo / f).rglob("*") if p.is_file()}


def _stale_after_check(repo: Path) -> set[str]:
    """The stages DVC says are out of date once check has rerun on the edited params (check
    writes each stage's view of the schedule, so DVC sees what the edit changed for it)."""
    run(["dvc", "repro", "check"], repo)
    return set(_status(repo)) - {"check"}  # always changed (it fingerprints the data)


def test_moving_a_block_reruns_what_reads_blocks_not_the_shared_run_or_normal(smoke):
    edit_params(smoke, "freeze.points", [{"block": 3, "epoch": 1}, {"block": 5, "epoch": 2}])
    stale = _stale_after_check(smoke)
    # FreezeOut, every cache and suffix (the discard method's schedule), the plan (its savings)
    # and the report rerun; the last point did not move, so the trade-offs measure the same
    assert stale == {"baseline@0-freezeout", *DISCARD, "plan", "report"}, stale
    assert not stale & {*UPSTREAM, "baseline@0-normal", "tradeoffs"}
    _restore(smoke)


def test_a_tolerance_edit_reruns_only_what_reads_the_cache_params(smoke):
    edit_params(smoke, "cache.tolerance", 0.05)
    stale = _stale_after_check(smoke)
    caches = {s for s in DISCARD if s.startswith("cache@")}
    # the plan sizes caches at the tolerance; the suffix stages follow their caches' new files
    assert stale == {"plan", *caches}, stale
    _restore(smoke)


@pytest.mark.parametrize(
    ("key", "value", "said"),
    [
        ("model.name", "resnet21", "unknown model 'resnet21'"),
        ("freeze.points", [{"block": 2, "epoch": 1}, {"block": 10, "epoch": 2}], "past the last"),
        ("model.kwargs", {"width": 2}, "refuses option width"),
    ],
)
def test_bad_params_stop_at_check_and_delete_nothing(smoke, key, value, said):
    before = _outputs(smoke)
    edit_params(smoke, key, value)
    done = run(["dvc", "repro"], smoke, check=False)
    told = done.stdout + done.stderr
    assert done.returncode != 0 and said in told and "Traceback" not in told, told
    assert "Running stage 'check'" in told and told.count("Running stage") == 1, told
    assert [line for line in done.stderr.splitlines() if line.startswith("error:")] == [
        next(line for line in done.stderr.splitlines() if said in line)
    ]
    assert "deleted" not in json.dumps(_status(smoke))
    assert _outputs(smoke) == before
    _restore(smoke)


def test_an_experiment_of_another_tolerance_reruns_the_caches_and_what_follows(smoke):
    out = run(["dvc", "exp", "run", "--temp", "-S", "cache.tolerance=0.05"], smoke).stdout
    ran = set(re.findall(r"Running stage '([^']+)'", out))
    assert ran == {"check", "plan", *DISCARD, "report"}, ran
    shown = json.loads(run(["dvc", "exp", "show", "--json"], smoke).stdout)
    found = _experiments(shown)
    assert 0.05 in found, found
    assert set(found[0.05]["acc"]) == {"normal", "freezeout", "discard", "discard_aug"}


def test_the_readmes_commands_for_a_finished_run(smoke):
    """`dvc exp show ...` and `dvc metrics show` as printed (after the experiment above): the
    headline numbers, one column each, no hash or bookkeeping columns."""
    cmds = readme_commands(SMOKE)
    assert {c.text.split()[1] for c in cmds} == {"exp", "metrics"}
    for c in cmds:
        out = run(["bash", "-c", f"COLUMNS=200 {c.text}"], smoke).stdout  # a wide terminal
        assert "acc.discard" in out, (c.text, out)
        assert not re.search(r"\b[0-9a-f]{32}\b", out), (c.text, out)  # md5 columns
        if c.text.startswith("dvc exp show"):
            header = out.splitlines()[1].split()
            # the tolerance that differs and the metrics it moved; no deps, no Created/State
            assert header[0] == "Experiment" and "cache.tolerance" in header, header
            headline = ("acc.", "ratio", "cache.", "flops", "mem")
            assert all(h.startswith(headline) for h in header[1:]), header


def test_a_sweep_entry_is_queued_run_and_collected(smoke):
    """`make sweep` (freezecache sweep) end to end on one grid entry: the smoke profile's own
    codec settings, so every stage but check comes back from DVC's run cache."""
    out = run(["freezecache", "sweep", "--only", "abs-0.1"], smoke).stdout
    assert "queued: sweep-abs-0.1" in out
    rows = json.loads((smoke / "results/codec_sweep.json").read_text())
    assert {r["method"] for r in rows} == {"discard", "discard_aug"}
    assert all(r["codec"] == "quant" and 0 < r["bits_per_value"] < 32 for r in rows)
    assert "| quant | 0.1 |" in (smoke / "results/codec_sweep.md").read_text()


def _experiments(shown) -> dict[float, dict]:
    """cache.tolerance -> headline metrics, per experiment in `dvc exp show --json`."""
    found: dict[float, dict] = {}
    for params, metrics in experiment_runs(shown):
        tol = params.get("cache", {}).get("tolerance")
        if tol is not None:
            found.setdefault(tol, metrics)
    return found
