"""Cache benchmarks (GitHub issue 6): is the compressed cache ever the bottleneck?

`make bench` runs this on the default profile (params.yaml) and a subset of the training set.
Everything is measured side by side in one run and printed as ratios next to their goals:

- P1 p1_cache_vs_ram: suffix epoch from the compressed cache (real loader, device decode for
  quant, the Discard augmentation) / the same epoch from float32 features held in memory.
- P2 p2_vs_flops_ideal: (suffix epoch from the cache / full-model epoch on raw images) /
  (suffix training FLOPs / full training FLOPs).
- P3 p3_ratio, p3_paper_chunk2_ratio per freeze point: compressed / float32 size, default
  codec per sample vs the paper's zfp chunks of 2 at the same tolerance.
- P4 p4_build_mb_s vs p4_baseline_mb_s: cache build throughput (CacheWriter, all cores) vs
  single-thread zfpy on chunks of 2, in MB/s of float32 activations.
- A codec table: ratio, max error, encode/decode MB/s per codec and tolerance.

Writes results/bench.json and results/bench.md (the results folder of params.yaml).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import tempfile
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import typer
from torch import nn

from freezecache import augment, bench, runtime, steps, store
from freezecache.guard import stage
from freezecache.codec import make_codec
from freezecache.config import Config
from freezecache.io import atomic_write_json, atomic_write_text
from freezecache.layout import STATE
from freezecache.models import split
from freezecache.profiling import part_flops, training_flops
from freezecache.train import RunState, Trainer

log = logging.getLogger("bench")

TOLERANCES = (1e-1, 1e-2, 1e-3)
# (label, codec, chunk size, options) of the codec table.
TABLE_CODECS = (
    ("zfp chunk 1", "zfp", 1, {}),
    ("zfp chunk 2 (paper)", "zfp", 2, {}),
    ("quant", "quant", 1, {}),
    ("none fp16", "none", 1, {"dtype": "float16"}),
)


def load_context(cfg: Config, samples: int, seed: int) -> steps.Context:
    """Prepared data (prepared now if missing) on the run's device, cut to ``samples``."""
    if not (Path(cfg.paths.data) / "meta.json").is_file():
        log.info("no prepared data at %s: preparing it", cfg.paths.data)
        steps.prepare(cfg)
    ctx = steps.Context(cfg, seed)
    ctx.train = bench.subset(ctx.train, samples)
    return ctx


def trained_model(ctx: steps.Context) -> tuple[nn.Module, str]:
    """The model at the first freeze point: the pipeline's prefix run, else 1 epoch here."""
    model = ctx.new_model()
    state_file = Path(ctx.layout.prefix(ctx.seed)) / STATE
    if state_file.is_file():
        model.load_state_dict(RunState.load(state_file).model)
        return model.eval(), f"trained weights from {state_file}"
    log.info("%s is missing: training the model 1 epoch on the bench subset", state_file)
    trainer = Trainer(model, ctx.cfg.train, seed=ctx.seed, device=ctx.device)
    bench.timed_epoch(
        trainer,
        state="full",
        position=0,
        forward=model,
        batches=ctx.image_batches(0),
        steps=ctx.image_steps,
    )
    return model.eval(), f"{state_file} missing: trained 1 epoch on the bench subset here"


def point_features(ctx: steps.Context, model: nn.Module) -> tuple[list[np.ndarray], np.ndarray]:
    """Float32 features at every freeze point, in data-set order, and the labels.

    Point 1 runs the images through the frozen prefix; each later point pushes the previous
    point's features through the next blocks, as the cache stages do.
    """
    parts = list(steps.feature_pairs(ctx, model, "discard", 1))
    feats = [torch.cat([f for f, _, _ in parts]).cpu().numpy()]
    labels = torch.cat([y for _, _, y in parts]).cpu().numpy()
    positions = [p.block for p in ctx.cfg.points]
    for prev, pos in zip(positions[:-1], positions[1:], strict=True):
        blocks = nn.Sequential(*model.blocks[prev:pos])
        precision = ctx.cfg.train.precision
        feats.append(bench.push_features(blocks, feats[-1], 256, ctx.device, precision))
    return feats, labels


def candidate_codecs(cfg: Config) -> list[str]:
    """The profile's codec first, then the other candidates for the default (zfp, quant)."""
    return list(dict.fromkeys([cfg.cache.codec, "zfp", "quant"]))


