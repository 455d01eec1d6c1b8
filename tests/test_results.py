"""Where each result came from and whether it is current: provenance files, `freezecache results
status` in a copy of the project (an edit of the cache writer, an edit of the scratch profile),
the README's stale marks, and the clones `make results` runs other profiles in."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, project_copy, run, smoke_copy
from freezecache.core.errors import FreezecacheError
from freezecache.pipeline import STAGES
from freezecache.pipeline.deps import PROVENANCE_CODE, pipeline_code, pipeline_params, upstream
from freezecache.reporting import provenance as prov
from freezecache.reporting.report import README_MARK, update_readme
from freezecache.tooling import remake
from freezecache.tooling import results as res
from freezecache.tooling.cli import README_SECTIONS

WRITER = "src/freezecache/cache/writer.py"


def test_a_result_depends_on_its_stage_and_every_stage_upstream():
    assert upstream("plan") == ["check", "prepare", "pretrain", "plan"]
    assert upstream("report") == list(STAGES)  # every stage feeds the report
    # {first_seed} reads what {seed} writes: the trade-offs read the shared prefix run
    assert "train_prefix" in upstream("tradeoffs") and "cache" not in upstream("tradeoffs")
    code = pipeline_code("report")
    assert WRITER in code and "stages/train_suffix.py" in code
    assert not set(code) & PROVENANCE_CODE  # recording provenance changes no result
    assert WRITER not in pipeline_code("pretrain")  # the plan reads the cache code, not this
    assert "distributed" in pipeline_params("report") and "paths" not in pipeline_params("report")


def test_the_registry_is_consistent():
    assert {r.job for r in res.RESULTS.values()} <= set(res.JOBS)
    for r in res.RESULTS.values():
        assert (r.stage is None) != (r.main is None), r.name  # a stage's outputs or a script's
        assert r.stage is None or "provenance" in STAGES[r.stage].outs
        assert r.profile is None or (ROOT / "configs" / f"{r.profile}.yaml").is_file(), r.name
    for script in {s for r in res.RESULTS.values() for s in r.scripts}:
        # stamp() reads a script's code from the first result that names it
        specs = {(r.scripts, r.stages) for r in res.RESULTS.values() if script in r.scripts}
        assert len(specs) == 1, script
    # each README section shows a result the registry knows (its provenance line)
    sidecars = {r.sidecar(ROOT) for r in res.RESULTS.values()}
    for section, source in README_SECTIONS.items():
        assert prov.sidecar(ROOT / source) in sidecars, section
    names = [j.name for j in remake.order(["adaptive-scratch", "bench"])]
    assert names.index("scratch") < names.index("adaptive-scratch")
    assert names.index("default") < names.index("bench")
    assert names.index("bench-coding") < names.index("bench")


def test_provenance_records_and_compares(tmp_path):
    (tmp_path / "configs").mkdir()
    shutil.copy(ROOT / "configs/smoke.yaml", tmp_path / "configs/smoke.yaml")
    (tmp_path / "code.py").write_text("x = 1\n")
    out = tmp_path / "results/thing.md"
    out.parent.mkdir()
    out.write_text("| a |\n")
    side = prov.sidecar(out)
    assert side.name == "thing" + prov.SUFFIX
    rec = prov.record(side, [out], code=["code.py"], params=tmp_path / "configs/smoke.yaml",
                      root=tmp_path, keys=["train", "cache.tolerance"])  # fmt: skip
    assert prov.read(side) == json.loads(side.read_text()) == rec
    assert rec["profile"] == "smoke" and list(rec["files"]) == ["results/thing.md"]
    assert rec["machine"]["cores"] > 0 and rec["machine"]["device"] == "cpu"
    assert rec["commit"] is None  # not a git checkout: said, not guessed

    def changes() -> list[str]:
        return prov.changes(prov.read(side), code=["code.py"], profile="smoke", root=tmp_path)

    assert changes() == []
    line = prov.line(rec)
    assert "profile smoke (params " in line and "\n" not in line and "no commit" in line
    raw = yaml.safe_load((tmp_path / "configs/smoke.yaml").read_text())
    raw["augment"]["noise_std"] = 0.2  # a key the result does not read
    (tmp_path / "configs/smoke.yaml").write_text(yaml.safe_dump(raw))
    assert changes() == []
    raw["cache"]["tolerance"] = 0.2
    raw["train"]["lr"] = 0.5
    (tmp_path / "configs/smoke.yaml").write_text(yaml.safe_dump(raw))
    assert changes() == ["params of configs/smoke.yaml: cache.tolerance, train.lr"]
    (tmp_path / "code.py").write_text("x = 2\n")
    out.write_text("| b |\n")
    assert changes()[1:] == ["code: code.py", "files changed after it was made: results/thing.md"]
    assert prov.changes(prov.read(side), code=["code.py"], profile="default", root=tmp_path)[
        0
    ].startswith("made from smoke, not configs/default.yaml")


def _stamp_everything(repo: Path) -> list[str]:
    """Provenance for every result the registry declares, as if each was made now from the
    copy's own files (the committed results carry none yet); returns the names stamped."""
    from freezecache.config import load_config

    done = []
    for r in res.RESULTS.values():
        if r.needs or any(not (repo / s).is_file() for s in r.scripts):
            continue  # a GPU, or a script of a branch not merged here
        params = repo / "configs" / f"{r.profile}.yaml" if r.profile else None
        if r.stage is not None:
            cfg = load_config(params)
            stage = STAGES[r.stage]
            files = [repo / stage.path(k, cfg) for k, o in stage.outs.items()
                     if not o.cache and k != "provenance"]  # fmt: skip
            keys = pipeline_params(r.stage)
        else:
            files, keys = [repo / r.main], None
        for f in files:
            if not f.is_file():  # never made yet (the adaptive search on scratch)
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_text("placeholder\n")
        prov.record(r.sidecar(repo), files, code=r.code(repo), params=params, root=repo,
                    keys=keys)  # fmt: skip
        done.append(r.name)
    return done


