"""The method's steps, one function per DVC stage: setup -> main, each writing exactly its outs.

prepare -> train_prefix -> {baseline_normal, baseline_freezeout}
                        -> for each discard variant and freeze point k:
                           [rank_k] -> cache_k -> train_suffix_k -> (point k+1 ...)
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from freezecache import augment, data, rank, runtime, store
from freezecache.codec import make_codec
from freezecache.config import AUGMENT_MODE, Config, Data, dump_config
from freezecache.costs import record_costs
from freezecache.errors import FreezecacheError
from freezecache.io import atomic_write_bytes, atomic_write_json, file_digest, tensors_digest
from freezecache.layout import HISTORY, METRICS, STATE, Layout
from freezecache.models import create_model, split
from freezecache.train import Images, RunState, Trainer, evaluate

log = logging.getLogger(__name__)


# -- shared set-up ---------------------------------------------------------------------------
class Context:
    """Device, data and model for one seed, built once per stage."""

    def __init__(self, cfg: Config, seed: int, prepared: str | None = None):
        self.cfg = cfg
        self.seed = seed
        self.layout = Layout(cfg.paths)
        runtime.set_threads(cfg.train.threads)
        runtime.seed_everything(seed)
        self.device = runtime.pick_device(cfg.train.device)
        train, test, self.meta = data.load_prepared(Path(prepared or self.layout.prepared))
        self.train = Images.from_split(train, self.meta, self.device)
        self.test = Images.from_split(test, self.meta, self.device)

    def new_model(self) -> nn.Module:
        cfg = self.cfg
        torch.manual_seed(runtime.derive_seed(self.seed, "init"))
        model = create_model(
            cfg.model.name,
            num_classes=self.meta["num_classes"],
            in_chans=self.meta["channels"],
            img_size=self.meta["img_size"],
            **cfg.model.kwargs,
        )
        weights = cfg.model.checkpoint
        if cfg.pretrain is not None:
            weights = f"{self.layout.pretrain}/{STATE}"
        if weights:
            from freezecache.models import load_checkpoint

            load_checkpoint(model, os.path.expanduser(weights))  # head replaced if classes differ
        return model.to(self.device)

    def evaluate(self, model: nn.Module) -> dict:
        t = self.cfg.train
        return evaluate(
            model,
            self.test,
            batch_size=t.eval_batch_size,
            precision=t.precision,
            device=self.device,
        )

    def image_batches(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        g = runtime.generator(self.seed, epoch, "images")
        return self.train.batches(self.cfg.train.batch_size, g=g, train_aug=self.cfg.train)

    @property
    def image_steps(self) -> int:
        return math.ceil(len(self.train) / self.cfg.train.batch_size)

    def run_key(self, stage: str, *inputs: Path) -> str:
        """Identity of a stage's work: config + input contents. A checkpoint is resumed only
        when this matches, so an edited param never resumes a stale run."""
        h = hashlib.sha256(stage.encode())
        h.update(json.dumps(dump_config(self.cfg), sort_keys=True).encode())
        for p in inputs:
            h.update(file_digest(p).encode())
        return h.hexdigest()[:16]

    def trainer(
        self, model: nn.Module, stage: str, start: RunState | None, *inputs: Path
    ) -> Trainer:
        """A trainer that resumes from this stage's checkpoint when its key matches."""
        ckpt = self.layout.checkpoint(stage) / f"{self.run_key(stage, *inputs)}.pt"
        state = start
        if ckpt.is_file():
            state = RunState.load(ckpt)
            log.info("resuming %s from its checkpoint at epoch %d", stage, state.epoch)
        return Trainer(
            model, self.cfg.train, seed=self.seed, device=self.device, state=state, checkpoint=ckpt
        )


def write_run(out: Path, state: RunState, extra_metrics: dict | None = None) -> None:
    """A training stage's outs: state.pt, metrics.json (final row) and history.csv."""
    out.mkdir(parents=True, exist_ok=True)
    state.save(out / STATE)
    rows = state.history
    buf = io.StringIO()
    keys = list(dict.fromkeys(k for r in rows for k in r))
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out / HISTORY, buf.getvalue().encode())
    final = rows[-1] if rows else {}
    metrics = {
        "test_acc": final.get("test_acc"),
        "test_loss": final.get("test_loss"),
        "epochs": state.epoch,
        "wall_time_s": sum(r.get("epoch_time_s", 0.0) for r in rows),
        **(extra_metrics or {}),
    }
    atomic_write_json(out / METRICS, metrics)


