"""Stage train_suffix: discard the frozen prefix and train the remaining blocks from the cache
for the freeze point's epochs."""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor

from freezecache import augment, distributed, runtime, store
from freezecache.config import Config
from freezecache.costs import method_costs
from freezecache.methods import method
from freezecache.models import split
from freezecache.steps.cache import prefix_hash
from freezecache.steps.context import Context, start_of_point


def extra_where(info: store.CacheInfo, batch: dict, device) -> Tensor | None:
    """Where stored extras go: per-sample token positions, or the cache's channel index."""
    import torch

    if batch.get("extra_pos") is not None:
        return batch["extra_pos"].to(device)
    idx = list(info.extra_index or [])
    return torch.tensor(idx, dtype=torch.long, device=device) if idx else None


def cached_batches(ctx: Context, info: store.CacheInfo, loader, mode: str, layout: str):
    """Per-epoch batches from the cache, augmented on the training device."""
    a = ctx.cfg.augment
    width = augment.map_width(info.sample_shape, layout)
    pad = augment.scaled_pad(a.crop_pad, width, ctx.meta["img_size"])

    def batches(epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        store.set_epoch(loader, epoch)
        g = runtime.generator(*distributed.stream(ctx.seed, epoch, "features"))
        x = y = None
        for raw in loader:
            b = store.finish_batch(raw, info, ctx.device)
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
            y = b["y"]
            yield x, y
        if store.empty_tail(loader) and x is not None:
            yield x[:0], y[:0]  # this rank's share of the last global batch is empty: step anyway

    return batches


def train_suffix(cfg: Config, seed: int, name: str, block: int) -> None:
    index, point = cfg.point(block)
    ctx = Context(cfg, seed, "train_suffix", method=name, p=point)
    start_file, start = start_of_point(ctx, point)
    model = ctx.new_model()
    model.load_state_dict(start.model)
    path = ctx.stage_path("cache", "cache")
    info = store.open_cache(path, expect_prefix_hash=prefix_hash(model, block))
    _, suffix = split(model, block)
    begin, end = cfg.point_epochs(index)
    loader = store.make_loader(
        path,
        info,
        batch_size=cfg.train.batch_size,
        seed=seed,
        workers=cfg.loader.workers,
        device_decode=cfg.loader.device_decode and cfg.cache.codec == "quant",
        pin_memory=ctx.device.type == "cuda",
        in_memory=cfg.loader.in_memory,
        shard=(distributed.rank(), distributed.world_size()),
        procs_per_host=distributed.local_world_size(),
    )
    trainer = ctx.trainer(model, start, start_file, path)
    trainer.fit(
        state="discard",
        position=block,
        start=begin,
        end=end,
        total_epochs=cfg.train.epochs,
        batches=cached_batches(ctx, info, loader, method(name).augment, model.layout),
        forward=suffix,
        steps_per_epoch=len(loader),
        evaluate=lambda: ctx.evaluate(model),
    )
    in_ram = store.held_in_memory(info, cfg.loader.in_memory, distributed.local_world_size())
    held = int(info.stats.get("stored_bytes", 0)) if in_ram else 0
    trainer.state.extra.setdefault("cache_in_ram_mb", {})[block] = held / 1e6
    costs = method_costs(
        ctx,
        model,
        name,
        trainer.state.history,
        host_cache_mb=trainer.state.extra["cache_in_ram_mb"],
    ) if ctx.main else {}  # fmt: skip
    ctx.finish(trainer, model, costs, final=index == len(cfg.points))
