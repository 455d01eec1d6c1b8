"""The one training loop every stage uses: full model, FreezeOut-style frozen prefix, or a
suffix trained from cached features.

A run is a sequence of epochs; each epoch has a freezing state (`full`, `freeze` at a block
position, or `discard` at a position). Optimizer momentum is kept by parameter name, so a
later stage can continue the exact optimizer state of the blocks it still trains, and the
cosine learning rate is a pure function of the global epoch, so the schedule carries on where
the previous stage left it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from freezecache.config import Train
from freezecache.core import disk, runtime
from freezecache.core.errors import FreezecacheError
from freezecache.core.runtime import CudaPeak
from freezecache.core.timing import section
from freezecache.training import distributed
from freezecache.training.images import Batch, Features, Images
from freezecache.training.schedule import Phase
from freezecache.training.state import Checkpoint, RunState

log = logging.getLogger(__name__)

__all__ = ["Features", "Images", "RunState", "TrainSpec", "Trainer", "evaluate"]


def cosine_lr(base_lr: float, progress: float, total_epochs: int) -> float:
    """Cosine decay over the whole run; `progress` in epochs (fractional)."""
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(progress / total_epochs, 1.0)))


def set_frozen(model: nn.Module, position: int) -> None:
    """Freezes stem + the first `position` blocks (no grads, BatchNorm statistics fixed)."""
    for p in model.parameters():
        p.requires_grad_(True)
    if position <= 0:
        return
    for part in [model.stem, *model.blocks[:position]]:
        for p in part.parameters():
            p.requires_grad_(False)


def frozen_parts(model: nn.Module, position: int) -> list[nn.Module]:
    return [] if position <= 0 else [model.stem, *model.blocks[:position]]


@dataclass(frozen=True)
class TrainSpec:
    """What :meth:`Trainer.fit` trains for one freezing state: its epochs, what the batches pass
    through, and the per-epoch batches and evaluation."""

    phase: Phase  # state, position and epochs [start, end)
    forward: Callable[[Tensor], Tensor]  # what trains: the model, or the suffix
    batches: Callable[[int], Iterable[Batch]]  # epoch -> that epoch's batches
    steps_per_epoch: int
    evaluate: Callable[[], dict] = field(default=lambda: {})
    frozen: nn.Module | None = None  # FreezeOut: runs forward before ``forward``, without a graph
    # Watches the training and may end it at an epoch's end (the decision of an auto freeze
    # point): ``after_backward()`` after every backward pass; ``end_epoch(epoch, state)``
    # records its state in the run state (checkpointed) and returns whether to stop.
    monitor: Any = None


class Trainer:
    """Runs epochs of one freezing state at a time, with checkpoints at every epoch end."""

    def __init__(
        self,
        model: nn.Module,
        cfg: Train,
        *,
        seed: int,
        device: torch.device,
        state: RunState | None = None,
        checkpoint: Path | None = None,
        sync_batchnorm: bool = False,
    ) -> None:
        self.model = model.to(device)
        self.cfg = cfg
        self.seed = seed
        self.device = device
        # written by rank 0 only
        self.checkpoint = None if checkpoint is None else Checkpoint(checkpoint)
        if checkpoint is not None and distributed.is_main():
            # Each epoch end writes a checkpoint next to the last two (the one before is kept,
            # the new one is written aside and renamed), the stage then its state: refuse before
            # the first epoch rather than after it.
            disk.check_free_space(
                {Path(checkpoint): 4 * disk.state_bytes(model)},
                what=f"training checkpoints ({checkpoint})",
                advice="set paths.checkpoints to a larger filesystem",
            )
        self.sync_batchnorm = sync_batchnorm  # with several ranks: global BatchNorm statistics
        self._ddp: nn.Module | None = None  # the DDP wrapper of what trains, several ranks only
        self.on_epoch: Callable[[dict], None] | None = None  # called with each epoch's row
        self._monitor = None  # the running fit's TrainSpec.monitor
        self.scaler = runtime.grad_scaler(cfg.precision, device)
        self.state = state or RunState(model={})
        if state is not None and state.model:
            self.model.load_state_dict(state.model)
        if cfg.grad_checkpointing:
            model.set_grad_checkpointing(True, every=cfg.grad_checkpointing)

    # -- optimizer -------------------------------------------------------------------------
    def make_optimizer(self) -> torch.optim.SGD:
        """SGD over the parameters that train now, with their saved momentum restored by name."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        opt = torch.optim.SGD(
            [p for _, p in named],
            lr=self.cfg.lr,
            momentum=self.cfg.momentum,
            weight_decay=self.cfg.weight_decay,
        )
        for name, p in named:
            buf = self.state.momentum.get(name)
            if buf is not None:
                opt.state[p]["momentum_buffer"] = buf.to(p.device).clone()
        self._named = named
        return opt

    def _keep_momentum(self, opt: torch.optim.SGD) -> None:
        for name, p in self._named:
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                self.state.momentum[name] = buf.detach().cpu().clone()

    # -- one step --------------------------------------------------------------------------
    def step(
        self, opt, forward: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, lr: float
    ) -> tuple[Tensor, Tensor]:
        """One optimizer step on a batch (micro-batched, autocast, scaled, clipped as configured).

        Returns the summed loss and the number of correct predictions, as device tensors."""
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        micro = self.cfg.micro_batch or max(1, x.shape[0])
        # Sums stay on the device: no host sync per step (that would stall a GPU).
        loss_sum = torch.zeros((), device=x.device)
        correct = torch.zeros((), dtype=torch.long, device=x.device)
        weight = self._loss_weight(y)
        parts = list(zip(x.split(micro), y.split(micro), strict=True))
        for i, (xs, ys) in enumerate(parts):
            # With DDP, gradients are reduced once, after the last micro-batch.
            last = i == len(parts) - 1
            quiet = self._ddp.no_sync() if self._ddp is not None and not last else nullcontext()
            with quiet:
                with section("forward"), runtime.autocast(self.cfg.precision, self.device):
                    logits = forward(xs)
                    scaled, summed = _weighted_loss(logits.float(), ys, y.numel(), weight)
                with section("backward"):
                    self.scaler.scale(scaled).backward()
            loss_sum += summed
            correct += (logits.argmax(1) == ys).sum()
        if self.cfg.clip_grad_norm:
            self.scaler.unscale_(opt)
            nn.utils.clip_grad_norm_([p for _, p in self._named], self.cfg.clip_grad_norm)
        if self._monitor is not None:
            self._monitor.after_backward()
        with section("optimizer step"):
            self.scaler.step(opt)
            self.scaler.update()
        return loss_sum, correct

    def _loss_weight(self, y: Tensor) -> Tensor | None:
        """With several ranks, what a summed loss is multiplied by: world / samples in the
        global batch (DDP averages over ranks), which takes uneven shares into account, an
        empty one included. None in one process."""
        if not distributed.active():
            return None
        n = distributed.all_reduce_sum(torch.tensor(float(y.numel()), device=y.device))
        return distributed.world_size() / n

    # -- epochs ----------------------------------------------------------------------------
    def _epoch(
        self,
        opt,
        forward,
        batches: Iterable[Batch],
        epoch: int,
        steps_per_epoch: int,
        total_epochs: int,
    ) -> dict:
        """One pass over the batches; times the wait for data separately from compute."""
        t0 = time.perf_counter()
        wait = loss_total = 0.0
        seen = steps = 0
        correct = 0
        lr = self.cfg.lr
        it = iter(batches)
        bar = progress(steps_per_epoch, f"epoch {epoch + 1}/{total_epochs}")
        while True:
            tw = time.perf_counter()
            try:
                with section("data"):
                    x, y = next(it)
            except StopIteration:
                break
            wait += time.perf_counter() - tw
            lr = cosine_lr(self.cfg.lr, epoch + steps / steps_per_epoch, total_epochs)
            loss_sum, hits = self.step(opt, forward, x, y, lr)
            loss_total += loss_sum
            correct += hits
            seen += y.numel()
            steps += 1
            bar.update()
        bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        took = time.perf_counter() - t0
        if distributed.active():  # the whole epoch's numbers, over every rank's share
            sums = torch.stack([torch.as_tensor(v).double().to(self.device)
                                for v in (loss_total, correct, seen)])  # fmt: skip
            loss_total, correct, seen = distributed.all_reduce_sum(sums).tolist()
            seen = int(seen)
        loss_total, correct = float(loss_total), int(correct)
        return {
            "lr": lr,
            "train_loss": loss_total / max(1, seen),
            "train_acc": correct / max(1, seen),
            "epoch_time_s": took,
            "samples_per_s": seen / took if took else 0.0,
            "data_wait_frac": wait / took if took else 0.0,
        }

    def fit(self, spec: TrainSpec) -> None:
        """Trains epochs [start, end) of ``spec.phase`` in one freezing state, resuming from
        self.state.epoch (the cosine schedule runs over ``cfg.epochs``).

        ``spec.forward`` is what trains (the model, or the suffix after the phase's position);
        ``spec.frozen``, when given, runs before it without a graph (FreezeOut's frozen prefix).
        With several ranks only ``forward`` is wrapped in DDP, so frozen parts never reach it."""
        state, position = spec.phase.state, spec.phase.position
        total_epochs = self.cfg.epochs
        self._monitor = spec.monitor
        if spec.monitor is not None and spec.monitor.stopped:
            return  # a resumed run whose monitor had already stopped it
        set_frozen(self.model, position if state != "full" else 0)
        frozen_bn = frozen_parts(self.model, position if state != "full" else 0)
        with self._parallel(spec.forward) as net:
            run = net if spec.frozen is None else _after_frozen(spec.frozen, net)
            opt = self.make_optimizer()
            for epoch in range(max(spec.phase.start, self.state.epoch), spec.phase.end):
                seed = runtime.derive_seed(*distributed.stream(self.seed, epoch, "global"))
                torch.manual_seed(seed)
                self.model.train()
                for part in frozen_bn:
                    part.eval()  # frozen BatchNorm keeps its running statistics
                with CudaPeak(self.device) as peak:
                    stats = self._epoch(
                        opt, run, spec.batches(epoch), epoch, spec.steps_per_epoch, total_epochs
                    )
                self._keep_momentum(opt)
                if isinstance(spec.forward, nn.Module):
                    distributed.sync_buffers(spec.forward)  # every rank evaluates and resumes alike
                row = {
                    "epoch": epoch + 1,
                    "state": state,
                    "position": position,
                    **stats,
                    **self._validate(spec),
                    "cuda_peak_mb": peak.peak_mb,
                }
                stop = spec.monitor is not None and spec.monitor.end_epoch(epoch + 1, self.state)
                self._end_epoch(row, total_epochs)
                if stop:
                    break

    @staticmethod
    def _validate(spec: TrainSpec) -> dict:
        with section("validation"):
            return spec.evaluate()

    def _end_epoch(self, row: dict, total_epochs: int) -> None:
        """Records an epoch: history, weights, log line, checkpoint (rank 0), callbacks."""
        self.state.history.append(row)
        self.state.epoch = row["epoch"]
        self.state.model = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        (log.info if distributed.is_main() else log.debug)(
            "epoch %d/%d %s@%d loss %.4f acc %.4f val_acc %.4f (%.1fs)",
            row["epoch"],
            total_epochs,
            row["state"],
            row["position"],
            row["train_loss"],
            row["train_acc"],
            row.get("val_acc", float("nan")),
            row["epoch_time_s"],
        )
        if self.checkpoint is not None and distributed.is_main():
            self.checkpoint.save(self.state)
        if self.on_epoch is not None:
            self.on_epoch(row)

    @contextlib.contextmanager
    def _parallel(self, forward: Callable[[Tensor], Tensor]) -> Iterator[Callable]:
        """``forward`` in DDP with several ranks (it must then be a module), with synced
        BatchNorm when configured; itself otherwise."""
        if not isinstance(forward, nn.Module):
            if distributed.active():
                raise FreezecacheError("with several processes, Trainer.fit needs a module")
            yield forward
            return
        with distributed.data_parallel(forward, sync_batchnorm=self.sync_batchnorm) as net:
            self._ddp = distributed.ddp_of(net)
            try:
                yield net
            finally:
                self._ddp = None


