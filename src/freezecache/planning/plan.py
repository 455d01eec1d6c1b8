"""Where to freeze, before any training: per candidate block, what a cache there costs on disk
and what the rest of the model costs to train, plus the configured schedule's savings.

Sizes are measured, not guessed: a real batch of the training set goes through the model (its
starting weights: pre-trained, a local checkpoint or the random init) and the configured codec
at the configured tolerance; the whole cache is that batch's bytes per sample times the
training set. Savings use the same FLOPs and memory accounting as the training stages.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from torch import nn

from freezecache.accounting.costs import method_costs
from freezecache.accounting.flops import part_flops
from freezecache.cache.size import H5_HEADERS, H5_OVERHEAD, estimate_cache_bytes
from freezecache.cache.spec import CacheSpec
from freezecache.codecs.registry import calibrate
from freezecache.config import AUTO, Config
from freezecache.core.disk import free_bytes
from freezecache.core.errors import FreezecacheError
from freezecache.core.methods import method
from freezecache.models import split
from freezecache.planning.plan_time import Overheads, overheads, predict, schedule_time
from freezecache.reporting.labels import label
from freezecache.training import augment
from freezecache.training.decide import decided

SAMPLE = 256  # samples measured per candidate block
MARGIN = 1.10  # the caches must fit in the free disk space with 10% to spare


def _extra(spec: CacheSpec, flipped: torch.Tensor):
    """What a ranking method stores next to the features: ``spec.stored`` channels or tokens of
    the flipped view (the sizes only depend on how many), and for channels their indices (a
    relative tolerance is per channel); (None, None) when it stores nothing."""
    if spec.extras == "channels":
        k = spec.stored
        return augment.take_channels(flipped, torch.arange(k), spec.layout), list(range(k))
    if spec.extras == "tokens":
        return flipped[:, : spec.stored], None
    return None, None


def candidates(ctx, model: nn.Module, over: Overheads | None = None) -> list[dict]:
    """One row per block position: shape, bytes per sample, cache size, suffix FLOPs share,
    and the predicted time (``over``: what every stage process pays, :func:`time_overheads`)."""
    cfg = ctx.cfg
    x, y = next(iter(ctx.train.batches(min(SAMPLE, len(ctx.train)))))
    over = over or time_overheads(ctx, model)
    meta = ctx.meta
    input_shape = (meta["channels"], meta["img_size"], meta["img_size"])
    points = {p.block: i for i, p in enumerate(cfg.points, start=1) if p.block != AUTO}
    ranked = any(cfg.stores_flips(m) for m in cfg.methods.discard)
    n = len(ctx.train)
    rows = []
    for pos in range(1, model.num_blocks):
        prefix, _ = split(model, pos)
        with torch.no_grad():
            feats = prefix(x).float()
            flipped = prefix(x.flip(-1)).float() if ranked else None
        spec = CacheSpec.at(cfg, model, pos, points.get(pos, 1), ranked)
        extra, extra_index = _extra(spec, flipped)
        codec = spec.new_codec()
        sample = feats.cpu().numpy()
        calibrate(codec, sample, cfg.cache.chunk_size)  # as the cache stage does
        x_bytes = estimate_cache_bytes(
            codec, sample, n, chunk_size=cfg.cache.chunk_size, overhead=H5_HEADERS
        )
        with_extra = x_bytes
        if extra is not None:
            pos_width = spec.stored if spec.extras == "tokens" else 0
            with_extra = estimate_cache_bytes(
                codec,
                sample,
                n,
                extra.cpu().numpy(),
                chunk_size=cfg.cache.chunk_size,
                pos_width=pos_width,
                extra_index=extra_index,
                overhead=H5_HEADERS,
            )
        fp32 = 4 * math.prod(feats.shape[1:])
        flops = part_flops(model, pos, input_shape)
        rows.append(
            {
                "block": pos,
                "point": points.get(pos),
                "shape": list(feats.shape[1:]),
                "fp32_bytes_per_sample": fp32,
                "bytes_per_sample": x_bytes / n,
                "extra_bytes_per_sample": (with_extra - x_bytes) / n,
                "ratio": x_bytes / (n * fp32),
                "cache_bytes": x_bytes,
                "cache_bytes_with_extra": with_extra,
                "suffix_flops_share": flops["suffix_fwd"] / flops["full_fwd"],
                "train_samples": n,
                "time": predict(
                    ctx,
                    model,
                    pos,
                    lambda r, pos=pos: CacheSpec.at(cfg, model, pos, points.get(pos, 1), r),
                    x,
                    y,
                    over,
                ),  # fmt: skip
            }
        )
    return rows


def time_overheads(ctx, model: nn.Module) -> Overheads:
    """What every stage process pays on this machine (plan_time.py). With an ``auto`` first
    point the accounting is timed on a stand-in schedule (block 1 from epoch 1): what it costs
    hardly depends on the block, which only the shared run decides."""
    timed = ctx
    if ctx.cfg.auto:
        timed = copy.copy(ctx)
        timed.cfg = decided(ctx.cfg, {"block": 1, "epoch": 1})
    return overheads(ctx, model, lambda name: method_costs(timed, model, name, []))


def _need(cfg: Config, row: dict) -> int:
    """The bytes one freeze point at ``row``'s block caches over every seed and discard method."""
    return sum(
        len(cfg.seeds) * row["cache_bytes_with_extra" if cfg.stores_flips(m) else "cache_bytes"]
        for m in cfg.methods.discard
    )


