"""The public names of ``import freezecache`` end to end on a tiny model: a cache built from a
torch Dataset, read back through a DataLoader with workers and a DistributedSampler over two
gloo ranks, the suffix trained from it; and each user error, as one line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import freezecache as fc

TOL = 0.05


def _data(n: int = 40, seed: int = 0) -> TensorDataset:
    """Normalised 1-channel 12x12 images whose label is their index (so a batch says which
    samples it holds)."""
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 12, 12, generator=g), torch.arange(n))


def _model(seed: int = 0) -> fc.load_model:
    torch.manual_seed(seed)
    return fc.load_model("resnet20", num_classes=40, in_chans=1, img_size=12).eval()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A cache of the prefix at block 3 over 40 images, with 4 stored flip-sensitive channels."""
    path = tmp_path_factory.mktemp("api") / "cache.h5"
    model = _model()
    prefix, _ = fc.split(model, 3)
    data = _data()
    summary = fc.build_cache(prefix, data, path, tolerance=TOL, flip_channels=4, batch_size=16)
    with torch.no_grad():
        exact = prefix(data.tensors[0])
        flipped = prefix(data.tensors[0].flip(-1))
    return path, model, summary, exact, flipped


def test_the_public_names_are_listed_typed_and_documented():
    assert fc.__all__[:7] == ["load_model", "blocks", "split", "build_cache", "CacheSummary",
                              "CachedFeatures", "FreezecacheError"]  # fmt: skip
    assert set(fc.__all__) == {*fc._PUBLIC, "__version__"}
    for name in fc.__all__[:-1]:
        obj = getattr(fc, name)
        assert obj.__doc__ and len(obj.__doc__) > 80, name
        if name not in ("CacheSummary", "FreezecacheError"):
            assert "Example::" in obj.__doc__, name
    from pathlib import Path

    assert (Path(fc.__file__).parent / "py.typed").is_file()


def test_importing_freezecache_loads_neither_torch_nor_the_library():
    code = "import sys, freezecache; print(sorted(m for m in sys.modules if m.startswith(('torch', 'freezecache.'))))"  # noqa: E501
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_split_and_blocks():
    model = _model()
    rows = fc.blocks(model)
    assert [r["position"] for r in rows] == list(range(model.num_blocks + 1))
    prefix, suffix = fc.split(model, 3)
    x = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        assert torch.allclose(suffix(prefix(x)), model(x), atol=1e-5)
        assert tuple(prefix(x).shape[1:]) == rows[3]["shape"]


def test_build_cache_describes_what_it_wrote(built):
    path, _, summary, exact, _ = built
    assert path.is_file() and not list(path.parent.glob(".*build*"))  # spool folder removed
    assert summary.samples == 40 and summary.shape == tuple(exact.shape[1:])
    assert summary.layout == "nchw" and summary.flip_channels == 4
    assert 0 < summary.ratio < 0.5 and summary.stored_bytes < summary.raw_bytes
    assert summary.max_abs_error <= TOL
    assert summary.ranking["kind"] == "cnn" and len(summary.ranking["scores"]) == exact.shape[1]


def test_cached_features_are_the_prefix_outputs_within_the_tolerance(built):
    path, model, _, exact, _ = built
    features = fc.CachedFeatures(path, prefix=fc.split(model, 3)[0])
    assert len(features) == 40
    x, y = features[7]
    assert y == 7 and x.shape == exact.shape[1:]
    assert float((x - exact[7]).abs().max()) <= TOL
    # the pipeline's batch path holds the same values (no augmentation: nothing drawn)
    got = torch.zeros_like(exact)
    for xb, yb in features.batches(16, seed=3):
        got[yb] = xb
    assert float((got - exact).abs().max()) <= TOL


@pytest.mark.slow  # numba compiles the fused decode-and-augment pass (about a minute on 2 cores)
def test_a_flipped_sample_gets_its_stored_channels_back(built):
    """flip_p=1: every sample is mirrored; the 4 stored channels are F(flip(x)) (the repair),
    the others flip(F(x)); without repair all are flip(F(x))."""
    path, _, summary, exact, flipped = built
    channels = torch.argsort(torch.tensor(summary.ranking["scores"]), stable=True)[:4]
    repaired = fc.CachedFeatures(path, flip_p=1.0)
    plain = fc.CachedFeatures(path, flip_p=1.0, repair=False)
    ids = [0, 5, 39]
    x = torch.stack([item[0] for item in repaired.__getitems__(ids)])
    want = exact[ids].flip(-1)
    want[:, channels] = flipped[ids][:, channels]
    assert float((x - want).abs().max()) <= TOL
    x = torch.stack([item[0] for item in plain.__getitems__(ids)])
    assert float((x - exact[ids].flip(-1)).abs().max()) <= TOL


