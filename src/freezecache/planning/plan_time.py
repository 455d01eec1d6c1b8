"""The plan's time prediction per candidate block, before any training: each method's seconds
after the shared run and from when a discard run would overtake FreezeOut, from a few timed steps
on a real batch and what a stage process costs on this machine.

Per block: a FreezeOut step (the frozen prefix forward, the rest trained) and a step of the rest
from features, the cache's batch read, decoded and augmented as the training stage does it
(from small caches of the batch's features built by the cache stage's writer), validation
through the whole model (FreezeOut) or the rest (the discard methods, on features computed
once). The one-off seconds of each method's stages come from :class:`Overheads`, measured once
per plan: every stage process's start-up (its script spawned, as DVC spawns it), its setup
(the data on the device, the model and a run state loaded), saving a checkpoint each epoch, the
test and the accounting; a discard method adds a second process (its cache stage), the prefix's
forward over the training set (twice with stored flipped views) and the cache's writing, then
the suffix's loader over the whole cache, the validation features and the first use of the
cache's decode path in a process. The break-even is the one-off seconds beyond FreezeOut's over
the seconds saved per epoch.
"""

from __future__ import annotations

import copy
import math
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from freezecache.cache import Build, CacheSpec, CacheWriter, fused
from freezecache.cache.features import features_for
from freezecache.codecs.registry import calibrate
from freezecache.config import AUTO
from freezecache.core import runtime
from freezecache.models import split
from freezecache.pipeline import MATRIX, STAGES
from freezecache.training import rank
from freezecache.training.train import RunState, Trainer, set_frozen

REPEATS = 3  # timed repeats per measurement (the median), after one untimed
ROUNDS = 7  # rounds of the per-epoch steps, taken in turn (the median of each)


def _seconds(fn, device: torch.device) -> float:
    """Median seconds of ``fn()`` over :data:`REPEATS` runs after a warm-up."""
    return _interleaved({"fn": fn}, device, REPEATS)["fn"]


def _interleaved(fns: dict, device: torch.device, rounds: int = ROUNDS) -> dict[str, float]:
    """Median seconds of each ``fns[k]()`` over ``rounds`` rounds after a warm-up round, every
    round running each once in turn: a slow spell of the machine (other load, a shared core)
    then falls on all of them alike, not on one, so their differences -- what a break-even
    divides by -- keep their sign."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(rounds + 1):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:
                times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


@dataclass(frozen=True)
class CacheCosts:
    """One small cache of a batch's features, as the cache and train_suffix stages handle it."""

    samples: int
    write_s: float  # encoded and written by the cache stage's writer (its encoder threads)
    setup_s: float  # the train_suffix stage's feed over it (its loader, noise scale and bank)
    batch_s: float  # a batch read, decoded and augmented, later epochs (the median)


def _cache_costs(ctx, spec: CacheSpec, feats: torch.Tensor, y, name: str, layout: str):
    """:class:`CacheCosts` of a cache of ``feats`` written by the cache stage's writer and
    read by the train_suffix stage's feed."""
    codec = spec.new_codec()
    calibrate(codec, feats.cpu().numpy(), spec.chunk_size)
    with tempfile.TemporaryDirectory(prefix="freezecache-plan-") as tmp:
        path = Path(tmp) / "c.h5"
        tokens = spec.extras == "tokens"
        channels = list(range(spec.stored)) if spec.stored and not tokens else None
        layout_ = spec.layout_for(len(feats), channels)
        extra = pos = None
        if layout_.extra_shape is not None and tokens:  # the last tokens (never prefix tokens)
            first = feats.shape[1] - spec.stored
            extra = feats[:, first:].cpu().numpy()
            pos = (first + torch.arange(spec.stored)).expand(len(feats), -1).numpy()
        elif layout_.extra_shape is not None:
            extra = feats[:, : spec.stored].cpu().numpy()
        build = Build(workers=ctx.cfg.cache.encode_workers, check_space=False)
        start = time.perf_counter()
        with CacheWriter(path, codec, layout_, prefix_hash="plan", build=build) as w:
            w.add(feats.cpu().numpy(), y.cpu().numpy(), extra=extra, extra_pos=pos)
        write = time.perf_counter() - start
        start = time.perf_counter()
        features = features_for(
            ctx.cfg, path, name, layout=layout, img_size=ctx.meta["img_size"], device=ctx.device,
            seed=ctx.seed,
        )  # fmt: skip
        setup = time.perf_counter() - start
        size = ctx.cfg.train.batch_size
        epoch = lambda: list(features.batches(size))  # noqa: E731
        batch = _seconds(epoch, ctx.device) / max(1, features.num_batches(size))
    return CacheCosts(len(feats), write, setup, batch)


