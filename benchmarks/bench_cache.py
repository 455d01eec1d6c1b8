"""Cache benchmarks (GitHub issues 6 and 15): is the compressed cache ever the bottleneck?

`make bench` runs this on the default profile (params.yaml), on the profile's training set, in
a scratch folder (nothing under runs/ or the cache folder is touched). The caches are built by
the cache stage's own function (``steps.cache.cache_point``) and read by the train_suffix
stage's own functions (``steps.suffix.cached_features`` and ``suffix_spec``). Everything is
measured side by side in one run and printed as ratios next to their goals:

- P1 p1_cache_vs_ram / p1_file_cache_vs_ram: a suffix epoch at the first freeze point from the
  compressed cache held in RAM (``in_memory=True``) / read from the HDF5 file (``in_memory=False``,
  the profile's loader workers), each over the same epoch from float32 features held in memory
  (the decoded cache) through the same augmentation (``benchmarks/_epochs.RamFeed``).
- P2 p2_vs_flops_ideal: (suffix epoch from the cache as the stage reads it / full-model epoch on
  raw images) / (suffix training FLOPs / full training FLOPs).
- P3 p3_ratio per freeze point: compressed / float32 size of F(x) in the cache stage's cache (the
  profile's codec, tolerance and coding), next to quant with the other tolerance mode (relative
  or absolute, same number), zfp per sample and the paper's zfp chunks of 2.
- P4 p4_build_mb_s vs p4_baseline_mb_s: cache build throughput of the real CacheWriter (encode,
  verify, spool, assemble; the profile's encoder threads) vs single-thread zfpy on chunks of 2,
  in MB/s of float32 activations held in memory.
- A codec table (ratio, max error, encode/decode MB/s per codec and tolerance) and the coding
  ideas of benchmarks/bench_coding.py (read from its JSON, or measured here on these features).

Writes bench.json, bench.md and bench_breakdown.csv (the epoch breakdown `make plots` stacks)
in the results folder of params.yaml (not DVC outputs).
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import typer
from torch import nn

import _epochs
import _stages
import benchlib as bench
from freezecache.cache.format import CacheInfo, open_cache
from freezecache.cache.loader import held_in_memory
from freezecache.codecs.registry import make_codec
from freezecache.config import Config
from freezecache.config.scratch import first_point_only, scratch_profile
from freezecache.core.errors import FreezecacheError
from freezecache.core.io import atomic_write_json, atomic_write_text, read_json
from freezecache.core.methods import method as method_info
from freezecache.core.timing import STAGE_SECTIONS, Sections
from freezecache.pipeline import STAGES, start_of_point
from freezecache.pipeline.guard import stage
from freezecache.reporting.plots import BENCH_BREAKDOWN
from freezecache.steps.cache import BUILD_BATCH, cache_point, feature_pairs, frozen_model
from freezecache.steps.context import Context
from freezecache.steps.prepare import prepare
from freezecache.tooling.results import stamp
from freezecache.training.train import RunState, Trainer

log = logging.getLogger("bench")

TOLERANCES = (1e-1, 1e-2, 1e-3)
# (label, codec, chunk size, options) of the codec table.
TABLE_CODECS = (
    ("zfp chunk 1", "zfp", 1, {}),
    ("zfp chunk 2 (paper)", "zfp", 2, {}),
    ("quant", "quant", 1, {}),
    ("none fp16", "none", 1, {"dtype": "float16"}),
)
CODING_JSON = Path("results/bench_coding.json")


# -- setup ---------------------------------------------------------------------------------------
def bench_method(cfg: Config) -> str:
    """The discard method timed: the profile's one with stored flipped channels (the most work
    per batch), else its first."""
    names = cfg.methods.discard
    if not names:
        raise FreezecacheError("methods.discard is empty — name a discard method for the bench")
    return next((n for n in names if method_info(n).needs_ranking), names[0])


def prefix_state(cfg: Config, work: Config, seed: int) -> tuple[RunState, str]:
    """The run at the first freeze point: the pipeline's train_prefix output, else the starting
    weights (pretrain output or random init) trained 1 epoch here. Puts the starting weights
    where the scratch stages look for them."""
    pretrained = STAGES["pretrain"].path("state", cfg)
    target = STAGES["pretrain"].path("state", work)
    target.parent.mkdir(parents=True, exist_ok=True)
    if pretrained.is_file():
        shutil.copyfile(pretrained, target)
    else:
        RunState(model={}).save(target)  # no pretrain output: a seeded random init
    prefix = STAGES["train_prefix"].path("state", cfg, seed=seed)
    if prefix.is_file():
        return RunState.load(prefix), f"trained weights from {prefix}"
    log.info("%s is missing: training the model 1 epoch here", prefix)
    ctx = Context(work, seed, "train_prefix")
    model = ctx.new_model()
    trainer = Trainer(model, work.train, seed=seed, device=ctx.device)
    bench.timed_epoch(
        trainer, state="full", position=0, forward=model, batches=ctx.image_batches()(0),
        steps=ctx.image_steps,
    )  # fmt: skip
    start = "pretrain weights" if pretrained.is_file() else "random init"
    return trainer.state, f"{prefix} missing: trained 1 epoch from the {start} here"


def stage_caches(work: Config, seed: int, name: str, state: RunState) -> list[dict]:
    """Every freeze point's cache of method ``name``, built by the cache stage from the same
    frozen weights, with the stage's record of its own time."""
    out = []
    for p in work.points:  # each point continues from the same run here
        state.save(start_of_point(work, seed, name, p))
        with Sections(STAGE_SECTIONS):
            out.append(cache_point(work, seed, name, p.i))
    return out