@pytest.mark.slow  # the fused pass compiled, then two worker processes
def test_the_suffix_trains_from_a_dataloader_with_two_workers(built):
    path, model, _, exact, _ = built
    features = fc.CachedFeatures(path, flip_p=0.5, crop_pad=1, noise_std=0.05)
    list(features.batches(16))  # the parent ran the batch path (numba's threads) before forking
    loader = DataLoader(features, batch_size=8, shuffle=True, num_workers=2,
                        pin_memory=torch.cuda.is_available())  # fmt: skip
    prefix, suffix = fc.split(model, 3)
    prefix.requires_grad_(False)
    opt = torch.optim.SGD(suffix.parameters(), lr=0.05, momentum=0.9)
    seen, losses = [], []
    suffix.train()
    for _ in range(4):
        for x, y in loader:
            assert x.shape[1:] == exact.shape[1:] and x.dtype == torch.float32
            loss = F.cross_entropy(suffix(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += y.tolist()
            losses.append(loss.item())
    assert sorted(seen) == sorted(list(range(40)) * 4)  # every sample once per epoch
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    model.eval()  # then the whole model runs on raw images: suffix(prefix(x))
    with torch.no_grad():
        x, y = _data().tensors
        logits = suffix(prefix(x))
    assert logits.shape == (40, 40) and torch.isfinite(logits).all()


def _rank_reads(rank: int, world: int, port: int, path: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        features = fc.CachedFeatures(path)
        sampler = torch.utils.data.DistributedSampler(features, num_replicas=world, rank=rank,
                                                      shuffle=True, seed=1)  # fmt: skip
        sampler.set_epoch(0)
        xs, ys = [], []
        for x, y in DataLoader(features, batch_size=6, sampler=sampler):
            xs.append(x)
            ys.append(y)
        torch.save({"x": torch.cat(xs), "y": torch.cat(ys)}, f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two spawned processes, each importing torch
def test_two_gloo_ranks_share_the_samples_with_a_distributed_sampler(built, tmp_path):
    path, _, _, exact, _ = built
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_rank_reads, args=(2, port, str(path), str(tmp_path)), nprocs=2)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    ys = [p["y"].tolist() for p in parts]
    assert len(ys[0]) == len(ys[1]) == 20 and sorted(ys[0] + ys[1]) == list(range(40))
    for p in parts:
        assert float((p["x"] - exact[p["y"]]).abs().max()) <= TOL


# -- errors: the type and the one line -----------------------------------------------------------
def test_a_path_that_is_not_a_cache(tmp_path):
    with pytest.raises(fc.FreezecacheError, match=r"does not exist — build it with freezecache"):
        fc.CachedFeatures(tmp_path / "missing.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    unreadable = r"not a readable HDF5 file .* — build it with freezecache\.build_cache"
    with pytest.raises(fc.FreezecacheError, match=unreadable):
        fc.CachedFeatures(tmp_path / "text.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(fc.FreezecacheError, match=r"HDF5 file but not a freezecache cache"):
        fc.CachedFeatures(tmp_path / "other.h5")


def test_a_cache_of_another_prefix(built):
    path, _, _, _, _ = built
    other, _ = fc.split(_model(seed=1), 3)
    with pytest.raises(fc.FreezecacheError, match=r"built from prefix \w+ but .*\(other weights\)"):
        fc.CachedFeatures(path, prefix=other)


def test_a_block_out_of_range():
    with pytest.raises(fc.FreezecacheError, match=r"position 10 is outside model resnet20 — use"):
        fc.split(_model(), 10)


def test_a_model_that_is_not_block_sequential():
    plain = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.LazyLinear(10))
    for call in (lambda: fc.split(plain, 1), lambda: fc.blocks(plain)):
        with pytest.raises(fc.FreezecacheError, match=r"Sequential is not a block-sequential"):
            call()


@pytest.mark.parametrize("tolerance", [0, -0.1])
def test_a_tolerance_that_is_not_positive(tmp_path, tolerance):
    prefix, _ = fc.split(_model(), 2)
    with pytest.raises(fc.FreezecacheError, match=rf"tolerance={tolerance} must be > 0"):
        fc.build_cache(prefix, _data(8), tmp_path / "c.h5", tolerance=tolerance)
    assert not (tmp_path / "c.h5").exists()


def test_a_shuffling_dataloader_and_too_many_flip_channels(tmp_path):
    prefix, _ = fc.split(_model(), 2)
    shuffled = DataLoader(_data(8), batch_size=4, shuffle=True)
    with pytest.raises(fc.FreezecacheError, match="DataLoader shuffles"):
        fc.build_cache(prefix, shuffled, tmp_path / "c.h5")
    with pytest.raises(fc.FreezecacheError, match=r"flip_channels=99 but .* 16 channels"):
        fc.build_cache(prefix, _data(8), tmp_path / "c.h5", flip_channels=99)


def test_the_readme_api_reference_is_generated_from_the_docstrings():
    from conftest import ROOT
    from freezecache.reporting.report import README_MARK
    from freezecache.tooling.api_doc import reference

    text = (ROOT / "README.md").read_text()
    begin, end = (README_MARK.format(name="api", edge=e) for e in ("start", "end"))
    assert text.split(begin)[1].split(end)[0] == "\n" + reference(), "run `freezecache readme`"
    assert "#### `freezecache.build_cache(prefix: nn.Module, data, path" in reference()