def _states(repo: Path) -> dict[str, str]:
    """Result -> its state, in this process."""
    return {s.result.name: s.state for s in res.status(repo)}


def _status(repo: Path) -> tuple[int, dict[str, str]]:
    """`freezecache results status` in ``repo``: its exit status, result -> state."""
    done = run(["freezecache", "results", "status"], repo, check=False)
    assert "Traceback" not in done.stderr, done.stderr
    states = {}
    for line in done.stdout.splitlines():
        name, state, *_ = line.split()
        states[name] = state
    return done.returncode, states


def test_status_in_a_copy_follows_the_code_and_the_profiles(tmp_path):
    repo = project_copy(tmp_path / "repo")
    shutil.copytree(ROOT / "results", repo / "results", dirs_exist_ok=True)
    for made in (repo / "results").rglob(f"*{prov.SUFFIX}"):  # start from none recorded
        made.unlink()
    assert _states(repo)["report"] == "unknown"  # no provenance: counted as stale
    stamped = _stamp_everything(repo)
    assert {"report", "plan", "scratch", "timm", "bench", "sweep", "flips"} <= set(stamped)

    code, states = _status(repo)
    assert code == 0, states
    assert {n for n, s in states.items() if s != "current"} == set(res.RESULTS) - set(stamped)
    assert all(states[n] == "missing" for n in set(res.RESULTS) - set(stamped))

    # a line of the cache writer: every result whose code imports it, and only those
    writer = repo / WRITER
    text = writer.read_text()
    writer.write_text(text.replace('"""', '"""Edited. ', 1))
    code, states = _status(repo)
    stale = {n for n, s in states.items() if s == "stale"}
    expected = {n for n in stamped if WRITER in res.RESULTS[n].code(repo)}
    assert code == 1 and stale == expected
    assert {"report", "scratch", "timm", "plan", "bench", "sweep"} <= stale
    assert "flips" not in stale and "schedule-search" not in stale  # no cache there
    readme = repo / "README.md"
    update_readme(
        {k: repo / v for k, v in README_SECTIONS.items()},
        readme,
        notes=res.readme_notes({k: Path(v) for k, v in README_SECTIONS.items()}, repo),
    )
    section = readme.read_text().split(README_MARK.format(name="results", edge="start"))[1]
    assert section.startswith(f"\n**Stale** (code: {WRITER}): `make results` regenerates it.")
    flips = readme.read_text().split(README_MARK.format(name="flips", edge="start"))[1]
    assert flips.startswith("\n_Provenance: `") and "· no params ·" in flips.split("\n")[1]
    writer.write_text(text)
    assert set(_states(repo).values()) == {"current", "missing"}

    # the scratch profile: its results only
    profile = repo / "configs/scratch.yaml"
    raw = yaml.safe_load(profile.read_text())
    raw["train"]["lr"] = 0.1
    profile.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert {n for n, s in _states(repo).items() if s == "stale"} == {
        "scratch", "scratch-plan", "adaptive-scratch"
    }  # fmt: skip
    said = run(["freezecache", "results", "status", "scratch"], repo, check=False).stdout
    assert said.split() == ["scratch", "stale", "params", "of", "configs/scratch.yaml:", "train.lr"]


