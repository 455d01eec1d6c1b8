"""One place that sets the device, precision and seeds of a run."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
from collections.abc import Iterator
from types import TracebackType

import numpy as np
import torch

from freezecache.core.errors import FreezecacheError

log = logging.getLogger(__name__)

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    """`auto` means CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FreezecacheError(
            f"train.device = {name!r} but CUDA is not available — use 'auto' or 'cpu'"
        )
    try:
        return torch.device(name)
    except RuntimeError:
        raise FreezecacheError(
            f"train.device = {name!r} is not a device — use auto, cpu or cuda"
        ) from None


def set_threads(threads: int | None) -> None:
    """Intra-op threads; None keeps torch's default (all cores)."""
    if threads:
        torch.set_num_threads(threads)


def derive_seed(*parts: object) -> int:
    """A stable 31-bit seed from any parts (seed, epoch, purpose ...), the same in every process."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def seed_everything(seed: int) -> None:
    """Seeds python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def generator(*parts: object, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator seeded from `parts`: each epoch/purpose gets its own independent stream,
    so resuming at an epoch boundary replays exactly what an uninterrupted run would do."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(*parts))
    return g


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for bf16/fp16; a no-op for fp32."""
    dtype = _DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    if dtype is torch.float16 and device.type == "cpu":
        log.warning("fp16 autocast on CPU is slow and barely supported; bf16 is the CPU choice")
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """Dynamic loss scaling, enabled only for fp16 (bf16 has fp32's exponent range)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """Temporarily puts modules in eval mode, restoring each one's previous mode."""
    before = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, was in zip(modules, before, strict=True):
            m.train(was)


@contextlib.contextmanager
def train_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """Temporarily puts modules in training mode, restoring each one's previous mode."""
    before = [m.training for m in modules]
    for m in modules:
        m.train()
    try:
        yield
    finally:
        for m, was in zip(modules, before, strict=True):
            m.train(was)


def process_seconds() -> float:
    """Seconds since this process started (interpreter start-up and imports included): what a
    stage costs the user, not only its training loop."""
    import time

    import psutil

    return time.time() - psutil.Process().create_time()


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB): what the host really held."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


class CudaPeak:
    """Peak CUDA memory allocated inside a ``with`` block; ``peak_bytes`` is None off CUDA.

    Resets the allocator's peak statistic on entry, so an earlier peak does not leak in.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else _default_cuda_device()
        self.peak_bytes: int | None = None

    @property
    def enabled(self) -> bool:
        """Whether this block measures anything (a CUDA device that exists)."""
        return self.device is not None and self.device.type == "cuda" and torch.cuda.is_available()

    @property
    def peak_mb(self) -> float | None:
        """``peak_bytes`` in MiB (None off CUDA)."""
        return None if self.peak_bytes is None else self.peak_bytes / 2**20

    def __enter__(self) -> CudaPeak:
        if self.enabled:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.enabled:
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))


def _default_cuda_device() -> torch.device | None:
    """The current CUDA device, or None without CUDA."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