def clear_checkpoint(ctx: Context, stage: str) -> None:
    for f in ctx.layout.checkpoint(stage).glob("*.pt"):
        f.unlink()


# -- prepare ---------------------------------------------------------------------------------
def _prepare(d: Data, out: Path) -> dict:
    """Prepares the data set a `data` params section describes into `out`."""
    return data.prepare(
        d.name,
        os.path.expanduser(d.root) if d.root else None,
        out,
        img_size=d.img_size,
        channels=d.channels,
        train_size=d.train_size,
        test_size=d.test_size,
        seed=d.seed,
        download=d.download,
    )


def prepare(cfg: Config) -> dict:
    return _prepare(cfg.data, Path(Layout(cfg.paths).prepared))


# -- optional pre-training on another dataset -----------------------------------------------------
def pretrain(cfg: Config) -> None:
    """Trains the model from scratch on `pretrain.data`; later stages start from its weights."""
    p = cfg.pretrain
    if p is None:
        raise FreezecacheError("params.yaml has no pretrain section — nothing to pre-train")
    layout = Layout(cfg.paths)
    _prepare(p.data, Path(layout.pretrain_data))
    pcfg = cfg.model_copy(
        update={
            "pretrain": None,
            "model": cfg.model.model_copy(update={"checkpoint": None}),
            "train": cfg.train.model_copy(update={"epochs": p.epochs, "lr": p.lr}),
        }
    )
    seed = cfg.seeds[0]
    ctx = Context(pcfg, seed, prepared=layout.pretrain_data)
    model = ctx.new_model()
    trainer = ctx.trainer(model, "pretrain", None, Path(layout.pretrain_data) / "train.npz")
    t0 = time.perf_counter()
    trainer.fit(
        state="full",
        position=0,
        start=0,
        end=p.epochs,
        total_epochs=p.epochs,
        batches=ctx.image_batches,
        forward=model,
        steps_per_epoch=ctx.image_steps,
        evaluate=lambda: ctx.evaluate(model),
    )
    out = Path(layout.pretrain)
    costs = record_costs(
        ctx,
        model,
        [("full", 0, p.epochs)],
        out,
        wall_s=time.perf_counter() - t0,
        history=trainer.state.history,
    )
    write_run(out, trainer.state, costs)
    clear_checkpoint(ctx, "pretrain")


# -- full-model training up to the first freeze point --------------------------------------
def train_prefix(cfg: Config, seed: int) -> None:
    ctx = Context(cfg, seed)
    stage = f"train_prefix_s{seed}"
    model = ctx.new_model()
    until = cfg.points[0].epoch if cfg.points else cfg.train.epochs
    trainer = ctx.trainer(model, stage, None, Path(ctx.layout.prepared) / "train.npz")
    t0 = time.perf_counter()
    trainer.fit(
        state="full",
        position=0,
        start=0,
        end=until,
        total_epochs=cfg.train.epochs,
        batches=ctx.image_batches,
        forward=model,
        steps_per_epoch=ctx.image_steps,
        evaluate=lambda: ctx.evaluate(model),
    )
    out = Path(ctx.layout.prefix(seed))
    costs = record_costs(
        ctx,
        model,
        [("full", 0, until)],
        out,
        wall_s=time.perf_counter() - t0,
        history=trainer.state.history,
    )
    write_run(out, trainer.state, costs)
    clear_checkpoint(ctx, stage)


# -- baselines: Normal and FreezeOut -------------------------------------------------------------
def baseline(cfg: Config, seed: int, method: str) -> None:
    """Continues the shared prefix run: Normal trains everything; FreezeOut freezes the
    blocks up to each point (still running them forward) from that point's epoch on."""
    ctx = Context(cfg, seed)
    stage = f"baseline_{method}_s{seed}"
    start_file = Path(ctx.layout.prefix(seed)) / STATE
    start = RunState.load(start_file)
    model = ctx.new_model()
    trainer = ctx.trainer(model, stage, start, start_file)
    phases = _baseline_phases(cfg, method)
    t0 = time.perf_counter()
    for state, position, begin, end in phases:
        prefix, suffix = split(model, position)
        forward = model if state == "full" else _frozen_forward(prefix, suffix)
        trainer.fit(
            state=state,
            position=position,
            start=begin,
            end=end,
            total_epochs=cfg.train.epochs,
            batches=ctx.image_batches,
            forward=forward,
            steps_per_epoch=ctx.image_steps,
            evaluate=lambda: ctx.evaluate(model),
        )
    out = Path(ctx.layout.baseline(seed, method))
    schedule = _schedule(cfg, "full" if method == "normal" else "freeze")
    costs = record_costs(
        ctx, model, schedule, out, wall_s=time.perf_counter() - t0, history=trainer.state.history
    )
    write_run(out, trainer.state, costs)
    clear_checkpoint(ctx, stage)