def measure_p3_p4(cfg: Config, feats: list[np.ndarray], labels: np.ndarray, workdir: Path):
    """Per freeze point and candidate codec: a per-sample cache built by the CacheWriter with
    all cores (ratio, build rate); and the paper's single-thread zfp chunks of 2.

    Returns the per-point rows, the P4 numbers (all points together) and the cache files of
    point 1 by codec.
    """
    workers = os.cpu_count() or 1
    codecs = candidate_codecs(cfg)
    points, built, base, files = [], {c: [] for c in codecs}, [], {}
    for i, x in enumerate(feats, start=1):
        tol = cfg.cache.tolerance_at(i)
        log.info("P3/P4 point %d: features %s, tolerance %g", i, x.shape, tol)
        row = {
            "point": i,
            "block": cfg.points[i - 1].block,
            "feature_shape": list(x.shape[1:]),
            "tolerance": tol,
        }
        for name in codecs:
            path = workdir / f"p{i}_{name}.h5"
            stats = bench.build_cache(
                path, x, labels, make_codec(name, tol), chunk_size=1, workers=workers
            )
            row[f"{name}_ratio"] = stats["x_compression_ratio"]
            row[f"{name}_max_abs_error"] = stats["max_abs_error"]
            row[f"{name}_build_mb_s"] = stats["build_mb_s"]
            built[name].append((4 * x.size, stats["build_s"]))
            if i == 1:
                files[name] = path
        paper = bench.zfp_chunk_baseline(x, tol, chunk_size=2)
        base.append((4 * x.size, paper["build_s"]))
        row.update(
            p3_ratio=row[f"{cfg.cache.codec}_ratio"],
            p3_paper_chunk2_ratio=paper["ratio"],
            baseline_mb_s=paper["build_mb_s"],
        )
        points.append(row)
    p4 = {
        "p4_build_mb_s": bench.rate_mb_s(built[cfg.cache.codec]),
        "p4_baseline_mb_s": bench.rate_mb_s(base),
        "p4_build_mb_s_by_codec": {name: bench.rate_mb_s(pairs) for name, pairs in built.items()},
        "workers": workers,
    }
    return points, p4, files


def open_loaders(ctx: steps.Context, files: dict[str, Path], x: np.ndarray, labels: np.ndarray):
    """The cache loader of each codec's point-1 cache, set up as train_suffix sets it up.

    ``files`` are per-sample caches; they are rebuilt when the profile's chunk size differs.
    Quant is decoded on the device when ``cache.device_decode`` is on.
    """
    cfg, k = ctx.cfg, ctx.cfg.cache.chunk_size
    loaders = {}
    for name, path in files.items():
        if k != 1:
            path = path.with_name(f"p1_{name}_chunk{k}.h5")
            codec = make_codec(name, cfg.cache.tolerance_at(1))
            bench.build_cache(path, x, labels, codec, chunk_size=k, workers=os.cpu_count() or 1)
        info = store.open_cache(path)
        loader = store.make_loader(
            path,
            info,
            batch_size=cfg.train.batch_size,
            seed=ctx.seed,
            workers=cfg.cache.loader_workers,
            device_decode=cfg.cache.device_decode and name == "quant",
            pin_memory=ctx.device.type == "cuda",
            in_memory=cfg.cache.in_memory,
        )
        loaders[name] = (loader, info)
    return loaders


def epoch_runs(ctx: steps.Context, model: nn.Module, x: np.ndarray, labels: np.ndarray, loaders):
    """name -> run(epoch, max_steps=None): one timed training epoch of that setting.

    Suffix epochs from each cache and from RAM share one suffix model and the same batch
    order and augmentation draws per epoch; full-model epochs train their own copy.
    """
    cfg, device, seed = ctx.cfg, ctx.device, ctx.seed
    pos, bs = cfg.points[0].block, cfg.train.batch_size
    pad = augment.scaled_pad(cfg.augment.crop_pad, x.shape[-1], ctx.meta["img_size"])
    x_ram, y_ram = torch.from_numpy(x).to(device), torch.from_numpy(labels).to(device)
    suffix_model, full_model = copy.deepcopy(model), copy.deepcopy(model)
    _, suffix = split(suffix_model, pos)
    trainer_s = Trainer(suffix_model, cfg.train, seed=seed, device=device)
    trainer_f = Trainer(full_model, cfg.train, seed=seed, device=device)
    suffix_steps = math.ceil(len(x) / bs)

    def suffix_epoch(source, epoch: int, max_steps: int | None) -> dict:
        g = runtime.generator(seed, epoch, "features")
        batches = islice(bench.augmented(source, g, cfg.augment, pad), max_steps)
        return bench.timed_epoch(
            trainer_s, state="discard", position=pos, forward=suffix, batches=batches,
            steps=suffix_steps,
        )  # fmt: skip

    def cache_run(name: str):
        loader, info = loaders[name]
        return lambda e, n=None: suffix_epoch(bench.loader_batches(loader, info, e, device), e, n)

    def ram_run(e: int, n: int | None = None) -> dict:
        orders = bench.batch_orders(len(x), cfg.cache.chunk_size, bs, seed, e)
        return suffix_epoch(bench.ram_batches(x_ram, y_ram, orders), e, n)

    def full_run(e: int, n: int | None = None) -> dict:
        return bench.timed_epoch(
            trainer_f, state="full", position=0, forward=full_model,
            batches=islice(ctx.image_batches(e), n), steps=ctx.image_steps,
        )  # fmt: skip

    return {
        **{f"cache {name}": cache_run(name) for name in loaders},
        "ram": ram_run,
        "full": full_run,
    }


