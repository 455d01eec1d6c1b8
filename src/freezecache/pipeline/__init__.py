"""The pipeline, declared once: each stage's command, outputs, params and data deps.

``dvc.yaml`` is rendered from these declarations (:mod:`freezecache.tooling.render`, ``freezecache
pipeline``, a developer command; a test keeps the committed file in step) and the steps read
their output paths from them too, so a file name is spelled only here. The rendered file is
DVC-templated: its shape (seeds x methods x freeze points) comes from params.yaml through
``matrix``.

Freeze points are matrix slots ``p0, p1, ...``, each naming the run it continues from (``prev``:
``../prefix``, the run shared by every method, for the first point; the slot before for the
others). DVC cannot refer to the previous item of a matrix, so the slots are rendered, one per
point: changing the number of points re-renders dvc.yaml; their blocks and epochs come from
params.yaml.

Params are as narrow as the code that reads them. DVC params name mapping keys, never a list
element, so where a stage reads part of the ``freeze`` section (the shared run its first epoch
and the criterion, a method its own points, the trade-offs the last point) it depends instead
on a small file the ``check`` stage writes for it (:func:`schedule_views`): moving a block
reruns what reads blocks, not the shared run or Normal.

Code deps are derived from each stage script's imports (:mod:`freezecache.pipeline.deps`), so
editing a module reruns exactly the stages that import it. Every stage reads this module for
its output paths; the rendering lives in :mod:`freezecache.tooling.render`, the plots in
:mod:`freezecache.reporting.plots`, so neither is a dep of any stage.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path

from freezecache.config import Train
from freezecache.core.methods import method

# Matrix variables: what each iterates over and the stage argument it becomes.
MATRIX = {
    "seed": ("${seeds}", "--seed"),
    "method.baseline": ("${methods.baselines}", "--method"),
    "method.discard": ("${methods.discard}", "--method"),
    "p": (None, "--point"),  # rendered: one item per freeze point of params.yaml (render.py)
}
SECTIONS = (
    "paths", "seeds", "methods", "data", "pretrain", "model", "train", "runtime", "freeze",
    "rank", "cache", "loader", "augment", "distributed",
)  # fmt: skip


@dataclass(frozen=True)
class Out:
    """One output of a stage; ``path`` is a template (see :meth:`Stage.path`)."""

    path: str
    # True: DVC caches it, so its run cache can restore the stage in a queued experiment's
    # workspace instead of rerunning it. False (the report's tables): git tracks it.
    cache: bool = True
    plot: dict | None = None  # declared as a DVC plot with these properties
    metric: bool = False  # declared as a DVC metrics file (only the report's headline)
    # DVC keeps it while the stage reruns (check's: bad params delete nothing, its own outputs
    # included); such a stage has no run cache, which a stage as quick as check does not need.
    persist: bool = False


@dataclass(frozen=True)
class Stage:
    """A stage: ``stages/<name>.py`` run once per matrix item."""

    name: str
    matrix: tuple[str, ...] = ()  # keys of MATRIX
    deps: tuple[str, ...] = ()  # data deps (templates); code deps are derived
    params: tuple[str, ...] = ()
    outs: dict[str, Out] = field(default_factory=dict)
    # DVC runs it on every `dvc repro` (it fingerprints data outside what dvc.yaml can name);
    # what follows reruns only when its outputs change
    always_changed: bool = False

    @property
    def script(self) -> str:
        return f"stages/{self.name}.py"

    def path(self, role: str, cfg, **item) -> Path:
        """The file of output ``role`` for one matrix item (``seed=``, ``method=``, ``p=``)."""
        return fill(self.outs[role].path, cfg, **item)

    @property
    def dvc_params(self) -> tuple[str, ...]:
        """The params keys DVC reruns the stage on: its own, and ``distributed`` when its
        results depend on the number of processes (:data:`LAUNCHED`)."""
        return (*self.params, *(("distributed",) if LAUNCHED.get(self.name) else ()))

    def item_name(self, item: dict) -> str:
        """DVC's name of one matrix item, e.g. ``cache@0-discard-p1`` (also its logs' and its
        checkpoint folder's); a stage without a matrix has its own name."""
        if not self.matrix:
            return self.name
        values = [v.name if hasattr(v, "block") else v for v in item.values()]
        return "@".join([self.name, "-".join(str(v) for v in values)])

    def items(self, cfg) -> list[dict]:
        """The stage's matrix items under ``cfg`` (``{"seed": first seed}`` without a matrix)."""
        if not self.matrix:
            return [{"seed": cfg.seeds[0]}]
        axes = [_matrix_values(cfg, key) for key in self.matrix]
        names = [key.split(".")[0] for key in self.matrix]
        return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*axes)]


