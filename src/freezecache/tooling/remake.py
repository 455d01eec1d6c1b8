"""`make results` (``freezecache results run``): every stale result regenerated, in dependency
order, one progress line per job with its expected duration from the last run.

A profile other than the default runs in its own clone under ``.results/<profile>`` (this
checkout's commit plus its uncommitted changes, DVC's cache and run cache shared), so params.yaml
here is never swapped. The clone and each search's scratch folder are kept until the job
succeeds, so a killed run continues where it stopped: DVC's run cache and the stage checkpoints
in the clone, a search's finished runs in its folder (named by the digest of its inputs, so it
never resumes runs of other code or params).
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from freezecache.core.errors import FreezecacheError
from freezecache.core.io import read_json
from freezecache.pipeline.deps import ROOT
from freezecache.reporting import provenance as prov
from freezecache.tooling.results import JOBS, RESULTS, Job, Result, state_of, status

log = logging.getLogger(__name__)

WORK = ".results"  # the profiles' clones and the searches' scratch folders (git-ignored)
# What a clone never takes from this checkout: a run's outputs, made there (or restored by DVC).
GENERATED = ("runs/", "results/", "data/prepared", "data/cache", "dvc.lock", ".ckpt/", WORK)


def expected_s(job: Job, root: Path = ROOT) -> float | None:
    """How long ``job`` took last time: the longest of its results' recorded durations (a report
    made before provenance was recorded: the seconds of the stages it sums)."""
    took = []
    for r in RESULTS.values():
        if r.job != job.name:
            continue
        rec = prov.read(r.sidecar(root))
        if rec is not None:
            took.append(rec.get("duration_s") or 0.0)
        elif r.stage == "report" and r.output("json", root).is_file():
            took.append(read_json(r.output("json", root)).get("stage_seconds") or 0.0)
    return max(took) if any(took) else None


def order(names: list[str]) -> list[Job]:
    """The jobs named and, before each, the jobs it runs after (dependency order)."""
    out: list[Job] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in path:
            raise FreezecacheError(f"jobs run after each other in a circle: {' -> '.join(path)}")
        for before in JOBS[name].after:
            visit(before, (*path, name))
        if JOBS[name] not in out:
            out.append(JOBS[name])

    for name in names:
        visit(name, ())
    return out


def _env(workspace: Path) -> dict:
    """The environment of a job: this interpreter's tools first on PATH, the workspace's own
    library imported (a clone must run its code, not the checkout the venv points to)."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    env.update(DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(workspace / "src"))
    return env


def _git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise FreezecacheError(f"git {' '.join(args)} in {cwd} failed: {done.stderr.strip()}")
    return done.stdout


def _listed(cwd: Path) -> list[str]:
    """What a clone of ``cwd`` has: tracked files and untracked ones git does not ignore."""
    out = _git(cwd, "ls-files", "-co", "--exclude-standard", "-z")
    return [f for f in out.split("\0") if f and (cwd / f).is_file()]


def clone(root: Path, profile: str) -> Path:
    """``.results/<profile>``: a clone of ``root`` at its commit with its uncommitted changes,
    sharing DVC's cache (run cache included), params.yaml set to the profile. Reused: what ran
    there stays (runs/, data/, checkpoints), so a killed job continues."""
    dest = root / WORK / profile
    head = _git(root, "rev-parse", "HEAD").strip()
    if not (dest / ".git").is_dir():
        dest.parent.mkdir(parents=True, exist_ok=True)
        _git(root, "clone", "-q", "--shared", "--no-checkout", str(root), str(dest))
    _git(dest, "fetch", "-q", str(root), head)
    _git(dest, "checkout", "-q", "-f", "--detach", head)
    ours = {f for f in _listed(root) if not f.startswith(GENERATED)}
    for f in ours:  # the working copy's changes
        src, dst = root / f, dest / f
        if not dst.is_file() or dst.read_bytes() != src.read_bytes():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    for f in _listed(dest):
        if not f.startswith(GENERATED) and f not in ours:  # deleted here
            (dest / f).unlink()
    cache = (root / ".dvc" / "cache").resolve()
    (dest / ".dvc" / "config.local").write_text(f"[cache]\n    dir = {cache}\n")
    _run(f"freezecache profile {shlex.quote(profile)}", dest)
    return dest