def _schedule(cfg: Config, kind: str) -> list[tuple[str, int, int]]:
    """(state, position, epochs) per freezing state over the whole run, as the paper counts."""
    pts = cfg.points
    out = [("full", 0, pts[0].epoch if pts else cfg.train.epochs)]
    if kind == "full":
        return [("full", 0, cfg.train.epochs)]
    for i, p in enumerate(pts):
        end = pts[i + 1].epoch if i + 1 < len(pts) else cfg.train.epochs
        out.append((kind, p.block, end - p.epoch))
    return out


def _baseline_phases(cfg: Config, method: str) -> list[tuple[str, int, int, int]]:
    pts = cfg.points
    if method == "normal" or not pts:
        return [("full", 0, pts[0].epoch if pts else 0, cfg.train.epochs)]
    return [
        ("freeze", p.block, p.epoch, pts[i + 1].epoch if i + 1 < len(pts) else cfg.train.epochs)
        for i, p in enumerate(pts)
    ]


def _frozen_forward(prefix: nn.Module, suffix: nn.Module):
    def forward(x: Tensor) -> Tensor:
        with torch.no_grad():
            h = prefix(x)
        return suffix(h)

    return forward


def check_point(cfg: Config, variant: str, point: int) -> None:
    """Rejects a variant or point the params do not define."""
    if variant not in cfg.discard_methods:
        raise FreezecacheError(
            f"--variant {variant!r} is not among the discard methods in params.yaml "
            f"({', '.join(cfg.discard_methods) or 'none'})"
        )
    if not 1 <= point <= len(cfg.points):
        raise FreezecacheError(f"--point {point}: params.yaml has {len(cfg.points)} freeze points")


# -- features at a freeze point ------------------------------------------------------------------
def _start_of_point(ctx: Context, variant: str, point: int) -> tuple[Path, RunState]:
    """The model state a point starts from: the shared prefix run for the first point, the
    previous point's suffix run after that."""
    if point == 1:
        f = Path(ctx.layout.prefix(ctx.seed)) / STATE
    else:
        f = Path(ctx.layout.suffix(ctx.seed, variant, point - 1)) / STATE
    return f, RunState.load(f)


def _model_at(ctx: Context, state: RunState) -> nn.Module:
    model = ctx.new_model()
    model.load_state_dict(state.model)
    return model.eval()


def prefix_hash(model: nn.Module, position: int) -> str:
    prefix, _ = split(model, position)
    return tensors_digest(prefix.state_dict())


def feature_pairs(
    ctx: Context,
    model: nn.Module,
    variant: str,
    point: int,
    limit: int | None = None,
    batch_size: int = 256,
) -> Iterator[tuple[Tensor, Tensor | None, Tensor]]:
    """(F(x), F(flip(x)) or None, y) for the training set at `point`, in dataset order.

    Point 1 runs raw images through the frozen prefix. Later points push the previous cache
    (and its augmented twin, for the similarity variant) through the newly frozen blocks
    instead of re-reading raw images.
    """
    cfg = ctx.cfg
    want_aug = AUGMENT_MODE[variant] == "similarity"
    pos = cfg.points[point - 1].block
    with torch.no_grad(), runtime.autocast(cfg.train.precision, ctx.device):
        if point == 1:
            prefix, _ = split(model, pos)
            seen = 0
            for x, y in ctx.train.batches(batch_size):
                if limit is not None and seen >= limit:
                    return
                f = prefix(x).float()
                fa = prefix(x.flip(-1)).float() if want_aug else None
                seen += y.numel()
                yield f, fa, y
            return
        prev = cfg.points[point - 2].block
        blocks = nn.Sequential(*model.blocks[prev:pos])
        path = Path(ctx.layout.cache_file(ctx.seed, variant, point - 1))
        info = store.open_cache(path)
        seen = 0
        for batch in store.iter_cache(path, info):
            if limit is not None and seen >= limit:
                return
            b = store.finish_batch(batch, info, ctx.device)
            x = b["x"]
            f = blocks(x).float()
            fa = None
            if want_aug:
                where = _extra_where(info, b, ctx.device)
                fa = blocks(augment.augmented_view(x, b.get("extra"), where)).float()
            seen += b["y"].numel()
            yield f, fa, b["y"]