def _matrix_values(cfg, key: str) -> list:
    """What matrix variable ``key`` iterates over under ``cfg`` (MATRIX's ``${...}``)."""
    source = MATRIX[key][0]
    if source is None:  # the freeze points: rendered one slot each
        return list(cfg.points)
    value = cfg
    for part in source.removeprefix("${").removesuffix("}").split("."):
        value = getattr(value, part)
    return list(value)


def fill(template: str, cfg, **item) -> Path:
    """A path template with the values of a config and a matrix item, normalised."""
    text = template.format(paths=cfg.paths, first_seed=cfg.seeds[0], **item)
    return Path(os.path.normpath(text))


# -- the declarations ---------------------------------------------------------------------------
CHECKED = "{paths.runs}/params.ok"
DATA_SOURCE = "{paths.runs}/sources/data.json"  # the fingerprint of data's files (steps.sources)
PRETRAIN_SOURCE = "{paths.runs}/sources/pretrain.json"  # ... and of pretrain.data's
ALLOWED = "{paths.runs}/allowed_blocks.json"  # the plan's blocks a decision may freeze at
DATA = "{paths.data}"
WEIGHTS = "{paths.runs}/pretrain/state.pt"
SEED = "{paths.runs}/s{seed}"
PREFIX = SEED + "/prefix/state.pt"
POINT = SEED + "/{method}/{p.name}"  # p0, p1, ...: freeze points in their order
START = SEED + "/{method}/{p.prev}/state.pt"  # the run a freeze point continues from
CACHE = "{paths.cache}/s{seed}/{method}/{p.name}.h5"
DECISION = SEED + "/prefix/decision.json"  # the freeze points as the shared run decided them
# What each consumer reads of the freeze section, written by check (schedule_views): the shared
# run, each method's stages, the trade-offs.
SCHEDULE = "{paths.runs}/schedule_views"
SHARED_VIEW = SCHEDULE + "/prefix.json"
METHOD_VIEW = SCHEDULE + "/{method}.json"
LAST_VIEW = SCHEDULE + "/tradeoffs.json"
# The train keys each kind of stage reads: the suffix reads them all; stages on raw images not
# the suffix's own (Train.SUFFIX_ONLY); pretrain neither its epochs nor lr (pretrain.epochs/lr).
IMAGE_TRAIN_KEYS = tuple(f"train.{k}" for k in Train.model_fields if k not in Train.SUFFIX_ONLY)
PRETRAIN_TRAIN_KEYS = tuple(k for k in IMAGE_TRAIN_KEYS if k not in ("train.epochs", "train.lr"))
IMAGES = ("model", *IMAGE_TRAIN_KEYS, "runtime")  # what a stage training on raw images reads