# -- P3, P4 --------------------------------------------------------------------------------------
def point_features(ctx: Context, model: nn.Module, block: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 F(x) of the whole training set at ``block`` as the cache stage computes it."""
    parts = list(feature_pairs(ctx, model, block, False, BUILD_BATCH, None))
    x = torch.cat([f for f, _, _ in parts]).cpu().numpy()
    return x, torch.cat([y for _, _, y in parts]).cpu().numpy()


def build_settings(info: CacheInfo) -> dict:
    """label -> codec for the builds at one point: the profile's settings first."""
    builds = {"profile": bench.fresh_codec(info)}
    if info.codec_name == "quant":
        relative = bool(info.codec_options.get("relative", False))
        other = "absolute" if relative else "relative"
        builds[f"quant {other}"] = bench.fresh_codec(info, relative=not relative)
    if info.codec_name != "zfp":
        builds["zfp"] = make_codec("zfp", info.tolerance)
    return builds


def measure_point(cfg: Config, i: int, stats: dict, x, y, folder: Path) -> dict:
    """P3 and the build rates at freeze point ``i`` (1-based) on its features ``x``."""
    info = open_cache(stats["path"])
    row = {
        "point": i,
        "block": cfg.points[i - 1].block,
        "feature_shape": list(x.shape[1:]),
        "raw_bytes": 4 * x.size,
        "tolerance": info.tolerance,
        "p3_ratio": stats["x_compression_ratio"],
        "p3_cache_ratio": stats["compression_ratio"],  # with the stored flipped channels
        "max_abs_error": stats["max_abs_error"],
        "stored_channels": stats["stored_channels"],
        "stage_build_s": stats["build_s"],  # forward passes, ranking and the cache, all in
        "builds": {},
    }
    for label, codec in build_settings(info).items():
        path = folder / f"p{i}_{label.replace(' ', '_')}.h5"
        built = bench.build_cache(
            path, x, y, codec, chunk_size=info.chunk_size, workers=cfg.cache.encode_workers
        )
        path.unlink()
        row["builds"][label] = {
            "codec": codec.name,
            "relative": bool(getattr(codec, "relative", False)),
            "ratio": built["x_compression_ratio"],
            "max_abs_error": built["max_abs_error"],
            "max_bound": getattr(codec, "max_bound", codec.tolerance),
            "build_mb_s": built["build_mb_s"],
            "build_s": built["build_s"],
        }
        log.info("P3/P4 point %d %s: ratio %.4f", i, label, built["x_compression_ratio"])
    paper = bench.zfp_chunk_baseline(x, info.tolerance, chunk_size=2)
    row.update(
        p3_paper_chunk2_ratio=paper["ratio"],
        baseline_mb_s=paper["build_mb_s"],
        baseline_s=paper["build_s"],
    )
    return row


def p4_summary(points: list[dict]) -> dict:
    """Build rates over all points together, per build setting and for the paper's way."""

    def rate(seconds) -> float:
        return bench.rate_mb_s([(p["raw_bytes"], seconds(p)) for p in points])

    return {
        "p4_build_mb_s": rate(lambda p: p["builds"]["profile"]["build_s"]),
        "p4_baseline_mb_s": rate(lambda p: p["baseline_s"]),
        "p4_build_mb_s_by_setting": {
            label: rate(lambda p, a=label: p["builds"][a]["build_s"])
            for label in points[0]["builds"]
        },
    }


# -- P1, P2 and the epoch breakdown ------------------------------------------------------------
def _held(ctx, info) -> str:
    """How the stage holds the cache (loader.in_memory resolved): what P2 times."""
    held = held_in_memory(info, ctx.cfg.loader.in_memory, codes=ctx.cfg.loader.workers == 0)
    return {"codes": "codes in memory", "compressed": "compressed in memory"}.get(held, "file")


def measure_epochs(
    ctx, model, caches: dict[str, Path], builds: dict, name: str, rounds: int, fixed=None
):
    """The epoch breakdown of every method (benchmarks/_epochs.py), P1 and P2 from it;
    ``fixed``: the one-off parts the stage processes paid (:func:`stage_runs`)."""
    block = ctx.item["p"].block
    result = _epochs.breakdown(ctx, model, block, caches, builds, name, rounds, fixed)
    e, flops = result["epochs"], result["step_flops"]
    flops_ratio = flops[name] / flops["normal"]
    return {
        **_epochs.p1(result, name),
        "p2_vs_flops_ideal": e[name]["epoch_s"] / e["normal"]["epoch_s"] / flops_ratio,
        "p2_cache": _held(ctx, open_cache(caches[name])),
        "suffix_vs_full_time": e[name]["epoch_s"] / e["normal"]["epoch_s"],
        "suffix_vs_full_flops": flops_ratio,
        "breakdown": result,
    }


# -- the pipeline's own stages -------------------------------------------------------------------
def stage_runs(cfg: Config, work: Config, folder: Path, seed: int, state: RunState) -> dict:
    """FreezeOut and every discard method after the shared run as the pipeline runs them: their
    real stage processes in a project at ``folder`` (benchmarks/_stages.py), from the same
    starting weights and shared run as the timed epochs."""
    weights = STAGES["pretrain"].path("state", work)
    names = ["freezeout", *cfg.methods.discard]
    return _stages.side_by_side(cfg, folder, seed, weights, state, names)


FLOOR = ("cache build: prefix forward", "cache build: encode + write")


def pipeline_goals(stages: dict, breakdown: dict) -> dict:
    """Per discard method, from its stage processes in this run: its epoch against the bench's
    (the fastest of each: the bench keeps its fastest round) and against FreezeOut's (the
    medians of their stages' epochs, as the report reads them; the goal 1.05 x the FLOPs
    ratio), and its one-off beyond FreezeOut's against its floor, one pass of the frozen prefix
    over the training set plus encoding it (as its cache stage timed them)."""
    fo = stages["freezeout"]
    flops = breakdown["step_flops"]
    out = {}
    for name, s in stages.items():
        if name == "freezeout":
            continue
        floor = sum(s["one_off_parts_s"].get(k, 0.0) for k in FLOOR)
        extra = s["one_off_s"] - fo["one_off_s"]
        out[name] = {
            "epoch_vs_bench": s["fastest_epoch_s"] / breakdown["epochs"][name]["epoch_s"],
            "epoch_vs_freezeout": s["median_epoch_s"] / fo["median_epoch_s"],
            "epoch_goal": 1.05 * flops[name] / flops["freezeout"],
            "floor_s": floor,
            "one_off_extra_s": extra,
            "one_off_vs_floor": extra / floor if floor > 0 else None,
            "break_even_epochs": _break_even(s, fo),
        }
    return out


def _break_even(method: dict, freezeout: dict) -> float | None:
    from freezecache.accounting.wall import break_even

    return break_even(method, freezeout)


# -- codec table, coding ideas -------------------------------------------------------------------
def codec_table(x: np.ndarray) -> list[dict]:
    """Each codec at each tolerance on the same features (single thread)."""
    rows = []
    for tol in TOLERANCES:
        for label, name, k, opts in TABLE_CODECS:
            row = bench.codec_row(make_codec(name, tol, **opts), x, k)
            rows.append({"codec": label, "tolerance": tol, **row})
            log.info("codec %s tol %g: ratio %.4f", label, tol, row["ratio"])
    return rows


def _coding_script():
    """benchmarks/bench_coding.py as a module (benchmarks/ is not a package)."""
    path = Path(__file__).with_name("bench_coding.py")
    spec = importlib.util.spec_from_file_location("bench_coding", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def coding_ideas(path: Path, feats: dict[int, np.ndarray]) -> dict:
    """Each lossless coding idea's figures: bench_coding.py's JSON at ``path`` when it exists,
    else its comparison run here on ``feats`` (block -> float32 features)."""
    if path.is_file():
        found = read_json(path)
        return {"source": str(path), **found}
    log.info("%s is missing: comparing the coding ideas on the bench's features", path)
    coding, points = _coding_script(), []
    for block, x in feats.items():
        for label, tol, relative in coding.TOLERANCES:
            codec = make_codec("quant", tol, relative=relative)
            codec.calibrate(x[:256])  # as the writer: the first batch
            q = coding.codes_of(codec, x)
            rows = coding.codec_rows(x, tol, relative) + coding.stage_rows(q, q[:256], x.nbytes)
            points.append({
                "block": block, "tolerance": label, "shape": list(x.shape[1:]),
                "zeros": float((q == 0).mean()), "entropy0_bits": coding.entropy0(q), "rows": rows,
            })  # fmt: skip
    samples = len(next(iter(feats.values())))
    return {"source": "this run, on the bench's features", "samples": samples, "points": points}


# -- goals and the run ---------------------------------------------------------------------------
def goal_rows(points: list[dict], p4: dict, p1p2: dict) -> list[dict]:
    """Every goal: P1 per loader path, P2, P3 per point (and the paper's chunks), P4."""
    rows = [
        bench.goal_row("p1_cache_vs_ram", "cache in memory", p1p2["p1_cache_vs_ram"]),
        bench.goal_row("p1_file_cache_vs_ram", "cache file", p1p2["p1_file_cache_vs_ram"]),
        bench.goal_row("p2_vs_flops_ideal", p1p2["p2_cache"], p1p2["p2_vs_flops_ideal"]),
        bench.goal_row(
            "api_loader_vs_stage",
            "CachedFeatures in a DataLoader / the stage's epoch",
            p1p2["api_loader_vs_stage"],
        ),  # fmt: skip
    ]
    for p in points:
        for label, b in p["builds"].items():
            setting = f"point {p['point']} (block {p['block']}), {label}"
            rows.append(bench.goal_row("p3_ratio", setting, b["ratio"]))
        paper = bench.Goal("<", p["p3_paper_chunk2_ratio"])
        setting = f"point {p['point']} vs the paper's zfp chunks of 2"
        rows.append(bench.goal_row("p3_ratio", setting, p["p3_ratio"], paper))
    for label, rate in p4["p4_build_mb_s_by_setting"].items():
        rows.append(bench.goal_row("p4_build_mb_s", label, rate))
    for name, g in p1p2["breakdown"]["goals"].items():
        goal = bench.Goal("<=", g["epoch_goal"])  # 1.05 x the method's FLOPs ratio
        rows.append(bench.goal_row("epoch_vs_freezeout", name, g["epoch_vs_freezeout"], goal))
        rows.append(bench.goal_row("data_vs_compute", name, g["data_vs_compute"]))
    rows += stage_goal_rows(p1p2.get("pipeline", {}))
    return rows


def stage_goal_rows(pipeline: dict) -> list[dict]:
    """The goals of the pipeline's own stage processes (:func:`pipeline_goals`)."""
    rows = []
    for name, g in pipeline.items():
        rows.append(bench.goal_row("pipeline_epoch_vs_bench", name, g["epoch_vs_bench"]))
        goal = bench.Goal("<=", g["epoch_goal"])
        value = g["epoch_vs_freezeout"]
        rows.append(bench.goal_row("pipeline_epoch_vs_freezeout", name, value, goal))
        if g["one_off_vs_floor"] is not None:
            rows.append(bench.goal_row("one_off_vs_floor", name, g["one_off_vs_floor"]))
    return rows


def run(
    cfg: Config,
    *,
    method: str | None = None,
    repeats: int = 2,
    warmup_steps: int = 3,
    codec_samples: int = 512,
    coding_json: Path = CODING_JSON,
) -> dict:
    """Every measurement of the benchmark, in one process; returns what bench.json holds."""
    seed, name = cfg.seeds[0], method or bench_method(cfg)
    if not (STAGES["prepare"].path("data", cfg) / "meta.json").is_file():
        log.info("no prepared data at %s: preparing it", cfg.paths.data)
        prepare(cfg)
    with tempfile.TemporaryDirectory(prefix="freezecache-bench-") as tmp:
        work = scratch_profile(cfg, Path(tmp))  # the prepared data stays
        state, weights = prefix_state(cfg, work, seed)
        caches = stage_caches(work, seed, name, state)
        first = work.points[0]
        builds = {name: caches[0]}
        one_point = first_point_only(work)
        for other in work.methods.discard:  # the first point's cache of every discard method
            if other != name:
                builds[other] = stage_caches(one_point, seed, other, state)[0]
        ctx = Context(work, seed, "train_suffix", method=name, p=first)
        machine = bench.machine_info(ctx.device)
        model, _ = frozen_model(ctx, first)
        points, heads = [], {}
        for i, (p, stats) in enumerate(zip(work.points, caches, strict=True), start=1):
            x, y = point_features(ctx, model, p.block)
            stats["path"] = ctx.stage_path("cache", "cache", p=p)
            points.append(measure_point(cfg, i, stats, x, y, Path(tmp)))
            heads[p.block] = np.ascontiguousarray(x[:codec_samples])
            del x, y
        p4 = p4_summary(points)
        paths = {m: STAGES["cache"].path("cache", work, seed=seed, method=m, p=first)
                 for m in builds}  # fmt: skip
        stages = stage_runs(cfg, work, Path(tmp) / "stages", seed, state)
        fixed = {m: s["one_off_parts_s"] for m, s in stages.items()}
        p1p2 = measure_epochs(ctx, model, paths, builds, name, repeats, fixed)
        p1p2["stages"] = stages
        p1p2["pipeline"] = pipeline_goals(stages, p1p2["breakdown"])
        n = len(ctx.train)
    codecs = codec_table(heads[first.block])
    ideas = coding_ideas(coding_json, heads)
    machine["load_avg_1m_end"] = bench.machine_info(ctx.device)["load_avg_1m"]
    c = cfg.cache
    return {
        "machine": machine,
        "setup": {
            "model": cfg.model.name,
            "dataset": ctx.meta["name"],
            "samples": n,
            "method": name,
            "augment": method_info(name).augment,
            "batch_size": cfg.train.batch_size,
            "points": [p.block for p in cfg.points],
            "tolerances": [c.tolerance_at(i + 1) for i in range(len(cfg.points))],
            "codec": c.codec,
            "relative": c.relative,
            "coding": c.coding,
            "chunk_size": c.chunk_size,
            "encode_workers": c.encode_workers,
            "loader": cfg.loader.model_dump(),
            "repeats": repeats,
            "codec_samples": len(heads[first.block]),
            "weights": weights,
        },
        "p1_cache_vs_ram": p1p2["p1_cache_vs_ram"],
        "p1_file_cache_vs_ram": p1p2["p1_file_cache_vs_ram"],
        "p2_vs_flops_ideal": p1p2["p2_vs_flops_ideal"],
        "api_loader_vs_stage": p1p2["api_loader_vs_stage"],
        "p3": points,
        **p4,
        "p1_p2": p1p2,
        "codecs": codecs,
        "coding_ideas": ideas,
        "goals": goal_rows(points, p4, p1p2),
        "codec_comparison": bench.compare_codecs(codecs, c.tolerance_at(1), "quant", "zfp chunk 1"),
    }


def epochs_only(cfg: Config, *, method: str | None = None, repeats: int = 2) -> dict:
    """The epoch breakdown alone, on the profile's training device (``make gpu-check``): every
    method's epoch after the first freeze point through the stages' own functions, with the
    loader's decode on the device, P1, P2 and the break-even; no codec table or zfp builds."""
    seed, name = cfg.seeds[0], method or bench_method(cfg)
    if not (STAGES["prepare"].path("data", cfg) / "meta.json").is_file():
        log.info("no prepared data at %s: preparing it", cfg.paths.data)
        prepare(cfg)
    with tempfile.TemporaryDirectory(prefix="freezecache-bench-") as tmp:
        work = scratch_profile(cfg, Path(tmp))  # the prepared data stays
        state, weights = prefix_state(cfg, work, seed)
        first = work.points[0]
        one_point = first_point_only(work)
        order = [name, *(m for m in work.methods.discard if m != name)]
        builds = {m: stage_caches(one_point, seed, m, state)[0] for m in order}
        ctx = Context(work, seed, "train_suffix", method=name, p=first)
        machine = bench.machine_info(ctx.device)
        model, _ = frozen_model(ctx, first)
        paths = {m: STAGES["cache"].path("cache", work, seed=seed, method=m, p=first)
                 for m in builds}  # fmt: skip
        p1p2 = measure_epochs(ctx, model, paths, builds, name, repeats)
        n = len(ctx.train)
    machine["load_avg_1m_end"] = bench.machine_info(ctx.device)["load_avg_1m"]
    return {
        "machine": machine,
        "setup": {
            "model": cfg.model.name,
            "samples": n,
            "method": name,
            "block": first.block,
            "batch_size": cfg.train.batch_size,
            "loader": cfg.loader.model_dump(),
            "repeats": repeats,
            "weights": weights,
        },  # fmt: skip
        "p1_cache_vs_ram": p1p2["p1_cache_vs_ram"],
        "p1_file_cache_vs_ram": p1p2["p1_file_cache_vs_ram"],
        "p2_vs_flops_ideal": p1p2["p2_vs_flops_ideal"],
        "api_loader_vs_stage": p1p2["api_loader_vs_stage"],
        "p1_p2": p1p2,
    }


def epochs_markdown(res: dict) -> str:
    """bench_epochs.md: the machine, then the epoch breakdown with P1 and P2."""
    m, s, t = res["machine"], res["setup"], res["p1_p2"]
    where = m.get("gpu") or m["cpu"]
    lines = [
        f"Epoch breakdown on {where} (training device `{m['device']}`, torch {m['torch']}): "
        f"{s['model']}, {s['samples']} training samples, batch {s['batch_size']}, decode on the "
        f"device {s['loader']['device_decode']}, min of {s['repeats']} epochs. Weights: "
        f"{s['weights']}.",
        "",
        *bench.breakdown_markdown(t["breakdown"], s["block"]),
        f"P1 (cache in memory / features in RAM) {res['p1_cache_vs_ram']:.2f}, from the file "
        f"{res['p1_file_cache_vs_ram']:.2f}; P2 (suffix / full epoch over their FLOPs ratio) "
        f"{res['p2_vs_flops_ideal']:.2f}; CachedFeatures in a DataLoader / the stage's epoch "
        f"{res['api_loader_vs_stage']:.2f} (goal <= 1.10).",
    ]
    return "\n".join(lines) + "\n"


def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file (the default profile)"),
    method: str = typer.Option(None, help="discard method timed (default: bench_method)"),
    repeats: int = typer.Option(2, min=1, help="timed epochs per setting; the minimum is used"),
    warmup_steps: int = typer.Option(3, min=1, help="untimed steps per setting before timing"),
    codec_samples: int = typer.Option(512, min=1, help="samples for the codec table"),
    coding_json: Path = typer.Option(CODING_JSON, help="bench_coding.py's results, if any"),
    only_epochs: bool = typer.Option(
        False, "--epochs-only", help="only the epoch breakdown (bench_epochs.json/.md)"
    ),
    out: Path = typer.Option(None, help="folder for the files (default: paths.results)"),
    breakdown_from: Path = typer.Option(
        None, help="only rewrite bench_breakdown.csv (beside it) from this bench.json"
    ),
) -> None:
    if breakdown_from is not None:
        csv = breakdown_from.with_name(BENCH_BREAKDOWN)
        print(_epochs.write_breakdown_csv(read_json(breakdown_from), csv))
        return
    with stage(params, method=(method, "discard") if method else None) as cfg:
        if only_epochs:
            res = epochs_only(cfg, method=method, repeats=repeats)
            folder = out or Path(cfg.paths.results)
            atomic_write_json(folder / "bench_epochs.json", _epochs.np_free(res))
            atomic_write_text(folder / "bench_epochs.md", epochs_markdown(res))
            print(epochs_markdown(res))
            return
        results = run(
            cfg, method=method, repeats=repeats, warmup_steps=warmup_steps,
            codec_samples=codec_samples, coding_json=coding_json,
        )  # fmt: skip
        out = out or Path(cfg.paths.results)
        results = _epochs.np_free(results)
        atomic_write_json(out / "bench.json", results)
        markdown = bench.to_markdown(results)
        atomic_write_text(out / "bench.md", markdown)
        _epochs.write_breakdown_csv(results, out / BENCH_BREAKDOWN)  # `make plots` stacks it
        svg = bench.svg(_epochs.stacked_bar_spec(results["p1_p2"]["breakdown"]))
        if svg is not None:
            atomic_write_text(out / "bench_epochs.svg", svg)
        written = [out / n for n in ("bench.md", "bench.json", BENCH_BREAKDOWN, "bench_epochs.svg")]
        stamp(__file__, [f for f in written if f.is_file()], params)
        print(markdown)
        print(f"wrote bench.json, bench.md and {BENCH_BREAKDOWN} in {out}")


if __name__ == "__main__":
    typer.run(main)