def _ranking_seconds(model: nn.Module, prefix: nn.Module, xb: torch.Tensor, feats) -> float:
    """Seconds of the ranking's comparison of F(x) with F(flip(x)) for one batch (its forward
    passes are the build's own: the cache stage keeps them)."""
    with torch.no_grad():
        flipped = prefix(xb.flip(-1)).float()
    if model.kind == "cnn":
        return _seconds(lambda: rank.ChannelSensitivity(model.layout).update(feats, flipped),
                        xb.device)  # fmt: skip
    return _seconds(lambda: rank.match_tokens(feats, flipped), xb.device)


def _per_sample(small: CacheCosts, big: CacheCosts, key: str) -> tuple[float, float]:
    """(seconds once, seconds per sample) of ``key`` from caches of two sizes (a line through
    both; per sample only when there is one size)."""
    a, b = getattr(small, key), getattr(big, key)
    if big.samples <= small.samples:
        return 0.0, a / small.samples
    slope = max(0.0, (b - a) / (big.samples - small.samples))
    return max(0.0, a - slope * small.samples), slope


# -- what every stage process pays, measured once per plan ------------------------------------
@dataclass(frozen=True)
class Overheads:
    """What a stage process pays on this machine whatever the block, measured once per plan."""

    startup_s: dict[str, float]  # stage -> its process started: interpreter and imports
    setup_s: float  # the data on the device, the model built, its weights and a run loaded
    save_s: float  # a run state checkpointed (every training stage, each epoch and at its end)
    accounting_s: dict[str, float]  # method -> its costs.json's FLOPs and memory accounting
    warmup_s: float = 0.0  # a process's first fused decode (numba's import, its cached kernel)

    def to_json(self) -> dict:
        return asdict(self)


STARTUP_REPEATS = 2  # spawns per stage (the fastest: other load only slows a start)


def _stage_scripts() -> Path | None:
    """The folder of the stage scripts: beside the running one (a stage runs the plan), else
    in the checkout the library is installed from; None when neither has them."""
    here = Path(sys.argv[0]).resolve().parent if sys.argv and sys.argv[0] else None
    for folder in (here, Path(__file__).resolve().parents[3] / "stages"):
        if folder is not None and (folder / "_env.py").is_file():
            return folder
    return None


def startup_seconds(stage: str, repeats: int = STARTUP_REPEATS) -> float:
    """Seconds from spawning stage ``stage``'s process as DVC does (its script, its matrix
    arguments) to the end of its imports: it is pointed at a params file that does not exist,
    so it stops at the first thing it would read (the fastest of ``repeats``). Without the
    scripts, the imports every stage makes."""
    folder = _stage_scripts()
    if folder is None:
        cmd = [sys.executable, "-c", "import torch, typer, freezecache.steps.suffix"]
    else:
        values = {"seed": "0", "method.baseline": "freezeout", "method.discard": "discard"}
        args = [a for k in STAGES[stage].matrix for a in (MATRIX[k][1], values.get(k, "0"))]
        cmd = [sys.executable, str(folder / f"{stage}.py"), *args, "--params", "/nonexistent"]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=False)
        times.append(time.perf_counter() - start)
    return min(times)


def _stage_setup_seconds(ctx) -> float:
    """What every stage does before its work: its context (the prepared data on the device),
    the model with its starting weights, and the run it continues from loaded."""
    start = time.perf_counter()
    other = type(ctx)(ctx.cfg, ctx.seed, ctx.stage.name)
    model = other.new_model()
    state = RunState.load(other.stage_path("pretrain", "state"))
    model.load_state_dict({**model.state_dict(), **state.model}, strict=False)
    return time.perf_counter() - start