def _extra_where(info, batch: dict, device) -> Tensor | None:
    if batch.get("extra_pos") is not None:
        return batch["extra_pos"].to(device)
    idx = list(info.extra_index or [])
    return torch.tensor(idx, dtype=torch.long, device=device) if idx else None


# -- rank -----------------------------------------------------------------------------------------
def rank_point(cfg: Config, seed: int, variant: str, point: int) -> None:
    """Scores each channel's flip sensitivity (CNN) or token match similarity (ViT)."""
    ctx = Context(cfg, seed)
    _, state = _start_of_point(ctx, variant, point)
    model = _model_at(ctx, state)
    out = Path(ctx.layout.rank(seed, variant, point))
    if model.kind == "cnn":
        sens = rank.ChannelSensitivity()
        for f, fa, _ in feature_pairs(
            ctx, model, variant, point, limit=cfg.rank.samples, batch_size=cfg.rank.batch_size
        ):
            sens.update(f, fa)
        scores = sens.scores()
        order = torch.argsort(scores, stable=True)
        result = {
            "kind": "cnn",
            "samples": sens.count,
            "scores": scores.tolist(),
            "order": order.tolist(),
        }
        rows = [
            {"rank": i, "channel": int(c), "ssim": float(scores[c])} for i, c in enumerate(order)
        ]
    else:
        sims, count = None, 0
        for f, fa, _ in feature_pairs(
            ctx, model, variant, point, limit=cfg.rank.samples, batch_size=cfg.rank.batch_size
        ):
            _, best = rank.match_tokens(f, fa)
            sims = best.sum(0) if sims is None else sims + best.sum(0)
            count += f.shape[0]
        mean = (sims / count).cpu()
        order = torch.argsort(mean, stable=True)
        result = {"kind": "vit", "samples": count, "scores": mean.tolist(), "order": order.tolist()}
        rows = [{"rank": i, "token": int(t), "cosine": float(mean[t])} for i, t in enumerate(order)]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "ranking.json", result)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(out / "scores.csv", buf.getvalue().encode())


# -- cache ----------------------------------------------------------------------------------------
def cache_point(cfg: Config, seed: int, variant: str, point: int) -> dict:
    """Pushes the training set once through the frozen prefix and writes the compressed cache."""
    ctx = Context(cfg, seed)
    _, state = _start_of_point(ctx, variant, point)
    model = _model_at(ctx, state)
    pos = cfg.points[point - 1].block
    mode = AUGMENT_MODE[variant]
    tol = cfg.cache.tolerance_at(point)
    channels = None
    if mode == "similarity" and model.kind == "cnn":
        ranking = json.loads(
            (Path(ctx.layout.rank(seed, variant, point)) / "ranking.json").read_text()
        )
        scores = torch.tensor(ranking["scores"])
        channels = rank.most_sensitive(scores, cfg.augment.gamma).sort().values
    from freezecache.models import feature_shape

    shape = feature_shape(model, pos)
    extra_shape = None
    if mode == "similarity":
        if model.kind == "cnn":
            extra_shape = (len(channels), *shape[1:])
        else:
            extra_shape = (round(cfg.augment.alpha * shape[0]), shape[1])
        if extra_shape[0] == 0:
            extra_shape = None
    path = Path(ctx.layout.cache_file(seed, variant, point))
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = make_codec(cfg.cache.codec, tol)
    t0 = time.perf_counter()
    with store.CacheWriter(
        path,
        codec=codec,
        sample_shape=shape,
        chunk_size=cfg.cache.chunk_size,
        num_samples=len(ctx.train),
        prefix_hash=prefix_hash(model, pos),
        extra_shape=extra_shape,
        extra_index=channels.tolist() if channels is not None and extra_shape else None,
        meta={
            "variant": variant,
            "point": point,
            "block": pos,
            "seed": seed,
            "model": cfg.model.name,
            "mode": mode,
        },
        workers=cfg.cache.encode_workers,
    ) as writer:
        for f, fa, y in feature_pairs(ctx, model, variant, point):
            extra = extra_pos = None
            if extra_shape is not None and model.kind == "cnn":
                extra = fa[:, channels.to(fa.device)]
            elif extra_shape is not None:
                extra_pos, extra, _ = rank.select_tokens(f, fa, cfg.augment.alpha)
                extra_pos = extra_pos.cpu().numpy().astype(np.int32)
            writer.add(
                f.cpu().numpy(),
                y.cpu().numpy(),
                extra=None if extra is None else extra.float().cpu().numpy(),
                extra_pos=extra_pos,
            )
    stats = writer.close()  # idempotent: the stats of the published file
    stats.update(decode_throughput(path))
    stats.update(
        point=point,
        block=pos,
        tolerance=tol,
        codec=cfg.cache.codec,
        chunk_size=cfg.cache.chunk_size,
        build_s=time.perf_counter() - t0,
        stored_channels=0 if channels is None else len(channels),
    )
    atomic_write_json(Path(ctx.layout.cache_stats(seed, variant, point)), stats)
    return stats