def _weighted_loss(
    logits: Tensor, ys: Tensor, batch: int, weight: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(loss to backward, summed loss to report) of one micro-batch of a batch of ``batch``.

    The gradients summed over micro-batches (and averaged over ranks by DDP) are the global
    batch's mean-loss gradient: one process scales each micro-batch's mean loss by its share;
    several ranks scale summed losses by ``weight`` (:meth:`Trainer._loss_weight`)."""
    if weight is None:
        loss = F.cross_entropy(logits, ys)
        return loss * (ys.numel() / batch), loss.detach() * ys.numel()
    loss = F.cross_entropy(logits, ys, reduction="sum")
    return loss * weight, loss.detach()


def _after_frozen(frozen: nn.Module, trained: Callable[[Tensor], Tensor]):
    """FreezeOut: the frozen prefix runs forward without building a graph."""

    def forward(x: Tensor) -> Tensor:
        with torch.no_grad():
            h = frozen(x)
        return trained(h)

    return forward


def progress(total: int, desc: str):
    """A tqdm bar in an interactive terminal; a no-op in CI and logs (one line per epoch)."""
    import sys

    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=not sys.stderr.isatty())


def evaluate(
    model: nn.Module,
    test: Images | Features,
    *,
    batch_size: int,
    precision: str,
    device,
    prefix: str = "test",
    shard: tuple[int, int] = (0, 1),
    per_sample: bool = False,
) -> dict:
    """Loss and accuracy on raw images through the whole model (prefix + suffix), or on a
    frozen prefix's features through the rest, as ``{prefix}_loss`` and ``{prefix}_acc``.

    ``shard=(rank, world)``: each rank evaluates its own share and the sums are reduced, so every
    sample counts once (every rank must call this). ``per_sample``: also ``{prefix}_correct``,
    whether each sample was classified right (bool numpy, every rank's share in order)."""
    loss, correct, hits = 0.0, 0, []
    part = test.shard(*shard)
    with runtime.eval_mode(model), torch.no_grad():
        for x, y in part.batches(batch_size):
            with runtime.autocast(precision, device):
                logits = model(x)
            loss += F.cross_entropy(logits.float(), y, reduction="sum").item()
            right = logits.argmax(1) == y
            correct += right.sum().item()
            if per_sample:
                hits.append(right.cpu())
    if shard[1] > 1:
        sums = distributed.all_reduce_sum(torch.tensor([loss, correct], dtype=torch.float64,
                                                       device=device))  # fmt: skip
        loss, correct = sums[0].item(), int(sums[1].item())
    n = len(test)
    out = {f"{prefix}_loss": loss / n, f"{prefix}_acc": correct / n}
    if per_sample:
        mine = torch.cat(hits).numpy() if hits else np.zeros(0, bool)
        out[f"{prefix}_correct"] = np.concatenate(distributed.gather_object(mine))
    return out