def _save_seconds(model: nn.Module) -> float:
    """A run state with the model's weights and momentum written (a checkpoint)."""
    weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    state = RunState(model=weights, momentum=dict(weights))
    with tempfile.TemporaryDirectory(prefix="freezecache-plan-") as tmp:
        start = time.perf_counter()
        state.save(Path(tmp) / "timed")  # a scratch file: a checkpoint's write
        return time.perf_counter() - start


def overheads(ctx, model: nn.Module, accounting) -> Overheads:
    """:class:`Overheads` on this machine; ``accounting(name)`` runs method ``name``'s
    costs.json accounting."""
    stages = ("baseline", "cache", "train_suffix")
    startup = {s: startup_seconds(s) for s in stages}
    setup = min(_stage_setup_seconds(ctx) for _ in range(2))
    names = ["freezeout", *ctx.cfg.methods.discard]
    timed = {}
    for name in names:
        start = time.perf_counter()
        accounting(name)
        timed[name] = time.perf_counter() - start
    warmup = 0.0
    if ctx.device.type == "cpu" and model.layout == "nchw" and fused.available():
        warmup = fused.first_use_seconds()  # a new process's first fused decode + augment
    return Overheads(startup, setup, _save_seconds(model), timed, warmup)


def epochs_after(cfg) -> int | None:
    """Epochs trained after the first freeze point (None while it is ``auto``)."""
    first = cfg.points[0].epoch if cfg.points else AUTO
    return None if first == AUTO else cfg.train.epochs - first


def predict(ctx, model: nn.Module, pos: int, spec_of, x, y, over: Overheads) -> dict:
    """Predicted seconds at block ``pos``: per epoch and once per method after the shared run,
    its whole time after it for the configured epochs, and each discard method's break-even
    against FreezeOut (epochs after the freeze point); ``spec_of(ranked)`` is the point's cache
    spec, ``over`` what every stage process pays (:func:`overheads`)."""
    cfg, device = ctx.cfg, ctx.device
    t = cfg.train
    n, batch = len(ctx.train), min(t.batch_size, len(x))
    steps = math.ceil(n / t.batch_size)
    m = copy.deepcopy(model)
    prefix, suffix = split(m, pos)
    trainer = Trainer(m, t, seed=ctx.seed, device=device)
    set_frozen(m, pos)
    opt = trainer.make_optimizer()
    m.train()
    prefix.eval()
    xb, yb = x[:batch], y[:batch]
    v = min(t.eval_batch_size, len(x))  # an evaluation batch, or every sample measured
    with torch.no_grad(), runtime.autocast(t.precision, device):
        many = prefix(x).float()  # the features of every sample measured: two cache sizes
    feats = many[:batch]
    frozen = _frozen_forward(prefix, suffix)

    def evaluating(fn):
        def run():
            with torch.no_grad(), runtime.autocast(t.precision, device):
                fn()

        return run

    s = _interleaved(
        {
            "fwd": evaluating(lambda: prefix(xb)),
            "val_full": evaluating(lambda: m(x[:v])),  # FreezeOut validates the whole model
            "val_rest": evaluating(lambda: suffix(many[:v])),  # a discard method, the rest
            "fo_step": lambda: trainer.step(opt, frozen, xb, yb, t.lr),
            "rest_step": lambda: trainer.step(opt, suffix, feats, yb, t.lr),
        },
        device,
    )
    fwd, fo_step, rest_step = s["fwd"], s["fo_step"], s["rest_step"]
    val_n = len(ctx.val) if ctx.val is not None else 0
    val_full, val_rest = val_n * s["val_full"] / v, val_n * s["val_rest"] / v  # per epoch
    test_s = len(ctx.test) * s["val_full"] / v
    fo_epoch = steps * fo_step + val_full
    # each stage process once: start-up, setup, its state saved at the end, its accounting
    fo_stage = over.startup_s["baseline"] + over.setup_s + over.save_s
    out = {
        "freezeout_epoch_s": fo_epoch,
        "epoch_s": {},
        "stages_s": {"freezeout": {"baseline": fo_stage + over.accounting_s["freezeout"]}},
        "test_s": test_s,  # once per method, in its last stage
        "checkpoint_s": over.save_s,  # each epoch of a training stage
        "overheads": over.to_json(),
    }
    for name in cfg.methods.discard:
        spec = spec_of(cfg.stores_flips(name))
        small = _cache_costs(ctx, spec, feats, yb, name, model.layout)
        big = _cache_costs(ctx, spec, many, y, name, model.layout) if len(x) > batch else small
        out["epoch_s"][name] = steps * (rest_step + small.batch_s) + val_rest
        write_once, write_each = _per_sample(small, big, "write_s")
        feed_once, feed_each = _per_sample(small, big, "setup_s")
        # the cache stage: its process, the prefix's forward over the training set (and the
        # flipped pass with stored views), the cache encoded and written
        build = fwd * (2 if spec.stored else 1) * n / batch + write_once + write_each * n
        if spec.stored:  # the ranking: flip sensitivity over the rank sample
            ranked = min(cfg.rank.samples, n)
            build += _ranking_seconds(model, prefix, xb, feats) * ranked / batch
        cache_stage = over.startup_s["cache"] + over.setup_s + build
        # the train_suffix stage: its process, the loader over the whole cache, the features
        # of the validation set, the decode path's first use in the process, the accounting
        val_feats = fwd * val_n / batch
        suffix_stage = (
            over.startup_s["train_suffix"] + over.setup_s + over.save_s + feed_once
            + feed_each * n + val_feats + over.warmup_s + over.accounting_s[name]
        )  # fmt: skip
        out["stages_s"][name] = {"cache": cache_stage, "train_suffix": suffix_stage}
    out.update(_totals(out, [(pos, epochs_after(cfg))], {pos: out}))
    return out