def allowed_blocks(cfg: Config, rows: list[dict], need: int, files: int, free: int) -> dict:
    """The blocks a decided freeze point may take (:mod:`freezecache.training.decide`): its caches
    fit
    on the disk next to the schedule's others, and each discard method pays back its one-off
    FLOPs (the cache build's forward passes over the training set, twice with stored flipped
    channels, and the ranking's) within the epochs left, against FreezeOut, which runs the
    frozen blocks forward every epoch. FLOPs, not seconds: the decision must be the same on any
    machine and under any load (the plan's timed break-even is shown beside it)."""
    out = {}
    for row in rows:
        fits = (need + _need(cfg, row)) * MARGIN + files * (H5_OVERHEAD - H5_HEADERS) <= free
        even = {}
        for m in cfg.methods.discard:
            ranks = cfg.stores_flips(m) and cfg.rank.gamma + cfg.rank.alpha > 0
            passes = 2 if ranks else 1  # the build's forward passes (with F(flip(x)))
            rank_share = 2 * min(cfg.rank.samples, row["train_samples"]) / row["train_samples"]
            even[m] = passes + (rank_share if ranks else 0.0)  # one-off over saved, per epoch
        out[str(row["block"])] = {"fits": bool(fits), "flops_break_even_epochs": even}
    return {"epochs": cfg.train.epochs, "blocks": out}


def make_plan(ctx, model: nn.Module) -> dict:
    """The plan for the configured model, data and schedule; refuses caches that cannot fit."""
    cfg = ctx.cfg
    rows = candidates(ctx, model)
    by_block = {r["block"]: r for r in rows}
    fixed = [p for p in cfg.points if p.block != AUTO]
    need = sum(_need(cfg, by_block[p.block]) for p in fixed)
    files = len(cfg.seeds) * len(cfg.points) * len(cfg.methods.discard)
    free = free_bytes(Path(cfg.paths.cache))
    normal = method_costs(ctx, model, "normal", [])
    schedule = {}
    for name in (*cfg.methods.baselines, *cfg.methods.discard):
        if name == "normal" or not method(name).uses_points or cfg.auto:
            continue  # an auto schedule's savings are known once it is decided
        costs = method_costs(ctx, model, name, [])
        schedule[name] = {
            "train_flops": costs.train_flops,
            "flops_saved": 1 - costs.train_flops / normal.train_flops,
            "avg_memory_mb": costs.avg_memory_mb,
            "memory_saved": 1 - costs.avg_memory_mb / normal.avg_memory_mb,
        }
    if cfg.pretrain is not None:
        weights = "pre-trained (stage pretrain)"
    elif cfg.model.checkpoint:
        weights = f"the checkpoint {cfg.model.checkpoint}"
    else:
        weights = "random init"
    plan = {
        "model": cfg.model.name,
        "weights": weights,
        "dataset": cfg.data.name,
        "train_samples": len(ctx.train),
        "codec": cfg.cache.codec,
        "tolerance": cfg.cache.tolerance,
        "relative": cfg.cache.relative,
        "points": [p.block for p in cfg.points],
        "blocks": rows,
        "normal": {"train_flops": normal.train_flops, "avg_memory_mb": normal.avg_memory_mb},
        "schedule": schedule,
        "caches_bytes": need,
        "free_bytes": free,
        "allowed": allowed_blocks(cfg, rows, need, files, free),
        # the configured schedule's predicted time (every point's stages; None while auto)
        "schedule_time": schedule_time(cfg, {r["block"]: r["time"] for r in rows}),
    }
    if cfg.auto and not any(r["fits"] for r in plan["allowed"]["blocks"].values()):
        raise FreezecacheError(
            f"no block's caches fit in the {free / 1e9:.2f} GB free under {cfg.paths.cache} "
            "for an auto freeze point — free space or point paths.cache elsewhere"
        )
    if need * MARGIN + files * (H5_OVERHEAD - H5_HEADERS) > free:  # what the writer reserves
        raise FreezecacheError(
            f"the freeze schedule's caches need {need / 1e9:.2f} GB (+10%) but "
            f"{cfg.paths.cache} has {free / 1e9:.2f} GB free — free space, point paths.cache "
            "elsewhere (a symlink inside the repo), or freeze fewer points"
        )
    return plan


