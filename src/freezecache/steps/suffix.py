"""Stage train_suffix: discard the frozen prefix and train the remaining blocks from the cache
for the freeze point's epochs."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from torch import Tensor

from freezecache import augment, distributed, runtime
from freezecache.cache import (
    CacheInfo,
    empty_tail,
    finish_batch,
    held_in_memory,
    make_loader,
    open_cache,
    set_epoch,
)
from freezecache.config import Config
from freezecache.costs import method_costs
from freezecache.methods import method
from freezecache.models import split
from freezecache.schedule import Phase
from freezecache.steps.context import Context
from freezecache.steps.model import prefix_hash
from freezecache.steps.run import Run, start_of_point
from freezecache.train import TrainSpec


def extra_where(info: CacheInfo, batch: dict, device) -> Tensor | None:
    """Where stored extras go: per-sample token positions, or the cache's channel index."""
    import torch

    if batch.get("extra_pos") is not None:
        return batch["extra_pos"].to(device)
    idx = list(info.extra_index or [])
    return torch.tensor(idx, dtype=torch.long, device=device) if idx else None


def cache_loader(ctx: Context, path: Path, info: CacheInfo):
    """The stage's loader over a cache, set up by the ``loader`` params."""
    cfg = ctx.cfg
    return make_loader(
        path,
        info,
        batch_size=cfg.train.batch_size,
        seed=ctx.seed,
        workers=cfg.loader.workers,
        device_decode=cfg.loader.device_decode and cfg.cache.codec == "quant",
        pin_memory=ctx.device.type == "cuda",
        in_memory=cfg.loader.in_memory,
        shard=(distributed.rank(), distributed.world_size()),
        procs_per_host=distributed.local_world_size(),
    )


def cached_batches(ctx: Context, info: CacheInfo, loader, mode: str, layout: str):
    """Per-epoch batches from the cache, augmented on the training device."""

    def batches(epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        set_epoch(loader, epoch)
        raw = (finish_batch(r, info, ctx.device) for r in loader)
        x = y = None
        for x, y in augmented_batches(ctx, info, raw, epoch, mode, layout):
            yield x, y
        if empty_tail(loader) and x is not None:
            yield x[:0], y[:0]  # this rank's share of the last global batch is empty: step anyway

    return batches


def augmented_batches(
    ctx: Context, info: CacheInfo, raw: Iterable[dict], epoch: int, mode: str, layout: str
) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches of cached features (dicts on the training device: x, y and stored extras)
    augmented as the suffix trains on them."""
    a = ctx.cfg.augment
    width = augment.map_width(info.sample_shape, layout)
    pad = augment.scaled_pad(a.crop_pad, width, ctx.meta["img_size"])
    g = runtime.generator(*distributed.stream(ctx.seed, epoch, "features"))  # per rank
    for b in raw:
        x = augment.augment_cached(
            b["x"],
            a,
            mode=mode,
            g=g,
            crop_pad=pad,
            extra=b.get("extra"),
            where=extra_where(info, b, ctx.device),
            layout=layout,
        )
        yield x, b["y"]


def train_suffix(cfg: Config, seed: int, name: str, block: int) -> None:
    index, point = cfg.point(block)
    ctx = Context(cfg, seed, "train_suffix", method=name, p=point)
    start_file, start = start_of_point(ctx, point)
    model = ctx.new_model()
    model.load_state_dict(start.model)
    path = ctx.stage_path("cache", "cache")
    info = open_cache(path, expect_prefix_hash=prefix_hash(model, block))
    _, suffix = split(model, block)
    loader = cache_loader(ctx, path, info)
    run = Run(ctx, model, start, start_file, path)
    run.fit(
        TrainSpec(
            phase=Phase("discard", block, *cfg.point_epochs(index)),
            forward=suffix,
            batches=cached_batches(ctx, info, loader, method(name).augment, model.layout),
            steps_per_epoch=len(loader),
            evaluate=lambda: ctx.evaluate(model),
        )
    )
    in_ram = held_in_memory(info, cfg.loader.in_memory, distributed.local_world_size())
    held = int(info.stats.get("stored_bytes", 0)) if in_ram else 0
    # this point's own cache in RAM; the report adds each point's figure to its state
    history, host = run.state.history, {block: held / 1e6}
    costs = method_costs(ctx, model, name, history, host_cache_mb=host) if ctx.main else {}
    final = index == len(cfg.points)
    run.finish(costs, final=final)
    if final:  # after the wall time is taken: a measurement, not part of the method
        measured = bn_on_clean_features(ctx, model, block, info, loader)  # every rank
        if run.live is not None:
            run.live.finish(measured)


def bn_on_clean_features(ctx: Context, model, block: int, info, loader) -> dict:
    """Does the suffix's BatchNorm, whose running statistics were built from augmented,
    quantised features, hurt? Re-estimates them on the clean cached features (one pass, a
    cumulative average) in a copy of the model and measures validation accuracy both ways.
    With several ranks each passes over its share and rank 0's statistics are kept."""
    import copy

    import torch

    probe = copy.deepcopy(model)
    _, suffix = split(probe, block)
    norms = [m for m in suffix.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms or ctx.val is None:
        return {}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the pass
    suffix.train()
    with torch.no_grad():
        for raw in loader:
            suffix(finish_batch(raw, info, ctx.device)["x"])
    distributed.sync_buffers(suffix)
    return {
        "val_acc_bn_trained": ctx.evaluate(model)["val_acc"],
        "val_acc_bn_clean": ctx.evaluate(probe)["val_acc"],
    }
