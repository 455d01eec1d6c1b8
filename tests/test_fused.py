"""The fused CPU pass decodes and augments a packed batch exactly as the torch path does."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from freezecache.cache import fused, packed
from freezecache.codecs.registry import make_codec
from freezecache.training import augment

SHAPE = (6, 7, 9)


def relu(n, shape=SHAPE, seed=0, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    return F.relu(torch.randn(n, *shape, generator=g) * spread).numpy()


def blobs(codec, x, k=1):
    chunks = [x[i : i + k] for i in range(0, len(x), k)]
    return [codec.encode(c) for c in chunks], [len(c) for c in chunks]


@pytest.mark.parametrize("coding", ["zstd", "rans"])
@pytest.mark.parametrize("relative", [False, True])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("spread", [3.0, 400.0])  # 400: two-byte codes
def test_pack_then_decode_equals_the_codec(coding, relative, k, spread):
    codec = make_codec("quant", 0.1, relative=relative, coding=coding)
    x = relu(10, spread=spread)
    codec.calibrate(x) if relative else None
    if coding == "rans":
        codec.quantize(x[None])  # fits the tables
    bl, sizes = blobs(codec, x, k)
    part = packed.pack(codec, bl, sizes, SHAPE, SHAPE[0])
    lo_shape = codec.lo_shape((1, *SHAPE))[1:]
    got = packed.decode(part, SHAPE, lo_shape, packed.steps(codec, SHAPE), "cpu").numpy()
    want = np.concatenate([codec.decode(b, (n, *SHAPE)) for b, n in zip(bl, sizes, strict=True)])
    assert np.array_equal(got, want)


@pytest.mark.skipif(not fused.available(), reason="needs numba")
@pytest.mark.parametrize("mode", ["standard", "similarity"])
@pytest.mark.parametrize("spread", [3.0, 400.0])
def test_fused_pass_equals_decode_then_augment(mode, spread):
    codec = make_codec("quant", 0.05)
    x = relu(12, spread=spread)
    channels = np.array([4, 1])
    stored = relu(12, (2, *SHAPE[1:]), seed=1, spread=spread)
    xb, sizes = blobs(codec, x)
    eb, _ = blobs(codec, stored)
    xp = packed.pack(codec, xb, sizes, SHAPE, SHAPE[0])
    ep = packed.pack(codec, eb, sizes, (2, *SHAPE[1:]), 2)
    aug = augment.FeatureAug(mode, flip_p=0.5, crop_pad=2, noise_scale=0.3)
    g = torch.Generator().manual_seed(0)
    bank = augment.NoiseBank(int(np.prod(SHAPE)), g)
    draws = aug.draw(12, g, bank, int(np.prod(SHAPE)))
    assert draws.flip.any() and not draws.flip.all()
    step = packed.steps(codec, SHAPE)
    feats = packed.decode(xp, SHAPE, (SHAPE[0], 1, 1), step, "cpu")
    extra = packed.decode(ep, (2, *SHAPE[1:]), (2, 1, 1), step[channels], "cpu")
    want = augment.augment_features(
        feats, aug, draws, bank, extra=extra, where=torch.from_numpy(channels)
    )
    got = fused.decode_augment(
        xp, ep if mode == "similarity" else None, SHAPE, step, step[channels], channels, draws,
        aug.crop_pad, bank.values.numpy(), aug.noise_scale,
    )  # fmt: skip
    if mode == "standard":  # no stored channels: the torch path must not use them either
        want = augment.augment_features(feats, aug, draws, bank)
    assert np.array_equal(got, want.numpy())


@pytest.mark.skipif(not fused.available(), reason="needs numba")
def test_a_new_process_loads_the_compiled_kernel_from_the_disk_cache(tmp_path):
    """Compiling the parallel kernel takes seconds: every train_suffix process paid them
    again while the kernel was a closure numba could not cache (numba issue 6264)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "NUMBA_NUM_THREADS": "1"}

    def first_use() -> str:  # what fused.first_use_seconds reads: "<seconds> loaded|compiled"
        cmd = [sys.executable, "-m", "freezecache.cache.fused"]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout

    assert first_use().split()[-1] == "compiled"  # and written to the cache
    assert first_use().split()[-1] == "loaded"
    assert len(list(tmp_path.rglob("*.nbc"))) == 1  # one entry, not one per process
