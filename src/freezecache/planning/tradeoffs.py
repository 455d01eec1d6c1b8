"""The memory/compute knobs measured side by side in one run (GitHub issue 5).

{fp32, bf16} x {grad checkpointing off, on (every block)} x {the full model, the suffix after the
last freeze point trained from a fixed batch of its cached-input features}. Every configuration
runs the training step users train with (``Trainer.step``: autocast, loss, backward, SGD) on
the same real batch of ``train.batch_size``. Rounds visit the configurations in turn, so machine
noise hits all rows alike. Rows differ only in the two knobs: no micro-batching, no clipping.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from freezecache import data
from freezecache.accounting import flops, memory
from freezecache.config import Config
from freezecache.config.model import build_model
from freezecache.core import runtime
from freezecache.core.errors import FreezecacheError
from freezecache.core.io import atomic_write_json, atomic_write_text
from freezecache.models import BlockModel, split
from freezecache.training.train import Images, RunState, Trainer, set_frozen

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
CHECKPOINT_EVERY = 1  # "on" recomputes every block: the most memory saved, the most recompute


@dataclass
class _Variant:
    """One configuration being measured: its own model copy, trainer, optimizer and batch."""

    precision: str
    checkpointing: bool
    part: str
    trainer: Trainer
    opt: torch.optim.Optimizer
    forward: nn.Module  # the whole model, or the suffix split from it
    x: Tensor
    y: Tensor
    times: list[float] = field(default_factory=list)
    step_flops: int = 0
    cuda_peak_mb: float | None = None  # None off CUDA

    def step(self) -> None:
        """One training step: forward, loss, backward, SGD update."""
        self.trainer.step(self.opt, self.forward, self.x, self.y, self.trainer.cfg.lr)


def _fixed_batch(cfg: Config, device: torch.device) -> tuple[Tensor, Tensor, dict]:
    """The first augmented training batch of ``train.batch_size`` from the prepared data."""
    train, _, meta = data.load_prepared(Path(cfg.paths.data))
    images = Images.from_split(train, meta, device)
    g = runtime.generator(cfg.seeds[0], 0, "tradeoffs")
    x, y = next(images.batches(cfg.train.batch_size, g=g, train_aug=cfg.train))
    return x, y, meta


def _base_model(cfg: Config, meta: dict, weights: Path | None, device: torch.device) -> BlockModel:
    """The params' model with trained weights when given (realistic activations), else fresh."""
    torch.manual_seed(runtime.derive_seed(cfg.seeds[0], "init"))
    model = build_model(cfg.model, meta)
    if weights is not None:
        model.load_state_dict(RunState.load(weights).model)
    else:
        log.info("no trained weights given: measuring a freshly initialised %s", cfg.model.name)
    return model.to(device)


def _cached_features(model: BlockModel, position: int, x: Tensor) -> Tensor:
    """What the cache holds for ``x`` at ``position``: the frozen prefix's fp32 output."""
    prefix, _ = split(model, position)
    with runtime.eval_mode(model), torch.no_grad():
        return prefix(x)