def decode_throughput(path: Path) -> dict:
    """Reads and decodes the whole cache once, single process: fp32 MB/s a loader worker gets."""
    info = store.open_cache(path)
    t0 = time.perf_counter()
    n = 0
    for batch in store.iter_cache(path, info):
        n += batch["y"].numel()
    took = time.perf_counter() - t0
    raw = n * 4 * math.prod(info.sample_shape)
    return {"decode_s": took, "decode_mb_s": raw / 1e6 / took if took else None}


# -- train the suffix from the cache ---------------------------------------------------------------
def train_suffix(cfg: Config, seed: int, variant: str, point: int) -> None:
    """Discards the prefix and trains the rest from the cache for this point's epochs."""
    ctx = Context(cfg, seed)
    stage = f"train_suffix_{variant}_s{seed}_p{point}"
    start_file, start = _start_of_point(ctx, variant, point)
    model = ctx.new_model()
    model.load_state_dict(start.model)
    pos = cfg.points[point - 1].block
    path = Path(ctx.layout.cache_file(seed, variant, point))
    info = store.open_cache(path, expect_prefix_hash=prefix_hash(model, pos))
    _, suffix = split(model, pos)
    begin = cfg.points[point - 1].epoch
    end = cfg.points[point].epoch if point < len(cfg.points) else cfg.train.epochs
    mode = AUGMENT_MODE[variant]
    a = cfg.augment
    pad = augment.scaled_pad(a.crop_pad, info.sample_shape[-1], ctx.meta["img_size"])
    loader = store.make_loader(
        path,
        info,
        batch_size=cfg.train.batch_size,
        seed=seed,
        workers=cfg.cache.loader_workers,
        device_decode=cfg.cache.device_decode and cfg.cache.codec == "quant",
        pin_memory=ctx.device.type == "cuda",
        in_memory=cfg.cache.in_memory,
    )

    def batches(epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        loader.sampler.set_epoch(epoch)
        g = runtime.generator(seed, epoch, "features")
        for raw in loader:
            b = store.finish_batch(raw, info, ctx.device)
            x = augment.augment_cached(
                b["x"],
                a,
                mode=mode,
                g=g,
                crop_pad=pad,
                extra=b.get("extra"),
                where=_extra_where(info, b, ctx.device),
            )
            yield x, b["y"]

    trainer = ctx.trainer(model, stage, start, start_file, path)
    t0 = time.perf_counter()
    trainer.fit(
        state="discard",
        position=pos,
        start=begin,
        end=end,
        total_epochs=cfg.train.epochs,
        batches=batches,
        forward=suffix,
        steps_per_epoch=len(loader),
        evaluate=lambda: ctx.evaluate(model),
    )
    out = Path(ctx.layout.suffix(seed, variant, point))
    schedule = _schedule(cfg, "discard")
    costs = record_costs(
        ctx,
        model,
        schedule,
        out,
        wall_s=time.perf_counter() - t0,
        history=trainer.state.history,
        variant=variant,
    )
    write_run(out, trainer.state, costs)
    clear_checkpoint(ctx, stage)