def _run_outs(folder: str) -> dict[str, Out]:
    """What every training stage writes: weights, costs, DVCLive's metrics and curves."""
    return {
        "state": Out(f"{folder}/state.pt"),
        "costs": Out(f"{folder}/costs.json"),
        "metrics": Out(f"{folder}/live/metrics.json"),
        "plots": Out(f"{folder}/live/plots/metrics", plot={"x": "step"}),
    }


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        # Validates params.yaml, the model it names included, and scans the datasets before any
        # stage deletes its outputs (every stage depends on it); writes each consumer's view of
        # the schedule; runs every time, to fingerprint the datasets' files. Its outputs persist:
        # a check that fails deletes nothing, its own files included.
        Stage(
            "check",
            params=SECTIONS,
            outs={
                "ok": Out(CHECKED, persist=True),
                "views": Out(SCHEDULE, persist=True),
                "data_source": Out(DATA_SOURCE, persist=True),
                "pretrain_source": Out(PRETRAIN_SOURCE, persist=True),
            },
            always_changed=True,
        ),
        # model.name: the crop of the model's own data config (data.resize: crop)
        Stage(
            "prepare",
            deps=(CHECKED, DATA_SOURCE),
            params=("data", "model.name"),
            outs={"data": Out(DATA)},
        ),
        # The starting weights: pre-trained on the source split, a local file, or none.
        Stage(
            "pretrain",
            deps=(CHECKED, PRETRAIN_SOURCE, "{paths.weights}"),
            # fine-tuning's train settings, but its own epochs and lr (pretrain.epochs/lr)
            params=("pretrain", "model", "runtime", *PRETRAIN_TRAIN_KEYS),
            outs={
                "state": Out(WEIGHTS),
                "costs": Out("{paths.runs}/pretrain/costs.json"),
                "metrics": Out("{paths.runs}/pretrain/live/metrics.json"),
            },
        ),
        # Cache sizes, savings and time per block, before any training; stops a schedule whose
        # caches would not fit. Its "allowed" output (the blocks a decision may freeze at)
        # changes only when that set does.
        Stage(
            "plan",
            deps=(CHECKED, DATA, WEIGHTS),
            # seeds and methods: the caches the schedule needs; the points: its savings
            params=(
                *IMAGES,
                "seeds",
                "methods",
                "freeze.points",
                "rank",
                "cache",
                "augment",
                "loader",
            ),  # fmt: skip
            outs={
                "allowed": Out(ALLOWED),
                "json": Out("{paths.results}/plan.json", cache=False),
                "md": Out("{paths.results}/plan.md", cache=False),
                # where the two above came from (freezecache.reporting.provenance)
                "provenance": Out("{paths.results}/plan.provenance.json", cache=False),
            },
        ),
        # The whole model up to the first freeze point, which it decides when the schedule
        # says auto (decision.json; its criterion's statistics are curves either way).
        Stage(
            "train_prefix",
            matrix=("seed",),
            deps=(CHECKED, SHARED_VIEW, ALLOWED, DATA, WEIGHTS),
            params=IMAGES,
            outs={
                **_run_outs(SEED + "/prefix"),
                "decision": Out(DECISION),
                "criterion": Out(SEED + "/prefix/criterion/plots/metrics", plot={"x": "step"}),
            },
        ),
        Stage(
            "baseline",
            matrix=("seed", "method.baseline"),
            deps=(CHECKED, METHOD_VIEW, DATA, WEIGHTS, PREFIX, DECISION),
            params=IMAGES,
            outs=_run_outs(SEED + "/{method}"),
        ),
        Stage(
            "cache",
            matrix=("seed", "method.discard", "p"),
            deps=(CHECKED, METHOD_VIEW, DATA, START, DECISION),
            # train.flip_p: whether flipped views are ranked and stored (Config.stores_flips)
            params=("model", "runtime", "rank", "cache", "train.precision", "train.flip_p"),
            outs={
                "cache": Out(CACHE),
                "ranking": Out(POINT + "/ranking.json"),
                "stats": Out(POINT + "/cache.json"),
            },
        ),
        Stage(
            "train_suffix",
            matrix=("seed", "method.discard", "p"),
            deps=(CHECKED, METHOD_VIEW, DATA, START, CACHE, DECISION),
            params=("model", "train", "runtime", "augment", "loader"),
            outs=_run_outs(POINT),
        ),
        Stage(
            "tradeoffs",
            deps=(
                CHECKED,
                LAST_VIEW,
                DATA,
                "{paths.runs}/s{first_seed}/prefix/state.pt",
                "{paths.runs}/s{first_seed}/prefix/decision.json",
            ),  # fmt: skip
            params=IMAGES,
            outs={
                "json": Out("{paths.results}/tradeoffs.json"),
                "md": Out("{paths.results}/tradeoffs.md"),
            },
        ),
        Stage(
            "report",
            # the data: class names, per-class counts and test labels (per-class accuracy)
            deps=(
                DATA,
                "{paths.runs}",
                "{paths.results}/tradeoffs.json",
                "{paths.results}/plan.json",
            ),
            params=("seeds", "methods", "freeze.points", "train.epochs", "data", "model"),
            outs={
                "md": Out("{paths.results}/report.md", cache=False),
                "json": Out("{paths.results}/report.json", cache=False),
                "metrics": Out("{paths.results}/metrics.json", cache=False, metric=True),
                "summary": Out("{paths.results}/summary.csv", cache=False),
                "curves": Out("{paths.results}/curves.csv", cache=False),
                "memory": Out("{paths.results}/memory.csv", cache=False),
                "cache": Out("{paths.results}/cache.csv", cache=False),
                "provenance": Out("{paths.results}/report.provenance.json", cache=False),
            },
        ),
    )
}

