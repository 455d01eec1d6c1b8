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
