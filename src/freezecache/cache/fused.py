"""Decode and augment a batch of cached NCHW maps in one pass on the CPU.

Reading the codes of a packed batch (:mod:`freezecache.cache.packed`), a byte per value, the
kernel writes each augmented float32 value once: flip (the stored flip-sensitive channels
instead of the flipped ones, "Discard & Aug."), crop with zero padding, dequantisation
``q * step + lo`` and noise from the bank, for every sample in parallel. It computes exactly
what :func:`freezecache.codecs.planes.dequantize` followed by
:func:`freezecache.training.augment.augment_features` compute (a test compares them bit for bit):
those
run on a training device, this runs where the training device is the CPU and torch would make
a float32 copy of the batch per step of the augmentation.

numba is optional: :func:`available` says whether the kernel can run (the torch path then does
the work).
"""

from __future__ import annotations

import functools
import logging
import subprocess
import sys
import time

import numpy as np

from freezecache.core.errors import first_line

log = logging.getLogger(__name__)


@functools.cache
def _kernel():
    """The compiled kernel (:mod:`freezecache.cache.fused_kernel`; imports numba)."""
    from freezecache.cache import fused_kernel

    return fused_kernel.decode_augment


@functools.cache
def available() -> bool:
    """Whether numba is importable here (else the torch path decodes and augments)."""
    try:
        import numba  # noqa: F401
    except Exception as err:  # noqa: BLE001 (missing or broken: the torch path works anyway)
        log.warning(
            "numba is not usable (%s): cached batches decode and augment through torch on the "
            "CPU (slower; pip install numba for the fused pass)", first_line(err)
        )  # fmt: skip
        return False
    return True


def decode_augment(
    x: dict,
    extra: dict | None,
    shape: tuple[int, int, int],
    step: np.ndarray,
    extra_step: np.ndarray | None,
    channels: np.ndarray | None,
    draws,
    pad: int,
    bank: np.ndarray | None,
    scale: float,
) -> np.ndarray:
    """The augmented float32 batch (B, C, H, W) of packed ``x`` (and its stored channels)."""
    b = len(x["at"])
    c_n = shape[0]
    slot = np.full(c_n, -1, np.int64)
    if extra is not None and channels is not None:
        slot[np.asarray(channels, np.int64)] = np.arange(len(channels))
    else:
        extra = {k: np.zeros(b, np.int64) for k in ("at", "stride", "width")}
        extra["buf"] = np.zeros(1, np.uint8)
        extra["lo"], extra_step = np.zeros((b, 1), np.float32), np.zeros(1, np.float32)
    flip = draws.flip.numpy()
    crop = draws.crop.numpy() if draws.crop is not None else np.full((b, 2), pad, np.int64)
    use_noise = draws.noise_at is not None and bank is not None and scale != 0
    noise_at = draws.noise_at.numpy() if use_noise else np.zeros(b, np.int64)
    values = bank if use_noise else np.zeros(1, np.float32)
    out = np.empty((b, *shape), np.float32)
    _kernel()(
        x["buf"], x["at"], x["stride"], x["width"], x["lo"], step,
        extra["buf"], extra["at"], extra["stride"], extra["width"], extra["lo"], extra_step, slot,
        flip, crop, pad, noise_at, values, np.float32(scale if use_noise else 0.0), out,
    )  # fmt: skip
    return out


def _first_use() -> tuple[float, bool]:
    """A small batch through the fused pass, in this process: the seconds from numba's import
    to the result, and whether the kernel was compiled here (not found in numba's disk cache)."""
    import torch

    from freezecache.cache import packed
    from freezecache.codecs.registry import make_codec
    from freezecache.training.augment import FeatureAug, NoiseBank

    shape = (4, 6, 6)
    x = torch.rand((8, *shape), generator=torch.Generator().manual_seed(0)).numpy()
    codec = make_codec("quant", 0.05)
    blobs = [codec.encode(x[i : i + 1]) for i in range(len(x))]
    batch = packed.pack(codec, blobs, [1] * len(x), shape, shape[0])
    aug = FeatureAug("standard", flip_p=0.5, crop_pad=1, noise_scale=0.1)
    g = torch.Generator().manual_seed(0)
    bank = NoiseBank(int(np.prod(shape)), g)
    draws = aug.draw(len(x), g, bank, int(np.prod(shape)))
    step = packed.steps(codec, shape)
    start = time.perf_counter()
    available()
    decode_augment(batch, None, shape, step, None, None, draws, 1, bank.values.numpy(), 0.1)
    return time.perf_counter() - start, sum(_kernel().stats.cache_misses.values()) > 0


def first_use_seconds() -> float:
    """What a new process pays for its first fused pass: numba's import and the kernel loaded
    from numba's disk cache (measured in a new process; one that had to compile the kernel
    first, and cache it, is measured again)."""
    cmd = [sys.executable, "-m", "freezecache.cache.fused"]
    for _ in range(2):
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        seconds, how = done.stdout.split()[-2:]
        if how == "loaded":
            break
    return float(seconds)


if __name__ == "__main__":  # what first_use_seconds runs: "<seconds> loaded|compiled"
    took, compiled = _first_use()
    print(f"{took:.4f} {'compiled' if compiled else 'loaded'}")
