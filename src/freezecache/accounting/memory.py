"""Memory of freezing states, counted from tensors (the paper's Appendix A.1): parameters,
gradients, optimizer state, tensors saved for backward, the input batch and the frozen prefix's
largest intermediate, not the allocator's view, so it is the same on CPU and CUDA;
:class:`CudaPeak` gives the allocator's view where CUDA exists.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from freezecache.core.errors import FreezecacheError
from freezecache.models import segment_probe

MIB = 2**20
# Extra per-parameter state kept by each optimizer, in multiples of the trainable parameters.
OPTIMIZER_STATE_FACTOR = {"sgd": 0, "sgd_momentum": 1, "adam": 2, "adamw": 2}


def _unique_params(modules: Iterable[nn.Module | None]) -> list[nn.Parameter]:
    """Parameters of all given modules, each once (shared weights are one tensor)."""
    seen: dict[int, nn.Parameter] = {}
    for module in modules:
        if module is not None:
            for p in module.parameters():
                seen.setdefault(id(p), p)
    return list(seen.values())


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the given tensors' elements."""
    return sum(t.numel() * t.element_size() for t in tensors)


def _storage_ptrs(tensors: Iterable[torch.Tensor]) -> set[int]:
    """Data pointers of the storages behind the given tensors."""
    return {t.untyped_storage().data_ptr() for t in tensors}


def _tensors_in(value: Any) -> list[torch.Tensor]:
    """Tensors in a module output (a tensor, or a tuple/list/dict of them)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors_in(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors_in(v)]
    return []


@contextlib.contextmanager
def _buffers_restored(modules: Iterable[nn.Module | None]) -> Iterator[None]:
    """Undo buffer updates on exit: a measuring forward must not move BN running stats."""
    saved = [(b, b.detach().clone()) for m in modules if m is not None for b in m.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def _frozen_forward(frozen: nn.Module, example: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Run the frozen prefix without grad; return its output and its largest module output."""
    peak = 0

    def record(_module: nn.Module, _inputs: tuple, output: Any) -> None:
        nonlocal peak
        peak = max([peak, *(_nbytes([t]) for t in _tensors_in(output))])

    handles = [m.register_forward_hook(record) for m in frozen.modules()]
    try:
        with torch.no_grad():
            out = frozen(example)
    finally:
        for handle in handles:
            handle.remove()
    return out, peak


def _count_saved(run: Callable[[], object], excluded_ptrs: set[int]) -> int:
    """Bytes autograd saves for backward while ``run()`` runs, each storage once at full size.

    Storages in ``excluded_ptrs`` (parameters, buffers, inputs: counted elsewhere) are skipped.
    """
    # Holding the storages keeps their addresses from being reused by a later allocation.
    saved: dict[int, torch.UntypedStorage] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded_ptrs:
            saved[storage.data_ptr()] = storage
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(storage.nbytes() for storage in saved.values())


def _segment_saved_bytes(
    blocks: tuple[nn.Module, ...], x: torch.Tensor, excluded_ptrs: set[int]
) -> int:
    """What one checkpointed segment saves again when backward recomputes it.

    Checkpoint's own saved-tensor hooks hide these from an outer hook, so the segment is run a
    second time here under a hook of its own. Its input is left out: the checkpoint keeps it
    through the forward and the outer count already has it.
    """

    def run() -> None:
        h = x.detach().requires_grad_(x.requires_grad)
        for block in blocks:
            h = block(h)

    return _count_saved(run, excluded_ptrs | _storage_ptrs([x]))


def _saved_activation_bytes(
    trainable: nn.Module,
    inputs: torch.Tensor,
    excluded_ptrs: set[int],
    loss_fn: Callable[[torch.Tensor], torch.Tensor] | None,
) -> tuple[int, int]:
    """(kept, recompute_peak): bytes autograd keeps after one forward (and loss) of
    ``trainable``, and the largest checkpointed segment that backward rebuilds on top of them.

    Kept bytes include each checkpointed segment's input (non-reentrant checkpoint saves it
    through the ambient hooks); ``recompute_peak`` is 0 without checkpointing.
    """
    recompute_peak = 0

    def probe(blocks: tuple[nn.Module, ...], x: torch.Tensor) -> None:
        nonlocal recompute_peak
        recompute_peak = max(recompute_peak, _segment_saved_bytes(blocks, x, excluded_ptrs))

    def run() -> None:
        out = trainable(inputs)
        if loss_fn is not None:
            loss_fn(out)

    with segment_probe(probe):
        kept = _count_saved(run, excluded_ptrs)
    return kept, recompute_peak


def accounted_memory(
    trainable: nn.Module,
    example: torch.Tensor,
    *,
    frozen: nn.Module | None = None,
    optimizer: str = "sgd_momentum",
    loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Training memory, in bytes (and ``*_mb`` MiB), of one step on the batch ``example``.

    ``frozen`` is a prefix that still runs (no grad) before ``trainable``; leave it None when it
    was discarded and ``example`` is the cached activation. ``loss_fn(output)`` runs inside the
    count so what the loss saves counts too. Modules run in their current train/eval modes;
    buffers (BN running stats) are restored afterwards. ``total`` is the sum of the parts, an
    upper bound: the frozen prefix's intermediates are freed before the trainable part builds
    its graph. With grad checkpointing (segments run by ``freezecache.models``),
    ``saved_activations`` holds what the checkpoints keep (their inputs) and ``recompute_peak``
    the largest segment's activations, rebuilt in backward on top of them.
    """
    if optimizer not in OPTIMIZER_STATE_FACTOR:
        raise FreezecacheError(
            f"unknown optimizer {optimizer!r} — use one of {sorted(OPTIMIZER_STATE_FACTOR)}"
        )
    running = _unique_params([trainable, frozen])
    frozen_ids = {id(p) for p in _unique_params([frozen])}
    trained = [
        p for p in _unique_params([trainable]) if p.requires_grad and id(p) not in frozen_ids
    ]
    buffers = [b for m in (trainable, frozen) if m is not None for b in m.buffers()]
    excluded = _storage_ptrs([*running, *buffers, example])

    with _buffers_restored([trainable, frozen]):
        inputs, peak = (example, 0) if frozen is None else _frozen_forward(frozen, example)
        saved, recompute_peak = _saved_activation_bytes(trainable, inputs, excluded, loss_fn)
    grad_bytes = _nbytes(trained)
    counted = {
        "params": _nbytes(running),
        "grads": grad_bytes,
        "optimizer_state": OPTIMIZER_STATE_FACTOR[optimizer] * grad_bytes,
        "saved_activations": saved,
        "recompute_peak": recompute_peak,
        "input_batch": _nbytes([example]),
        "frozen_forward_peak": peak,
    }
    counted["total"] = sum(counted.values())
    return {**counted, **{f"{k}_mb": v / MIB for k, v in counted.items()}}


def average_and_min_memory(states: list[tuple[float, int]]) -> tuple[float, float]:
    """Average and minimum memory over a run, as the paper defines them.

    ``states`` are (memory, epochs) per freezing state in time order. Average weights each
    state by its epochs; minimum is the last state's memory (after the last freeze).
    """
    epochs = sum(e for _, e in states)
    if not states or epochs <= 0:
        raise FreezecacheError(
            f"memory states {states!r} span no epochs — give (memory, epochs) with epochs > 0"
        )
    average = sum(m * e for m, e in states) / epochs
    return average, states[-1][0]