def _make_variant(
    base: BlockModel,
    cfg: Config,
    key: tuple[str, bool, str],
    batch: tuple[Tensor, Tensor],
    position: int,
    device: torch.device,
) -> _Variant:
    """A configuration on its own copy of ``base``; ``batch`` is images or cached features."""
    precision, checkpointing, part = key
    model = copy.deepcopy(base)
    train_cfg = cfg.train.model_copy(
        update={
            "precision": precision,
            "grad_checkpointing": CHECKPOINT_EVERY if checkpointing else 0,
            "micro_batch": None,
            "clip_grad_norm": None,
        }
    )
    trainer = Trainer(model, train_cfg, seed=cfg.seeds[0], device=device)
    set_frozen(model, position if part == "suffix" else 0)
    forward = split(model, position)[1] if part == "suffix" else model
    model.train()
    x, y = batch
    # Own copies, so each configuration's CUDA peak counts its own input batch.
    return _Variant(
        precision,
        checkpointing,
        part,
        trainer,
        trainer.make_optimizer(),
        forward,
        x.clone(),
        y.clone(),
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_step(conf: _Variant, device: torch.device) -> float:
    """Seconds of one training step, the device drained before and after."""
    _sync(device)
    t0 = time.perf_counter()
    conf.step()
    _sync(device)
    return time.perf_counter() - t0


def _step_flops(conf: _Variant) -> int:
    """FLOPs of one whole training step; backward's checkpoint recomputation counts too."""
    counter = flops.flop_counter()
    with counter:
        conf.step()
    return int(counter.get_total_flops())


def _accounted(conf: _Variant, device: torch.device) -> dict[str, float]:
    """memory.accounted_memory of the configuration, under its precision's autocast."""

    def loss_fn(out: Tensor) -> Tensor:
        return F.cross_entropy(out.float(), conf.y)

    with runtime.autocast(conf.precision, device):
        return memory.accounted_memory(conf.forward, conf.x, loss_fn=loss_fn)


def _build_all(
    cfg: Config,
    base: BlockModel,
    batches: dict[str, tuple[Tensor, Tensor]],
    position: int,
    device: torch.device,
) -> list[_Variant]:
    """Every configuration; on CUDA each gets the allocator's peak over a steady-state step.

    A configuration's peak is taken before the next one is built and less what was allocated
    before it was built, so it counts its own model, optimizer state, batch and activations.
    """
    confs = []
    for part in batches:
        for precision in PRECISIONS:
            for checkpointing in (False, True):
                allocated = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
                conf = _make_variant(
                    base, cfg, (precision, checkpointing, part), batches[part], position, device
                )
                if device.type == "cuda":
                    conf.step()  # the optimizer's momentum exists from the second step on
                    with runtime.CudaPeak(device) as peak:
                        conf.step()
                    conf.cuda_peak_mb = peak.peak_mb - allocated / memory.MIB
                confs.append(conf)
    return confs


def _time_round_robin(confs: list[_Variant], device: torch.device, steps: int, warmup: int) -> None:
    """Rounds that each step every configuration in turn: the first counts FLOPs (untimed, so it
    stands for one warm-up round), then the rest of ``warmup``, then ``steps`` timed rounds."""
    for conf in confs:
        conf.step_flops = _step_flops(conf)
    warmup = max(warmup - 1, 0)
    for r in range(warmup + steps):
        for conf in confs:
            took = _timed_step(conf, device)
            if r >= warmup:
                conf.times.append(took)


def _row(conf: _Variant, cfg: Config, position: int, device: torch.device) -> dict:
    mem = _accounted(conf, device)
    return {
        "part": conf.part,
        "precision": conf.precision,
        "grad_checkpointing": conf.checkpointing,
        "model": cfg.model.name,
        "batch_size": int(conf.y.numel()),
        "first_block": position if conf.part == "suffix" else 0,
        "device": device.type,
        "accounted_memory_mb": mem["total_mb"],
        "activation_memory_mb": mem["saved_activations_mb"] + mem["recompute_peak_mb"],
        "cuda_peak_mb": conf.cuda_peak_mb,
        "step_time_s": statistics.median(conf.times),
        "step_times_s": conf.times,
        "step_flops": conf.step_flops,
        "recompute_flops_frac": 0.0,
    }


def _add_recompute_frac(rows: list[dict]) -> None:
    """Recomputed share of a checkpointed step's FLOPs: its excess over the same step without
    checkpointing (exact: the FLOP counts are deterministic and checkpointing adds no other op).
    """
    plain = {(r["part"], r["precision"]): r for r in rows if not r["grad_checkpointing"]}
    for r in rows:
        if r["grad_checkpointing"] and r["step_flops"]:
            extra = r["step_flops"] - plain[(r["part"], r["precision"])]["step_flops"]
            r["recompute_flops_frac"] = extra / r["step_flops"]


def measure_tradeoffs(
    cfg: Config, *, steps: int = 5, warmup: int = 2, weights: Path | None = None
) -> list[dict]:
    """One row per {precision} x {checkpointing} x {part}, measured in one run.

    ``weights`` is a RunState file (the prefix run) whose trained weights make the activations
    realistic; None measures a freshly initialised model. The suffix starts after the last
    freeze point and is left out when the params have none.
    """
    if steps < 1 or warmup < 0:
        raise FreezecacheError(
            f"tradeoffs: steps={steps}, warmup={warmup} — time at least 1 step, warm up >= 0"
        )
    runtime.set_threads(cfg.runtime.threads)
    runtime.seed_everything(cfg.seeds[0])
    device = runtime.pick_device(cfg.runtime.device)
    x, y, meta = _fixed_batch(cfg, device)
    base = _base_model(cfg, meta, weights, device)
    batches = {"full": (x, y)}
    position = cfg.points[-1].block if cfg.points else 0
    if position:
        batches["suffix"] = (_cached_features(base, position, x), y)
    confs = _build_all(cfg, base, batches, position, device)
    _time_round_robin(confs, device, steps, warmup)
    rows = [_row(c, cfg, position, device) for c in confs]
    _add_recompute_frac(rows)
    return rows


# -- the table --------------------------------------------------------------------------------
def _ratio(value: float | None, base: float | None) -> str:
    return "–" if not value or not base else f"{value / base:.2f}×"


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def render_markdown(rows: list[dict]) -> str:
    """A markdown table; ratios are against the fp32 / checkpointing-off row of the same part."""
    first = rows[0]
    base = {r["part"]: r for r in rows if r["precision"] == "fp32" and not r["grad_checkpointing"]}
    lines = [
        f"### Memory/compute trade-offs: {first['model']}, batch {first['batch_size']}, "
        f"{first['device']}",
        "",
        "| Part | Precision | Grad ckpt | Accounted MB | Memory × | CUDA peak MB | Step s "
        "| Time × | GFLOPs/step | FLOPs × | Recomputed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = base.get(r["part"], r)
        part = "full model" if r["part"] == "full" else f"suffix from block {r['first_block']}"
        mem, secs, flops = r["accounted_memory_mb"], r["step_time_s"], r["step_flops"]
        lines.append(
            f"| {part} | {r['precision']} | {'on' if r['grad_checkpointing'] else 'off'} "
            f"| {mem:.1f} | {_ratio(mem, b['accounted_memory_mb'])} "
            f"| {_fmt(r['cuda_peak_mb'], '.1f')} | {secs:.3f} | {_ratio(secs, b['step_time_s'])} "
            f"| {flops / 1e9:.2f} | {_ratio(flops, b['step_flops'])} "
            f"| {100 * r['recompute_flops_frac']:.0f}% |"
        )
    lines += [
        "",
        "Accounted memory: parameters, gradients, SGD momentum, the input batch and the "
        "activations kept for backward (with checkpointing: the segments' inputs plus the largest "
        "segment rebuilt in backward). Step time: median of timed steps, configurations "
        "interleaved. FLOPs: one whole training step (forward, backward and recomputation), "
        "matmuls and convolutions only. Recomputed: share of the step's FLOPs spent recomputing. "
        "CUDA peak: the allocator's peak over one step, less what was allocated before the "
        "configuration was built.",
    ]
    return "\n".join(lines) + "\n"


def write(rows: list[dict], json_path: Path, md_path: Path) -> None:
    """The rows as JSON and the table as Markdown."""
    atomic_write_json(json_path, rows)
    atomic_write_text(md_path, render_markdown(rows))


__all__ = ["measure_tradeoffs", "render_markdown", "write"]