def test_make_results_runs_what_is_stale_in_order_with_its_expected_time(tmp_path):
    repo = project_copy(tmp_path / "repo")
    shutil.copytree(ROOT / "results", repo / "results", dirs_exist_ok=True)
    _stamp_everything(repo)
    writer = repo / WRITER
    writer.write_text(writer.read_text() + "# edited\n")
    done = run(["freezecache", "results", "run", "--dry-run"], repo)
    lines = [line for line in done.stdout.splitlines() if line.startswith("[")]
    jobs = [line.split()[1] for line in lines]
    stale = {r.job for r in res.RESULTS.values() if WRITER in r.code(repo) and not r.needs}
    stale -= {"bench-scale"} if not (repo / "benchmarks/bench_scale.py").is_file() else set()
    assert set(jobs) == stale and jobs.index("default") < jobs.index("bench")
    assert all(": expected ~" in line and line.endswith(" min") for line in lines), lines
    assert "skipped gpu: needs a CUDA machine" in done.stdout
    done = run(["freezecache", "results", "status", "nonsense"], repo, check=False)
    assert done.returncode == 2 and done.stderr.startswith("error: no result nonsense")


def test_a_profile_runs_in_its_own_clone_and_params_yaml_stays(tmp_path):
    repo = project_copy(tmp_path / "repo")
    run("git init -q && git config user.email ci@example.com && git config user.name ci", repo)
    run("git add -A && git commit -qm base", repo)
    (repo / WRITER).write_text((repo / WRITER).read_text() + "# not committed\n")
    (repo / "new_helper.py").write_text("# untracked, not ignored\n")
    params = (repo / "params.yaml").read_text()
    dest = remake.clone(repo, "scratch")
    assert dest == repo / remake.WORK / "scratch"
    assert (dest / WRITER).read_text() == (repo / WRITER).read_text()  # the working copy
    assert (dest / "new_helper.py").is_file()
    assert (dest / "params.yaml").read_text() == (repo / "configs/scratch.yaml").read_text()
    assert (repo / "params.yaml").read_text() == params
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    assert prov.commit(dest, [WRITER]) == (head.stdout.strip(), True)
    assert str((repo / ".dvc/cache").resolve()) in (dest / ".dvc/config.local").read_text()
    assert "?? " not in run(["git", "status", "--short"], repo).stdout.replace(
        "?? new_helper.py", ""
    )  # the clone is ignored here
    # reused: a file made there stays, an edit here arrives, a deletion here is a deletion there
    (dest / "runs").mkdir(exist_ok=True)
    (dest / "runs/kept").write_text("a finished stage's output\n")
    (repo / "new_helper.py").unlink()
    (repo / WRITER).write_text((repo / WRITER).read_text() + "# again\n")
    remake.clone(repo, "scratch")
    assert (dest / "runs/kept").is_file() and not (dest / "new_helper.py").exists()
    assert (dest / WRITER).read_text().endswith("# again\n")


@pytest.mark.parametrize("edited", [True, False])
def test_the_default_job_refuses_an_edited_params_yaml(tmp_path, edited):
    repo = project_copy(tmp_path / "repo")
    if edited:
        raw = yaml.safe_load((repo / "params.yaml").read_text())
        raw["train"]["epochs"] = 2
        (repo / "params.yaml").write_text(yaml.safe_dump(raw))
        with pytest.raises(FreezecacheError, match="params.yaml is not configs/default.yaml"):
            remake._check_default(repo)
    else:
        remake._check_default(repo)


@pytest.mark.slow
@pytest.mark.extended  # a pipeline of its own in a clone
def test_a_job_runs_in_a_clone_and_brings_its_result_back(smoke_run, tmp_path, monkeypatch):
    """`make results` for a profile other than this checkout's: the smoke plan in its clone
    (which shares this checkout's DVC cache); the result and its provenance come back,
    current, and nothing here changes but them (the plan's own files: the sidecar removed
    below is one of the stage's outputs, so DVC runs it again and its timings are new)."""
    repo = smoke_copy(smoke_run, tmp_path / "repo")
    job = res.Job("smoke", ("dvc repro plan",), workspace="smoke")
    result = res.Result("smoke-plan", "smoke", "smoke", stage="plan")
    monkeypatch.setitem(res.JOBS, "smoke", job)
    monkeypatch.setattr(res, "RESULTS", {"smoke-plan": result})
    monkeypatch.setattr(remake, "RESULTS", res.RESULTS)
    side = result.sidecar(repo)
    side.unlink()  # as if it had never been made here
    params = (repo / "params.yaml").read_bytes()
    remake.run_job(job, repo)
    assert res.state_of(result, repo).state == "current"
    assert prov.read(side)["profile"] == "smoke"
    assert (repo / "params.yaml").read_bytes() == params
    changed = run(["git", "status", "--short"], repo).stdout.split("\n")
    plan = {"results/plan.json", "results/plan.md", "results/plan.provenance.json"}
    assert {line[3:] for line in changed if line} <= plan, changed
