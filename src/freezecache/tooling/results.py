"""Every committed result, how it is made, and whether it is current: ``freezecache results
status``, like ``dvc status`` but for the profiles, searches and benchmarks DVC does not track
(``freezecache results run``, in :mod:`freezecache.tooling.remake`, regenerates what is stale).

A result is current when its provenance (:mod:`freezecache.reporting.provenance`) matches the
checkout: the same profile params, the same code (the files its stage and upstream stages, or
its script, import), its files as they were written. Otherwise it is stale, with what changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from freezecache.pipeline.deps import PROVENANCE_CODE, ROOT, code_files, pipeline_code
from freezecache.reporting import provenance as prov


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
        return self.output("provenance", root)

    def output(self, role: str, root: Path = ROOT) -> Path:
        """A pipeline result's output ``role`` under its profile's paths."""
        from freezecache.config import load_config
        from freezecache.pipeline import STAGES

        cfg = load_config(root / prov.PROFILES / f"{self.profile}.yaml")
        return root / STAGES[self.stage].path(role, cfg)

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


# fmt: off
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
        ),
        Job(
            "bench-scaling",
            ("python benchmarks/bench_scaling.py --json results/bench_scaling.json",),
        ),
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
        ),
        Job(
            "recipe-search",
            (
                _WEIGHTS,
                "python benchmarks/recipe_search.py --params "
                "configs/default.yaml --out results/recipe_search --work {work}",
            ),
            after=("default",),
        ),
        Job(
            "adaptive",
            (
                _WEIGHTS,
                "python benchmarks/adaptive_search.py --params "
                "configs/default.yaml --out results/adaptive --work {work}",
            ),
            after=("default",),
        ),
        Job(
            "adaptive-scratch",
            (
                _WEIGHTS,
                "python benchmarks/adaptive_search.py --params "
                "params.yaml --out results/scratch/adaptive --work {work}",
            ),
            workspace="scratch",
            after=("scratch",),
        ),
        Job("gpu-check", ("make gpu-check",)),
    )
}
# fmt: on


# fmt: off
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
        Result("flips", "flips", None, main="results/flip_symmetry.md",
               scripts=("benchmarks/flip_symmetry.py",)),
        Result("bench-coding", "bench-coding", None, main="results/bench_coding.json",
               scripts=("benchmarks/bench_coding.py",)),
        # the bench reads the shared run up to the first point (train_prefix) when it is there
        Result("bench", "bench", "default", main="results/bench.md",
               scripts=("benchmarks/bench_cache.py",), stages=("train_prefix",)),
        # stage by stage on the smoke profile, in a scratch folder
        Result("bench-scaling", "bench-scaling", "smoke", main="results/bench_scaling.md",
               scripts=("benchmarks/bench_scaling.py",), stages=("train_suffix",)),
        Result("bench-scale", "bench-scale", "default", main="results/bench_scale.md",
               scripts=("benchmarks/bench_scale.py",)),
        Result("sweep", "sweep", "default", main="results/codec_sweep.md",
               scripts=("src/freezecache/tooling/sweep.py",), stages=("report",)),
        # the searches start from the profile's starting weights (the pretrain stage's)
        Result("schedule-search", "schedule-search", "default",
               main="results/schedule_search.md", scripts=("benchmarks/schedule_search.py",),
               stages=("pretrain",)),
        Result("recipe-search", "recipe-search", "default", main="results/recipe_search.md",
               scripts=("benchmarks/recipe_search.py",), stages=("pretrain",)),
        Result("adaptive", "adaptive", "default", main="results/adaptive.md",
               scripts=_ADAPTIVE, stages=("pretrain",)),
        Result("adaptive-scratch", "adaptive-scratch", "scratch",
               main="results/scratch/adaptive.md", scripts=_ADAPTIVE, stages=("pretrain",)),
        Result("gpu", "gpu-check", "default", main="results/gpu/gpu_check.md",
               scripts=("benchmarks/gpu_check.py",), stages=("report",),
               needs="a CUDA machine: `make gpu-check` there"),
    )
}
# fmt: on


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
