"""Data parallelism on torchrun: the process group, who writes, how batches are shared, DDP.

Every function here is a no-op (or the identity) in a single process, so the training code reads
the same with one rank or many and a one-process run is exactly what it was before. A process
joins a group only when torchrun started it with ``WORLD_SIZE`` > 1 (:func:`setup`).

What the ranks share and what each owns:

- One global batch of ``train.batch_size`` samples (or ``batch_size // chunk_size`` cache chunks)
  per step, cut into near-equal contiguous shares (:func:`share`); each rank weights its loss by
  its share, so the averaged gradient is the global batch's mean gradient whatever the rank count.
- The permutation of an epoch is the same on every rank; augmentation draws are per rank
  (:func:`stream` adds the rank to a random stream's parts when there is more than one).
- DDP wraps only the module that trains (:func:`data_parallel`); frozen or discarded parts stay
  outside it. BatchNorm statistics are rank 0's after every epoch (:func:`sync_buffers`), or
  global batch statistics throughout with ``sync_batchnorm`` (:func:`synced_batchnorm`).
- Rank 0 writes every output and checkpoint; all ranks take part in the reductions.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
import types
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from freezecache.core.errors import FreezecacheError

log = logging.getLogger(__name__)


# -- the process group --------------------------------------------------------------------------
def launched_world_size() -> int:
    """The number of processes torchrun started this one among (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def active() -> bool:
    """Whether this process is one rank of several in a joined process group."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if active() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if active() else 1


def local_world_size() -> int:
    """Processes of this job on this host (torchrun's ``LOCAL_WORLD_SIZE``; 1 outside it)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if active() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes outputs, checkpoints and logs."""
    return rank() == 0


def setup(backend: str, device: torch.device) -> torch.device:
    """Joins the process group torchrun describes (once per process) and returns this rank's
    device: ``cuda:LOCAL_RANK`` on CUDA. Outside torchrun, or with one process, returns
    ``device`` unchanged and joins nothing.

    ``backend``: ``auto`` (nccl on CUDA, gloo on CPU), ``nccl`` or ``gloo``.
    """
    import torch.distributed as dist

    if launched_world_size() <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise FreezecacheError(
            "distributed.backend = 'nccl' needs CUDA devices — use 'auto' or 'gloo' on CPU"
        )
    if not dist.is_initialized():
        # Long enough for rank 0 to build a big cache alone while the others wait (the cache
        # stage, until each rank builds its share); a dead rank is caught by torchrun sooner.
        timeout = datetime.timedelta(hours=2)
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
        # torchrun's agent keeps one store across restarts, and a restarted worker could read
        # the dead workers' addresses from it: each attempt gets its own keys.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            backend=backend,
            store=dist.PrefixStore(f"freezecache/attempt{attempt}", store),
            rank=rank,
            world_size=world,
            device_id=device if backend == "nccl" else None,
            timeout=timeout,
        )
        atexit.register(_leave)
        log.info(
            "rank %d of %d on %s (%s)", dist.get_rank(), dist.get_world_size(), device, backend
        )
    return device


def _leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


# -- collectives (identity in one process) ------------------------------------------------------
def all_reduce_sum(t: Tensor) -> Tensor:
    """``t`` summed over ranks, in place (``t`` itself in one process)."""
    import torch.distributed as dist

    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s ``obj`` on every rank (picklable objects: run states, rankings)."""
    import torch.distributed as dist

    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_object(obj: object) -> list:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in one process)."""
    import torch.distributed as dist

    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    import torch.distributed as dist

    if active():
        dist.barrier()


# -- sharing the work ----------------------------------------------------------------------------
def share(n: int, rank: int, world: int) -> slice:
    """This rank's contiguous share of ``n`` items: sizes differ by at most one, the larger
    shares go to the lower ranks (so rank 0 has an item whenever there is one)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def stream(*parts: object) -> tuple[object, ...]:
    """Parts of a random stream, this rank's own when there are several ranks (augmentation
    draws must differ across ranks). One process: ``parts`` unchanged, as before."""
    return parts if world_size() == 1 else (*parts, "rank", rank())


def check_batch(units: int, what: str) -> None:
    """A global batch of ``units`` (samples or chunks) must give every rank one."""
    if units < world_size():
        raise FreezecacheError(
            f"a global batch of {units} {what} cannot be shared by {world_size()} processes — "
            f"raise train.batch_size or lower distributed.nproc_per_node"
        )


# -- DDP around what trains ----------------------------------------------------------------------
@contextlib.contextmanager
def data_parallel(module: nn.Module, *, sync_batchnorm: bool = False) -> Iterator[nn.Module]:
    """``module`` (the trainable part) in DistributedDataParallel while the block runs; itself
    in one process. Set ``requires_grad`` before entering: DDP hooks only the parameters that
    train then. With ``sync_batchnorm`` its BatchNorm layers use global batch statistics
    (:func:`synced_batchnorm`, in one process too: the same arithmetic for any rank count)."""
    with synced_batchnorm(module) if sync_batchnorm else contextlib.nullcontext():
        if not active():
            yield module
            return
        from torch.nn.parallel import DistributedDataParallel

        param = next((p for p in module.parameters() if p.requires_grad), None)
        if param is None:
            raise FreezecacheError("nothing trains in this freezing state — check freeze.points")
        device_ids = [param.device] if param.device.type == "cuda" else None
        # Buffers are synced once per epoch (sync_buffers), not broadcast at every forward.
        ddp = DistributedDataParallel(module, device_ids=device_ids, forward_sync_buffers=False)
        try:
            yield ddp
        finally:
            # A later phase wraps some of the same parameters again: this wrapper's gradient
            # hooks must be gone by then.
            del ddp
            import gc

            gc.collect()


def sync_buffers(module: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank."""
    import torch.distributed as dist

    if not active():
        return
    for buf in module.buffers():
        dist.broadcast(buf, src=0)