def time_interleaved(runs: dict, repeats: int, warmup_steps: int) -> dict:
    """Warm every setting up, then run them in turn ``repeats`` times; epoch time summaries."""
    for run in runs.values():  # starts loader workers, warms kernels and allocators
        run(repeats, warmup_steps)
    rows = {name: [] for name in runs}
    for epoch in range(repeats):
        for name, run in runs.items():
            with bench.OtherLoad() as other:
                row = run(epoch)
            rows[name].append({**row, "other_cores": other.cores})
            log.info(
                "P1/P2 repeat %d: %s epoch %.2fs (other processes used %s cores)",
                epoch + 1, name, row["epoch_time_s"], other.cores,
            )  # fmt: skip
    return {name: bench.summary(got) for name, got in rows.items()}


def suffix_flops(ctx: steps.Context, model: nn.Module, num_samples: int) -> dict:
    """Training FLOPs of one epoch: suffix at the first point (discard) and the full model."""
    pos, meta = ctx.cfg.points[0].block, ctx.meta
    part = part_flops(model, pos, (meta["channels"], meta["img_size"], meta["img_size"]))
    return {
        state: training_flops(
            {pos: part}, schedule=[(state, p, 1)], num_samples=num_samples, extras={}
        )["train_flops"]
        for state, p in (("discard", pos), ("full", 0))
    }


def measure_p1_p2(ctx, model, x, labels, files, repeats: int, warmup_steps: int) -> dict:
    """P1 and P2 for each codec's cache; the profile's codec gives the headline numbers."""
    loaders = open_loaders(ctx, files, x, labels)
    times = time_interleaved(epoch_runs(ctx, model, x, labels, loaders), repeats, warmup_steps)
    flops = suffix_flops(ctx, model, len(x))
    flops_ratio = flops["discard"] / flops["full"]
    cache_s = {name: times[f"cache {name}"]["min_s"] for name in loaders}
    p1 = {name: t / times["ram"]["min_s"] for name, t in cache_s.items()}
    p2 = {name: t / times["full"]["min_s"] / flops_ratio for name, t in cache_s.items()}
    default = ctx.cfg.cache.codec
    return {
        "p1_cache_vs_ram": p1[default],
        "p2_vs_flops_ideal": p2[default],
        "p1_by_codec": p1,
        "p2_by_codec": p2,
        "epochs": times,
        "suffix_vs_full_time": cache_s[default] / times["full"]["min_s"],
        "suffix_vs_full_flops": flops_ratio,
        "train_flops_per_epoch": flops,
        "loader_workers": ctx.cfg.cache.loader_workers,
        "device_decode_quant": ctx.cfg.cache.device_decode,
    }


def codec_table(x: np.ndarray) -> list[dict]:
    """Each codec at each tolerance on the same features (single thread)."""
    rows = []
    for tol in TOLERANCES:
        for label, name, k, opts in TABLE_CODECS:
            row = bench.codec_row(make_codec(name, tol, **opts), x, k)
            rows.append({"codec": label, "tolerance": tol, **row})
            log.info("codec %s tol %g: ratio %.4f", label, tol, row["ratio"])
    return rows


