"""Every committed result, how it is made, and whether it is current: ``freezecache results
status`` (like ``dvc status``, for the profiles, searches and benchmarks DVC does not track) and
``freezecache results run`` (``make results``: regenerate what is stale, in dependency order).

A result is current when its provenance (:mod:`freezecache.reporting.provenance`) matches the
checkout: the same profile params, the same code (the files its stage and upstream stages, or
its script, import), its files as they were written. Otherwise it is stale, with what changed.

A profile other than the default runs in its own clone under ``.results/<profile>`` (this
checkout's commit plus its uncommitted changes, DVC's cache shared), so params.yaml here is never
swapped; the clone and each search's scratch folder are kept, so a killed run continues where it
stopped: DVC's run cache and stage checkpoints there, a search's finished runs in its folder.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from freezecache.core.errors import FreezecacheError
from freezecache.pipeline.deps import PROVENANCE_CODE, ROOT, code_files, pipeline_code
from freezecache.reporting import provenance as prov

log = logging.getLogger(__name__)

WORK = ".results"  # the profiles' clones and the searches' scratch folders (git-ignored)
# What a clone never takes from this checkout: a run's outputs, made there (or restored by DVC).
GENERATED = ("runs/", "results/", "data/prepared", "data/cache", "dvc.lock", ".ckpt/", WORK)


@dataclass(frozen=True)
class Result:
    """A committed result: a pipeline stage's git-tracked outputs under a profile, or what a
    script writes."""

    name: str
    job: str  # the job of JOBS that makes it
    profile: str | None  # configs/<profile>.yaml, the params it is made from (None: none)
    main: str | None = None  # a script's result: its first file (names the provenance file)
    stage: str | None = None  # a pipeline result: the stage whose outputs it is
    scripts: tuple[str, ...] = ()  # a script's result: the scripts whose imports are its code
    stages: tuple[str, ...] = ()  # ...and the pipeline stages whose outputs it reads
    needs: str | None = None  # what make results cannot provide (then missing is not stale)

    def sidecar(self, root: Path = ROOT) -> Path:
        """Its provenance file (a pipeline result's is its stage's ``provenance`` output)."""
        if self.stage is None:
            return prov.sidecar(root / self.main)
        from freezecache.config import load_config
        from freezecache.pipeline import STAGES

        cfg = load_config(root / prov.PROFILES / f"{self.profile}.yaml")
        return root / STAGES[self.stage].path("provenance", cfg)

    def code(self, root: Path = ROOT) -> list[str]:
        """The files of code it depends on, as they are imported today."""
        if self.stage is not None:
            return pipeline_code(self.stage, root)
        files = {f for s in self.stages for f in pipeline_code(s, root)}
        for script in self.scripts:
            if (root / script).is_file():
                files |= set(code_files(root / script, root, PROVENANCE_CODE))
        return sorted(files)


@dataclass(frozen=True)
class Job:
    """One command line (or a few) that makes one or more results; ``workspace``: the profile
    whose clone it runs in (None: this checkout). ``{work}`` in a command is a scratch folder
    kept until the job succeeds, named by the job's inputs (a search resumes in it, and never
    from runs of other code)."""

    name: str
    commands: tuple[str, ...]
    workspace: str | None = None
    after: tuple[str, ...] = ()


_PIPELINE = ("freezecache pipeline", "dvc repro")
# What a benchmark reads of the profile's runs, made first (restored from DVC's cache when
# current): the starting weights, or the shared run up to the first freeze point.
_WEIGHTS, _PREFIX = "dvc repro pretrain", "dvc repro train_prefix@0"
_SCHEDULES = "3@1,6@2 3@1 3@1,5@2 2@1,5@2 3@2,6@4"
JOBS = {
    j.name: j
    for j in (
        Job("default", _PIPELINE),
        Job("scratch", _PIPELINE, workspace="scratch"),
        Job("timm", _PIPELINE, workspace="timm_regnet"),
        Job("flips", ("python benchmarks/flip_symmetry.py --out results/flip_symmetry.md",)),
        Job("bench-coding", ("python benchmarks/bench_coding.py --out results/bench_coding.json",)),
        Job(
            "bench",
            (_PREFIX, "python benchmarks/bench_cache.py"),
            after=("default", "bench-coding"),
        ),  # fmt: skip
        Job(
            "bench-scaling",
            ("python benchmarks/bench_scaling.py --json results/bench_scaling.json",),
        ),  # fmt: skip
        Job("bench-scale", ("make bench-scale",), after=("default",)),
        Job("sweep", ("freezecache sweep",), after=("default",)),
        Job(
            "schedule-search",
            (
                _WEIGHTS,
                "python benchmarks/schedule_search.py --out "
                "results/schedule_search.md "
                + " ".join(f"--schedule {s}" for s in _SCHEDULES.split()),
            ),
            after=("default",),
        ),  # fmt: skip
        Job(
            "recipe-search",
            (
                _WEIGHTS,
                "python benchmarks/recipe_search.py --params "
                "configs/default.yaml --out results/recipe_search --work {work}",
            ),
            after=("default",),
        ),  # fmt: skip
        Job(
            "adaptive",
            (
                _WEIGHTS,
                "python benchmarks/adaptive_search.py --params "
                "configs/default.yaml --out results/adaptive --work {work}",
            ),
            after=("default",),
        ),  # fmt: skip
        Job(
            "adaptive-scratch",
            (
                _WEIGHTS,
                "python benchmarks/adaptive_search.py --params "
                "params.yaml --out results/scratch/adaptive --work {work}",
            ),
            workspace="scratch",
            after=("scratch",),
        ),  # fmt: skip
        Job("gpu-check", ("make gpu-check",)),
    )
}

_ADAPTIVE = ("benchmarks/adaptive_search.py",)
RESULTS = {
    r.name: r
    for r in (
        Result("report", "default", "default", stage="report"),
        Result("plan", "default", "default", stage="plan"),
        Result("scratch", "scratch", "scratch", stage="report"),
        Result("scratch-plan", "scratch", "scratch", stage="plan"),
        Result("timm", "timm", "timm_regnet", stage="report"),
        Result("timm-plan", "timm", "timm_regnet", stage="plan"),
        Result(
            "flips",
            "flips",
            None,
            main="results/flip_symmetry.md",
            scripts=("benchmarks/flip_symmetry.py",),
        ),  # fmt: skip
        Result(
            "bench-coding",
            "bench-coding",
            None,
            main="results/bench_coding.json",
            scripts=("benchmarks/bench_coding.py",),
        ),  # fmt: skip
        # the bench reads the shared run up to the first point (train_prefix) when it is there
        Result(
            "bench",
            "bench",
            "default",
            main="results/bench.md",
            scripts=("benchmarks/bench_cache.py",),
            stages=("train_prefix",),
        ),  # fmt: skip
        # stage by stage on the smoke profile, in a scratch folder
        Result(
            "bench-scaling",
            "bench-scaling",
            "smoke",
            main="results/bench_scaling.md",
            scripts=("benchmarks/bench_scaling.py",),
            stages=("train_suffix",),
        ),  # fmt: skip
        Result(
            "bench-scale",
            "bench-scale",
            "default",
            main="results/bench_scale.md",
            scripts=("benchmarks/bench_scale.py",),
        ),  # fmt: skip
        Result(
            "sweep",
            "sweep",
            "default",
            main="results/codec_sweep.md",
            scripts=("src/freezecache/tooling/sweep.py",),
            stages=("report",),
        ),  # fmt: skip
        # the searches start from the profile's starting weights (the pretrain stage's)
        Result(
            "schedule-search",
            "schedule-search",
            "default",
            main="results/schedule_search.md",
            scripts=("benchmarks/schedule_search.py",),
            stages=("pretrain",),
        ),  # fmt: skip
        Result(
            "recipe-search",
            "recipe-search",
            "default",
            main="results/recipe_search.md",
            scripts=("benchmarks/recipe_search.py",),
            stages=("pretrain",),
        ),  # fmt: skip
        Result(
            "adaptive",
            "adaptive",
            "default",
            main="results/adaptive.md",
            scripts=_ADAPTIVE,
            stages=("pretrain",),
        ),  # fmt: skip
        Result(
            "adaptive-scratch",
            "adaptive-scratch",
            "scratch",
            scripts=_ADAPTIVE,
            main="results/scratch/adaptive.md",
            stages=("pretrain",),
        ),  # fmt: skip
        Result(
            "gpu",
            "gpu-check",
            "default",
            main="results/gpu/gpu_check.md",
            scripts=("benchmarks/gpu_check.py",),
            stages=("report",),
            needs="a CUDA machine: `make gpu-check` there",
        ),  # fmt: skip
    )
}


def stamp(script: str, files: list[Path], params: Path | None = None, **kw) -> Path:
    """Writes the provenance of what ``script`` (its ``__file__``) just wrote, ``files`` (the
    first names the provenance file), made from ``params``; returns the provenance file. Its
    code is what the registry says that script's results depend on. ``kw``:
    :func:`freezecache.reporting.provenance.record`'s ``duration_s``, ``device``, ``command``."""
    rel = Path(script).resolve().relative_to(ROOT.resolve()).as_posix()
    alone = Result(rel, "", None, scripts=(rel,))  # a script no result declares: its imports
    spec = next((r for r in RESULTS.values() if rel in r.scripts), alone)
    path = prov.sidecar(Path(files[0]))
    prov.record(path, files, code=spec.code(ROOT), params=params, root=ROOT, **kw)
    return path