def ddp_of(module: nn.Module) -> nn.Module | None:
    """The DDP wrapper itself, when ``module`` is one (for ``no_sync``)."""
    from torch.nn.parallel import DistributedDataParallel

    return module if isinstance(module, DistributedDataParallel) else None


@contextlib.contextmanager
def synced_batchnorm(module: nn.Module) -> Iterator[None]:
    """Every BatchNorm layer of ``module`` normalizes with the statistics of the global batch
    (all ranks) in training mode, while the block runs.

    torch's ``nn.SyncBatchNorm`` refuses CPU tensors, so this one works on any device: each
    layer all-reduces per-channel sums (autograd carries the reduction into backward). The
    layers keep their parameters and buffers; only their forward is replaced, then restored.
    In one process it computes the same formula without the reduction, so a one-process run
    with ``sync_batchnorm`` is what a several-process run matches up to summation order (torch's
    own CPU BatchNorm kernel differs from the exact result by more than that).
    """
    layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in layers:
        m.forward = types.MethodType(_synced_forward, m)
    try:
        yield
    finally:
        for m in layers:
            del m.forward


def _synced_forward(self: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    """BatchNorm over the global batch (training mode); the layer's own forward otherwise.

    Two passes, as torch's kernels do (sum of squares minus squared sum loses the variance of a
    nearly constant channel in fp32): the global mean, then the global sum of squared
    deviations from it. Each pass is one all-reduce of (C,) sums, and so is its backward."""
    if not self.training:
        return type(self).forward(self, x)
    c = x.shape[1]
    dims = [0, *range(2, x.dim())]
    shape = (1, c, *([1] * (x.dim() - 2)))
    counted = _sum_ranks(torch.cat([x.sum(dims), x.new_full((1,), x.numel() // max(c, 1))]))
    n = counted[-1]  # samples x positions per channel, over every rank
    mean = counted[:c] / n
    dev = x - mean.view(shape)
    var = _sum_ranks((dev * dev).sum(dims)) / n
    if self.track_running_stats:
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = (
                self.momentum
                if self.momentum is not None
                else 1.0 / float(self.num_batches_tracked)
            )
            unbiased = var * n / (n - 1).clamp_min(1)
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(unbiased.detach(), alpha=m)
    y = dev * torch.rsqrt(var.view(shape) + self.eps)
    if self.affine:
        y = y * self.weight.view(shape) + self.bias.view(shape)
    return y


def _sum_ranks(t: Tensor) -> Tensor:
    """``t`` summed over ranks, differentiably."""
    return _SumRanks.apply(t) if active() else t


class _SumRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward is the all-reduce of the gradient: every rank's output
    depends on every rank's input."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        return all_reduce_sum(t.clone())

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return all_reduce_sum(grad.clone())