def _totals(row: dict, points: list[tuple[int, int | None]], rows: dict[int, dict]) -> dict:
    """Per method after the shared run, for freeze points ``points`` ((block, epochs trained
    there), each block's prediction in ``rows``): ``one_off_s`` (every stage process once, the
    test, a checkpoint per epoch), ``epoch_s`` (the mean over those epochs), ``method_s`` (the
    whole) and each discard method's ``break_even_epochs`` against FreezeOut. One point with
    unknown epochs (an ``auto`` point): the one-off and break-even only."""
    after = sum(e or 0 for _, e in points)
    first = rows[points[0][0]]
    once = {"freezeout": first["stages_s"]["freezeout"]["baseline"]}
    for name in row["epoch_s"]:
        once[name] = sum(sum(rows[b]["stages_s"][name].values()) for b, _ in points)
    once = {k: v + first["test_s"] + after * first["checkpoint_s"] for k, v in once.items()}
    out: dict = {"one_off_s": once, "epochs_after": after if after else None}
    if after:
        epochs = {"freezeout": sum(e * rows[b]["freezeout_epoch_s"] for b, e in points) / after}
        for name in row["epoch_s"]:
            epochs[name] = sum(e * rows[b]["epoch_s"][name] for b, e in points) / after
        out["mean_epoch_s"] = epochs
        out["method_s"] = {k: once[k] + after * e for k, e in epochs.items()}
    else:  # the break-even from one point's epochs
        epochs = {"freezeout": first["freezeout_epoch_s"], **first["epoch_s"]}
    out["break_even_epochs"] = {}
    for name in row["epoch_s"]:
        saved = epochs["freezeout"] - epochs[name]
        extra = once[name] - once["freezeout"]
        out["break_even_epochs"][name] = max(0.0, extra / saved) if saved > 0 else None
    return out


def schedule_time(cfg, rows: dict[int, dict]) -> dict | None:
    """The prediction for the configured freeze schedule (every point: a cache stage and a
    train_suffix stage for the discard methods, FreezeOut freezing at each): per method its
    one-off, mean epoch and whole time after the shared run and the break-even; None while a
    point is ``auto``. ``rows``: block -> :func:`predict`'s result there."""
    if not cfg.points or cfg.auto or any(p.block == AUTO for p in cfg.points):
        return None
    points = [(p.block, cfg.point_epochs(p.i)[1] - p.epoch) for p in cfg.points]
    return {"blocks": [b for b, _ in points], **_totals(rows[points[0][0]], points, rows)}


def _frozen_forward(prefix: nn.Module, suffix: nn.Module):
    def forward(x):
        with torch.no_grad():
            h = prefix(x)
        return suffix(h)

    return forward