# -- status -------------------------------------------------------------------------------------
@dataclass
class State:
    result: Result
    state: str  # current, stale, unknown (no provenance: counted as stale), missing (optional)
    why: list[str]
    record: dict | None

    @property
    def stale(self) -> bool:
        return self.state in ("stale", "unknown")


def state_of(result: Result, root: Path = ROOT) -> State:
    """Whether ``result`` is current in the checkout at ``root``, and what changed if not."""
    absent = [s for s in result.scripts if not (root / s).is_file()]
    if absent:  # declared by a branch that is not merged yet
        return State(result, "missing", [f"{', '.join(absent)} is not in this checkout"], None)
    path = result.sidecar(root)
    rec = prov.read(path)
    if rec is None:
        if result.needs and not path.parent.is_dir():
            return State(result, "missing", [f"needs {result.needs}"], None)
        return State(result, "unknown", [f"no provenance ({path.relative_to(root)} missing)"], rec)
    why = prov.changes(rec, code=result.code(root), profile=result.profile, root=root)
    return State(result, "stale" if why else "current", why, rec)


def status(root: Path = ROOT, names: list[str] | None = None) -> list[State]:
    return [state_of(RESULTS[n], root) for n in (names or RESULTS)]


def status_lines(states: list[State]) -> list[str]:
    """One line per result: name, state, and what changed or when it was made."""
    width = max(len(s.result.name) for s in states)
    out = []
    for s in states:
        if s.state == "current":
            rec = s.record
            said = f"{rec['date'][:10]}, commit {(rec['commit'] or '?')[:9]}"
        else:
            said = "; ".join(s.why)
        out.append(f"{s.result.name:<{width}}  {s.state:<7}  {said}")
    return out


def readme_notes(sources: dict[str, Path], root: Path = ROOT) -> dict[str, str]:
    """README section -> the line shown above it: its result's provenance, and a stale mark when
    the result is not current (sections whose file no result declares get none)."""
    notes = {}
    for section, source in sources.items():
        wanted = prov.sidecar(root / source)
        result = next((r for r in RESULTS.values() if r.sidecar(root) == wanted), None)
        if result is None or not (root / source).is_file():
            continue
        s = state_of(result, root)
        made = f"_Provenance: {prov.line(s.record)}_" if s.record else ""
        if s.stale:
            why = "; ".join(s.why)
            notes[section] = f"**Stale** ({why}): `make results` regenerates it. {made}".strip()
        else:
            notes[section] = made
    return notes


# -- make results -------------------------------------------------------------------------------
def expected_s(job: Job, root: Path = ROOT) -> float | None:
    """How long ``job`` took last time: the longest of its results' recorded durations."""
    took = [
        rec["duration_s"]
        for r in RESULTS.values()
        if r.job == job.name and (rec := prov.read(r.sidecar(root))) and rec.get("duration_s")
    ]
    return max(took) if took else None


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
    jobs = [j for j in order(sorted(stale_jobs)) if j.name in stale_jobs]
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