# Stages whose command goes through the launcher (torchrun when distributed.world_size > 1), and
# whether their results depend on the number of processes (then `distributed` is one of their
# params). A cache built by rank 0 or by every rank holds the same features.
LAUNCHED = {"pretrain": True, "train_prefix": True, "baseline": True, "cache": False,
            "train_suffix": True}  # fmt: skip
# Stages that keep resumable work under paths.checkpoints (epoch checkpoints, cache spools).
RESUMABLE = ("pretrain", "train_prefix", "baseline", "cache", "train_suffix")


def schedule_views(cfg) -> dict[Path, dict]:
    """What each consumer reads of ``freeze`` (the file check writes for it -> its content):
    the shared run, where it stops (the first point's epoch; an ``auto`` first point as
    written) and the criterion it measures either way (deciding by it when auto; a profile
    without the section gets the defaults, which DVC could not name as a param); each method,
    the points its stages train with (none for a method that does not freeze: Normal continues
    from the shared run where it stopped); the trade-offs, the last point (the suffix they
    measure)."""
    points = [{"block": p.block, "epoch": p.epoch} for p in cfg.points]
    shared = points[0] if cfg.auto else {"epoch": points[0]["epoch"]}
    shared = {**shared, "criterion": cfg.criterion.model_dump(mode="json")}
    views = {fill(SHARED_VIEW, cfg): shared, fill(LAST_VIEW, cfg): {"point": points[-1]}}
    for name in cfg.methods.all:
        views[fill(METHOD_VIEW, cfg, method=name)] = {
            "points": points if method(name).uses_points else []
        }
    return views


def method_runs(cfg, seed: int, name: str) -> list[tuple[Stage, dict]]:
    """The training stages that make up method ``name``'s run for one seed, in order, with their
    matrix items: the shared prefix (when the method starts from it), then its baseline stage, or
    each freeze point's cache build and suffix training. The one place that says which stages
    a method's run is made of (the report, the wall time and the chain of points read it)."""
    m = method(name)
    item = {"seed": seed, "method": name}
    runs = [(STAGES["train_prefix"], {"seed": seed})] if m.shared_prefix else []
    if m.kind == "baseline":
        return [*runs, (STAGES["baseline"], item)]
    for p in cfg.points:
        runs += [(STAGES["cache"], {**item, "p": p}), (STAGES["train_suffix"], {**item, "p": p})]
    return runs


def start_of_point(cfg, seed: int, name: str, p) -> Path:
    """The state file freeze point ``p`` of method ``name`` continues from: the output of the
    training stage before it in :func:`method_runs` (the shared prefix, or the point before)."""
    runs = [(s, i) for s, i in method_runs(cfg, seed, name) if "state" in s.outs]
    at = next(k for k, (s, i) in enumerate(runs) if s.name == "train_suffix" and i["p"] == p)
    stage, item = runs[at - 1]
    return stage.path("state", cfg, **item)


def check_rendered(cfg, dvc_yaml: Path = Path("dvc.yaml")) -> None:
    """Refuse params whose number of freeze points is not the one dvc.yaml has stages for: DVC
    cannot derive a point's predecessor, so ``freezecache pipeline`` renders one matrix item
    per point (and ``make repro`` runs it)."""
    from freezecache.core.errors import FreezecacheError
    from freezecache.core.yamlio import load_yaml

    if not dvc_yaml.is_file():
        return
    stages = load_yaml(dvc_yaml).get("stages", {})
    items = stages.get("cache", {}).get("matrix", {}).get("p")
    if isinstance(items, list) and len(items) != len(cfg.points):
        raise FreezecacheError(
            f"params.yaml has {len(cfg.points)} freeze points but {dvc_yaml} has stages for "
            f"{len(items)} — run `freezecache pipeline` (or `make repro`) first, then "
            "`dvc repro` or `dvc exp run`"
        )