def _time_table(plan: dict) -> list[str]:
    """Predicted seconds per epoch and once per method after a freeze at each block, each
    discard method's break-even against FreezeOut, and what a stage process pays (plan_time.py)."""
    names = list(plan["blocks"][0].get("time", {}).get("epoch_s", {})) if plan["blocks"] else []
    if not names:
        return []
    head = ["Block", "FreezeOut epoch (s)", "one-off (s)"]
    for name in names:
        head += [f"{label(name)} epoch (s)", "one-off (s)", "break-even (epochs)"]
    lines = ["", "Predicted time (a few timed steps on this machine, before any training):", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in plan["blocks"]:
        t = r["time"]
        fo_once = t["one_off_s"].get("freezeout")
        cells = [str(r["block"]), f"{t['freezeout_epoch_s']:.2f}",
                 "–" if fo_once is None else f"{fo_once:.1f}"]  # fmt: skip
        for name in names:
            be = t["break_even_epochs"][name]
            cells += [f"{t['epoch_s'][name]:.2f}", f"{t['one_off_s'][name]:.1f}",
                      "never" if be is None else f"{be:.1f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Break-even: epochs after the freeze point from which the method's run is done sooner "
        "than FreezeOut's (its one-off seconds beyond FreezeOut's over the seconds it saves per "
        "epoch). One-off: every stage process of the method after the shared run, as measured "
        "here before any training: its start-up, setup, checkpoints, accounting and test; a "
        "discard method's cache stage (a second process, the prefix's forward over the training "
        "set, the cache written), its loader over the whole cache, the validation features and "
        "the decode path's first use.",
    ]
    lines += _overheads_lines(plan)
    return lines


def _overheads_lines(plan: dict) -> list[str]:
    """What every stage process pays here, and each method's predicted time at the schedule's
    first point for the configured epochs."""
    rows = {r["block"]: r["time"] for r in plan["blocks"]}
    first = next(iter(rows.values()))
    o = first.get("overheads")
    if o is None:
        return []
    starts = ", ".join(f"{k} {v:.2f} s" for k, v in o["startup_s"].items())
    lines = [
        "",
        f"Measured once: a stage process's start-up ({starts}); its setup {o['setup_s']:.2f} s; "
        f"a checkpoint {o['save_s']:.3f} s; the accounting "
        + ", ".join(f"{label(k)} {v:.2f} s" for k, v in o["accounting_s"].items())
        + f"; the cache's decode path's first use in a process {o['warmup_s']:.2f} s.",
    ]
    sched = plan.get("schedule_time")
    if sched and sched.get("method_s"):
        total = ", ".join(f"{label(k)} {v:.1f} s" for k, v in sched["method_s"].items())
        even = ", ".join(
            f"{label(k)} {'never' if v is None else f'{v:.1f}'}"
            for k, v in sched["break_even_epochs"].items()
        )
        lines += [
            "",
            f"The configured schedule (blocks {sched['blocks']}), {sched['epochs_after']} epochs "
            f"after its first point: {total} after the shared run; break-even (epochs) {even}.",
        ]
    return lines


def render_markdown(plan: dict) -> str:
    mb = 1e6
    lines = [
        f"### Freeze plan: {plan['model']} on {plan['dataset']}, {plan['train_samples']} "
        f"training samples, {plan['codec']} at tolerance {plan['tolerance']}"
        f"{' (relative)' if plan['relative'] else ''}",
        "",
        f"Measured with the starting weights: {plan['weights']}."
        + (
            " Untrained features compress differently from trained ones, so the sizes can "
            "be several times off: trust the shapes and FLOPs, not the sizes."
            if plan["weights"] == "random init"
            else ""
        ),
        "",
        "| Block | Output shape | fp32 B/sample | Cache B/sample | Ratio | Cache MB | "
        "+ stored flips MB | Suffix share of forward FLOPs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in plan["blocks"]:
        mark = f" (point {r['point']})" if r["point"] else ""
        lines.append(
            f"| {r['block']}{mark} | {'x'.join(map(str, r['shape']))} | "
            f"{r['fp32_bytes_per_sample']} | {r['bytes_per_sample']:.0f} | {r['ratio']:.3f} | "
            f"{r['cache_bytes'] / mb:.1f} | {r['cache_bytes_with_extra'] / mb:.1f} | "
            f"{r['suffix_flops_share']:.2f} |"
        )
    lines += _time_table(plan)
    lines += [
        "",
        "The configured schedule (blocks " + str(plan["points"]) + ") against Normal:",
        "",
    ]
    lines += ["| Method | Training FLOPs saved | Avg. accounted memory saved |", "|---|---|---|"]
    for name, s in plan["schedule"].items():
        lines.append(
            f"| {label(name)} | {100 * s['flops_saved']:.1f}% | {100 * s['memory_saved']:.1f}% |"
        )
    lines += [
        "",
        f"All caches of the schedule (every seed and discard method): "
        f"{plan['caches_bytes'] / 1e9:.3f} GB; free where they are written: "
        f"{plan['free_bytes'] / 1e9:.1f} GB.",
        "",
    ]
    return "\n".join(lines)