def goal_rows(codecs: list[str], points: list[dict], p4: dict, p1p2: dict) -> list[dict]:
    """Every goal for every candidate codec (the profile's codec first)."""
    rows = []
    for c in codecs:
        rows += [
            bench.goal_row("p1_cache_vs_ram", c, p1p2["p1_by_codec"][c]),
            bench.goal_row("p2_vs_flops_ideal", c, p1p2["p2_by_codec"][c]),
        ]
        for p in points:
            ratio, paper = p[f"{c}_ratio"], p["p3_paper_chunk2_ratio"]
            rows += [
                bench.goal_row(f"p3_ratio point {p['point']}", c, ratio, bench.GOALS["p3_ratio"]),
                bench.goal_row(
                    f"p3_ratio point {p['point']} vs paper chunk 2",
                    c,
                    ratio,
                    bench.Goal("<", paper),
                ),
            ]
        rows.append(bench.goal_row("p4_build_mb_s", c, p4["p4_build_mb_s_by_codec"][c]))
    return rows


def run(cfg: Config, *, samples: int, codec_samples: int, repeats: int, warmup_steps: int) -> dict:
    """Every measurement of the benchmark, in one process; returns what bench.json holds."""
    seed = cfg.seeds[0]
    ctx = load_context(cfg, samples, seed)
    machine = bench.machine_info(ctx.device)
    model, weights = trained_model(ctx)
    # Sizes and build rates on the whole training set (what the cache stage compresses);
    # timed epochs on the subset of ``samples``.
    whole = copy.copy(ctx)
    whole.train = steps.Context(cfg, seed).train
    feats, labels = point_features(whole, model)
    with tempfile.TemporaryDirectory(prefix="freezecache-bench-") as tmp:
        points, p4, files = measure_p3_p4(cfg, feats, labels, Path(tmp))
        n = len(ctx.train.labels)
        timed_files = {}
        for name, path in files.items():  # the subset's cache for the timed epochs
            timed_files[name] = path.with_name(f"timed_{name}.h5")
            codec = make_codec(name, cfg.cache.tolerance_at(1))
            bench.build_cache(
                timed_files[name], feats[0][:n], labels[:n], codec, chunk_size=1,
                workers=os.cpu_count() or 1,
            )  # fmt: skip
        p1p2 = measure_p1_p2(
            ctx, model, feats[0][:n], labels[:n], timed_files, repeats, warmup_steps
        )
    codecs = codec_table(feats[0][:codec_samples])
    goals = goal_rows(candidate_codecs(cfg), points, p4, p1p2)
    machine["load_avg_1m_end"] = bench.machine_info(ctx.device)["load_avg_1m"]
    return {
        "machine": machine,
        "setup": {
            "model": cfg.model.name,
            "dataset": ctx.meta["name"],
            "samples": len(ctx.train.labels),
            "p3_samples": len(labels),
            "codec_samples": min(codec_samples, len(labels)),
            "repeats": repeats,
            "codec": cfg.cache.codec,
            "codecs": candidate_codecs(cfg),
            "chunk_size": cfg.cache.chunk_size,
            "tolerances": [cfg.cache.tolerance_at(i + 1) for i in range(len(cfg.points))],
            "points": [p.block for p in cfg.points],
            "batch_size": cfg.train.batch_size,
            "weights": weights,
        },
        "p1_cache_vs_ram": p1p2["p1_cache_vs_ram"],
        "p2_vs_flops_ideal": p1p2["p2_vs_flops_ideal"],
        "p3": points,
        **p4,
        "p1_p2": p1p2,
        "codecs": codecs,
        "goals": goals,
        "codec_comparison": bench.compare_codecs(
            codecs, cfg.cache.tolerance_at(1), "quant", "zfp chunk 1"
        ),
    }


def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file (the default profile)"),
    samples: int = typer.Option(4096, min=1, help="training samples used (a subset)"),
    codec_samples: int = typer.Option(512, min=1, help="samples for the codec table"),
    repeats: int = typer.Option(2, min=1, help="timed epochs per setting; the minimum is used"),
    warmup_steps: int = typer.Option(3, min=1, help="untimed steps per setting before timing"),
) -> None:
    with stage(params, check_pipeline=False) as cfg:
        results = run(
            cfg, samples=samples, codec_samples=codec_samples, repeats=repeats,
            warmup_steps=warmup_steps,
        )  # fmt: skip
        out = Path(cfg.paths.results)
        markdown = bench.to_markdown(results)
        atomic_write_json(out / "bench.json", results)
        atomic_write_text(out / "bench.md", markdown)
        print(markdown)
        print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")


if __name__ == "__main__":
    typer.run(main)