def _run(command: str, cwd: Path) -> None:
    """Runs one command line in ``cwd``, its output passed through; one line when it fails."""
    log.info("%s$ %s", f"{cwd.name}/ " if cwd.parent.name == WORK else "", command)
    done = subprocess.run(command, shell=True, cwd=cwd, env=_env(cwd))
    if done.returncode != 0:
        raise FreezecacheError(f"`{command}` failed in {cwd} (exit {done.returncode})")


def _work(job: Job, root: Path) -> Path:
    """The job's scratch folder, named by the digest of its results' inputs (code and params)."""
    inputs = [
        (r.name, prov.code_digests(r.code(root), root), _params_now(r, root))
        for r in RESULTS.values()
        if r.job == job.name
    ]
    return Path(WORK) / "work" / f"{job.name}-{prov.digest(inputs)[:10]}"


def _params_now(result: Result, root: Path) -> dict | None:
    path = root / prov.PROFILES / f"{result.profile}.yaml"
    return prov.load_params(path) if result.profile else None


def _check_default(root: Path) -> None:
    """The default's results come from params.yaml: it must be configs/default.yaml."""
    if prov.load_params(root / "params.yaml") != prov.load_params(root / "configs/default.yaml"):
        raise FreezecacheError(
            "params.yaml is not configs/default.yaml, so `dvc repro` here would not make the "
            "default's results — save your edits as a profile, then `freezecache profile default`"
        )


def _uses_params_yaml(job: Job) -> bool:
    """Whether ``job`` runs here on params.yaml as the default profile."""
    mine = [r for r in RESULTS.values() if r.job == job.name]
    return job.workspace is None and any(r.profile == "default" for r in mine)


def _refresh(job: Job, where: Path) -> None:
    """A pipeline result DVC restored or judged current by its own inputs keeps its old
    provenance: rerun its (cheap) stage alone, so the provenance says this checkout."""
    for r in RESULTS.values():
        if r.job == job.name and r.stage is not None and state_of(r, where).stale:
            _run(f"dvc repro --force --single-item {r.stage}", where)


def run_job(job: Job, root: Path = ROOT) -> None:
    """Runs ``job`` in its workspace and brings its results (and their provenance) here."""
    if _uses_params_yaml(job):
        _check_default(root)
    where = root if job.workspace is None else clone(root, job.workspace)
    work = _work(job, root)
    for command in job.commands:
        _run(command.replace("{work}", shlex.quote(str(work))), where)
    _refresh(job, where)
    mine = [r for r in RESULTS.values() if r.job == job.name]
    for r in mine if where != root else ():
        rec = prov.read(r.sidecar(where))
        if rec is None:
            raise FreezecacheError(f"`{job.name}` wrote no {r.sidecar(where)}")
        for f in [*rec["files"], r.sidecar(where).relative_to(where).as_posix()]:
            (root / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(where / f, root / f)
    for r in mine:
        state = state_of(r, root)
        if state.stale:
            raise FreezecacheError(f"{r.name} is still stale after `{job.name}`: {state.why}")
    shutil.rmtree(where / work, ignore_errors=True)


def _minutes(seconds: float | None) -> str:
    return "unknown (no earlier run)" if seconds is None else f"~{seconds / 60:.0f} min"


def run_stale(root: Path = ROOT, names: list[str] | None = None, dry_run: bool = False) -> int:
    """Regenerates every stale result (or those of ``names``) in dependency order, one progress
    line per job with its expected duration; returns how many jobs ran."""
    states = status(root, names)
    for s in states:
        if s.state == "missing":
            print(f"skipped {s.result.name}: {'; '.join(s.why)}")
    stale_jobs = {s.result.job for s in states if s.stale and not s.result.needs}
    for s in states:
        if s.stale and s.result.needs:
            print(f"skipped {s.result.name} ({s.state}): needs {s.result.needs}")
    jobs = [j for j in order([n for n in JOBS if n in stale_jobs]) if j.name in stale_jobs]
    for i, job in enumerate(jobs, 1):
        made = ", ".join(r.name for r in RESULTS.values() if r.job == job.name)
        expected = _minutes(expected_s(job, root))
        print(f"[{i}/{len(jobs)}] {job.name} ({made}): expected {expected}", flush=True)
        if dry_run:
            continue
        start = time.time()
        run_job(job, root)
        print(f"[{i}/{len(jobs)}] {job.name}: done in {(time.time() - start) / 60:.1f} min",
              flush=True)  # fmt: skip
    return len(jobs)
