"""Cache faults: tampered bytes, identical rebuilds, full disks and builds killed mid-way."""

from __future__ import annotations

import errno
import filecmp
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from freezecache.cache import assemble, spool
from freezecache.cache.assemble import assemble_cache
from freezecache.cache.format import ROOT_ATTRS, Layout, open_cache
from freezecache.cache.reader import CacheDataset, collate_chunks
from freezecache.cache.size import H5_OVERHEAD, estimate_cache_bytes
from freezecache.cache.writer import Build, CacheWriter
from freezecache.codecs import Codec
from freezecache.codecs.quant import QuantCodec
from freezecache.codecs.registry import calibrate, make_codec
from freezecache.core import disk
from freezecache.core.errors import FreezecacheError

SHAPE = (4, 6, 6)
HASH = "a1b2c3d4e5f60718293a"
ROOT = Path(__file__).resolve().parents[1]


def activations(n: int, shape=SHAPE, seed: int = 0) -> np.ndarray:
    """Non-negative, partly zero maps like ReLU outputs."""
    x = np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)
    return np.maximum(x, 0)


def data(n: int = 20) -> dict:
    """Samples with every optional part: extra channels, channel indices and token positions."""
    rng = np.random.default_rng(1)
    return {
        "x": activations(n),
        "y": np.arange(n) % 10,
        "extra": activations(n, (2, 6, 6), seed=2),
        "pos": np.stack([rng.permutation(9)[:3] for _ in range(n)]).astype(np.int32),
    }


def build(
    path: Path,
    d: dict,
    *,
    batch: int = 7,
    workers: int = 2,
    codec: str | Codec = "quant",
    chunk_size: int = 3,
    stop_after: int | None = None,
    **kw,
) -> CacheWriter:
    """Write ``d`` from ``writer.resume_from`` to the writer's range end; ``stop_after``
    samples: leave the writer as a SIGKILL would (committed spool on disk, nothing closed)."""
    n = len(d["x"])
    extra_index = kw.pop("extra_index", [3, 1] if "extra" in d else ())
    writer = CacheWriter(
        path,
        make_codec(codec, 1e-2) if isinstance(codec, str) else codec,
        Layout(
            sample_shape=d["x"].shape[1:],
            num_samples=n,
            chunk_size=chunk_size,
            extra_shape=d["extra"].shape[1:] if "extra" in d else None,
            extra_index=tuple(extra_index or ()),
        ),
        prefix_hash=HASH,
        meta={"point": 1},
        build=Build(workers=workers, **kw),
    )
    try:
        for lo in range(writer.resume_from, writer.range_end, batch):
            part = slice(lo, min(lo + batch, writer.range_end))
            writer.add(
                d["x"][part],
                d["y"][part],
                extra=d["extra"][part] if "extra" in d else None,
                extra_pos=d["pos"][part] if "pos" in d else None,
            )
            if stop_after is not None and lo + batch >= stop_after:
                crash(writer)
                return writer
        writer.close()
    except BaseException:
        writer._abort()  # what the writer's with block does
        raise
    return writer


def crash(writer: CacheWriter) -> None:
    """What a SIGKILL leaves: the committed spool; the writer's lock released by the OS."""
    writer._spool.commit()
    writer._shutdown()
    writer._spool.close()
    writer._closed = True


def read_all(path: Path) -> dict:
    """Every field training reads, through the real reader (checks everything on the way)."""
    info = open_cache(path, full=True)
    dataset = CacheDataset(path, info, in_memory=True)
    items = collate_chunks([dataset[i] for i in range(len(dataset))])
    return {**items, "info": (info.extra_index, info.sample_shape, info.meta, info.codec_name)}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and text, text
    return text


@pytest.fixture
def full_cache(tmp_path) -> Path:
    path = tmp_path / "c.h5"
    build(path, data())
    return path


# -- deterministic bytes ---------------------------------------------------------------------------
@pytest.mark.parametrize("codec", ["quant", "zfp"])
def test_same_inputs_give_byte_identical_files(tmp_path, codec):
    d = data(23)  # a short last chunk
    paths = [tmp_path / f"{i}.h5" for i in range(4)]
    build(paths[0], d, codec=codec, workers=2, batch=7)
    time.sleep(1.1)  # HDF5 timestamps have a one-second grain
    build(paths[1], d, codec=codec, workers=2, batch=7)
    build(paths[2], d, codec=codec, workers=0, batch=4)
    build(paths[3], d, codec=codec, workers=2, batch=23, commit_s=0.0)
    for p in paths[1:]:
        assert filecmp.cmp(paths[0], p, shallow=False), p.name
    with h5py.File(paths[0]) as f:
        assert not any(f[n].id.get_create_plist().get_obj_track_times() for n in f)
        assert "encode_s" not in f.attrs["stats"] and "mb_s" not in f.attrs["stats"]


def test_close_returns_the_timings_the_file_leaves_out(full_cache, tmp_path):
    writer = build(tmp_path / "d.h5", data())
    stats, info = writer.close(), open_cache(full_cache)
    assert {k: stats[k] for k in info.stats} == info.stats
    assert stats["encode_s"] > 0 and stats["encode_mb_s"] > 0 and stats["assemble_s"] > 0
    assert stats["resumed_samples"] == 0


# -- every byte training reads is verified ---------------------------------------------------------
def _dataset_span(path: Path, name: str) -> tuple[int, int]:
    with h5py.File(path) as f:
        return f[name].id.get_offset(), f[name].id.get_storage_size()


def test_random_bytes_in_labels_are_refused(full_cache):
    at, size = _dataset_span(full_cache, "y")
    with open(full_cache, "r+b") as f:
        f.seek(at + size // 2 - 4)
        f.write(np.random.default_rng(7).bytes(8))
    with pytest.raises(FreezecacheError) as err:
        open_cache(full_cache, stage="cache_p1")
    assert "dataset 'y' does not match its digest" in one_line(err)
    assert "dvc repro cache_p1" in str(err.value)


@pytest.mark.parametrize(
    "name", ["x", "extra", "y", "x_offsets", "crc", "extra_offsets", "extra_crc", "extra_pos"]
)
def test_corrupt_bytes_in_each_dataset_are_refused(full_cache, name):
    at, size = _dataset_span(full_cache, name)
    with open(full_cache, "r+b") as f:
        f.seek(at + size // 2)
        byte = f.read(1)[0]
        f.seek(at + size // 2)
        f.write(bytes([byte ^ 0x10]))
    if name in ("x", "extra"):  # blobs: crc-checked when read, or all at once with full=True
        info = open_cache(full_cache)
        with pytest.raises(FreezecacheError, match=f"of '{name}' is corrupt") as err:
            CacheDataset(full_cache, info, in_memory=True)
        one_line(err)
        with pytest.raises(FreezecacheError, match=f"of '{name}' is corrupt") as err:
            open_cache(full_cache, full=True)
    else:
        with pytest.raises(FreezecacheError, match=f"'{name}' does not match its digest") as err:
            open_cache(full_cache)
    assert str(full_cache) in one_line(err)


def _attr_value_at(raw: bytes, name: str, value) -> int:
    """File offset of the middle of attribute ``name``'s value bytes: numbers follow the name in
    the object header, strings live in HDF5's global heap."""
    if isinstance(value, str):
        data = value.encode()
        assert raw.count(data) == 1, name
        return raw.index(data) + len(data) // 2
    data = np.asarray(value).tobytes()
    start = raw.index(name.encode() + b"\0")
    at = raw.index(data, start + len(name))
    assert at - start < 256, name
    return at + len(data) // 2


ATTRS = [*ROOT_ATTRS, "digests", "complete", "attrs_digest"]


@pytest.mark.parametrize("name", ATTRS)
def test_corrupt_bytes_in_each_attribute_are_refused(full_cache, name):
    with h5py.File(full_cache) as f:
        value = f.attrs[name]
    raw = bytearray(full_cache.read_bytes())
    raw[_attr_value_at(bytes(raw), name, value)] ^= 0x01
    full_cache.write_bytes(bytes(raw))
    with pytest.raises(FreezecacheError) as err:
        open_cache(full_cache)
    assert str(full_cache) in one_line(err)


def _other(value):
    """A different value of the same type."""
    if isinstance(value, str):
        return value[:-1] + ("0" if value[-1] != "0" else "1")
    a = np.asarray(value)
    return (a + 1).astype(a.dtype) if a.ndim else a.dtype.type(a + 1)


@pytest.mark.parametrize("name", ATTRS)
def test_edited_attributes_are_refused(full_cache, name):
    with h5py.File(full_cache, "r+") as f:
        f.attrs[name] = _other(f.attrs[name])
    with pytest.raises(FreezecacheError) as err:
        open_cache(full_cache)
    assert str(full_cache) in one_line(err)


def test_random_byte_flips_never_pass_silently(full_cache, tmp_path):
    # Anywhere in the file, metadata included: a flip is refused in one line or changes nothing.
    reference = read_all(full_cache)
    raw = full_cache.read_bytes()
    rng = np.random.default_rng(3)
    damaged = tmp_path / "damaged.h5"
    refused = 0
    for at in rng.choice(len(raw), size=300, replace=False):
        flipped = bytearray(raw)
        flipped[at] ^= 1 << int(rng.integers(8))
        damaged.write_bytes(bytes(flipped))
        try:
            got = read_all(damaged)
        except FreezecacheError as err:
            assert "\n" not in str(err)
            refused += 1
            continue
        assert same(got, reference), f"byte {at} changed what training reads"
    assert refused > 100  # most bytes matter


def test_reader_rechecks_the_index_it_loads(full_cache):
    info = open_cache(full_cache)
    with h5py.File(full_cache, "r+") as f:
        f["y"][0] = 9 - f["y"][0]  # after open_cache: a worker still notices
    with pytest.raises(FreezecacheError, match="'y' does not match its digest"):
        CacheDataset(full_cache, info)[0]


# -- disk space ------------------------------------------------------------------------------------
@pytest.mark.parametrize("codec", ["quant", "zfp"])
def test_estimate_is_close_to_the_file_size(tmp_path, codec):
    d = {k: np.concatenate([v] * 20) for k, v in data(30).items()}  # 600 samples
    est = estimate_cache_bytes(
        make_codec(codec, 1e-2), d["x"][:64], 600, d["extra"][:64], chunk_size=3, pos_width=3
    )
    path = tmp_path / "c.h5"
    build(path, d, codec=codec, batch=50)
    size = path.stat().st_size
    assert size <= est and est - size <= H5_OVERHEAD + 0.1 * size


def test_too_little_space_is_refused_before_writing(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda p: usage._replace(free=5000))
    with pytest.raises(FreezecacheError, match=r"needs about .* which has 5\.0 KB free") as err:
        build(tmp_path / "c.h5", data())
    one_line(err)
    assert list(tmp_path.iterdir()) == []


def test_check_free_space_adds_needs_on_one_filesystem(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    disk.check_free_space({tmp_path / "a": 400, tmp_path / "b": 400}, what="x", margin=0.2)
    with pytest.raises(FreezecacheError, match=r"needs about 1\.1 KB"):
        disk.check_free_space({tmp_path / "a": 450, tmp_path / "b": 450}, what="x", margin=0.2)


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _fail_on_call(n: int, real):
    """``real``, except that call number ``n`` raises ENOSPC."""
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            _enospc()
        return real(*args, **kwargs)

    return wrapper


def _h5py_style(*_args, **_kwargs):
    raise RuntimeError(
        "Can't decrement id ref count (file write failed: time = Tue Dec  1 2026, errno = 28, "
        "error message = 'No space left on device')"
    )


INJECTIONS = {
    "spool blob write": lambda m: m.setattr(
        spool.Spool, "append", _fail_on_call(5, spool.Spool.append)
    ),
    # os.fsync calls: 1-3 open the spool, 4 the finished file, 5 its directory after the rename
    "spool open": lambda m: m.setattr(os, "fsync", _fail_on_call(1, os.fsync)),
    "file fsync": lambda m: m.setattr(os, "fsync", _fail_on_call(4, os.fsync)),
    "directory fsync": lambda m: m.setattr(os, "fsync", _fail_on_call(5, os.fsync)),
    "encoder thread": lambda m: m.setattr(
        QuantCodec, "compress", _fail_on_call(12, QuantCodec.compress)
    ),
    "file reservation": lambda m: m.setattr(assemble.os, "posix_fallocate", _enospc),
    "hdf5 write": lambda m: m.setattr(assemble, "_write_skeleton", _h5py_style),
    "blob copy": lambda m: m.setattr(assemble, "_copy_blobs", _enospc),
}


@pytest.mark.parametrize("where", sorted(INJECTIONS))
def test_enospc_anywhere_stops_cleanly_and_a_rerun_succeeds(tmp_path, monkeypatch, where):
    reference = tmp_path / "ref.h5"
    build(reference, data())
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        INJECTIONS[where](m)
        with pytest.raises(FreezecacheError, match="the disk filled up") as err:
            build(out / "c.h5", data(), commit_s=0.0)
    assert "nothing was published — free space and rerun" in one_line(err)
    assert list(out.iterdir()) == []  # no .tmp, no spool, no cache
    build(out / "c.h5", data())
    assert filecmp.cmp(reference, out / "c.h5", shallow=False)


@pytest.mark.parametrize(
    ("target", "name", "call", "kept"),
    [
        # one commit per batch of 6 (workers=0, commit_s=0): 5 commits before chunk 12
        (spool.Spool, "append", 12, 30),
        # os.fsync: 3 to open the spool, then 3 per commit (x, extra, journal): 3 commits
        (os, "fsync", 13, 18),
    ],
)
def test_enospc_in_a_resumable_build_keeps_the_committed_chunks(
    tmp_path, monkeypatch, target, name, call, kept
):
    reference = tmp_path / "ref.h5"
    build(reference, data(60), batch=6)
    kw = {"spool_dir": tmp_path / "ckpt", "resume_key": "k", "align": 6, "commit_s": 0.0}
    with monkeypatch.context() as m:
        m.setattr(target, name, _fail_on_call(call, getattr(target, name)))
        with pytest.raises(FreezecacheError, match=rf"{kept} of 60 samples stay in .*ckpt"):
            build(tmp_path / "c.h5", data(60), batch=6, workers=0, **kw)
    writer = build(tmp_path / "c.h5", data(60), batch=6, **kw)
    assert writer.resume_from == kept
    assert writer.close()["resumed_samples"] == kept
    assert filecmp.cmp(reference, tmp_path / "c.h5", shallow=False)
    assert not (tmp_path / "ckpt").exists()  # removed once the file is published


CHILD = textwrap.dedent(
    """
    import signal, sys
    from pathlib import Path
    import numpy as np
    from freezecache.cache import Build, CacheWriter, Layout
    from freezecache.codecs.registry import make_codec
    from freezecache.core.errors import FreezecacheError

    out, spool_dir, n, check = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
    rng = np.random.default_rng(0)
    x = np.maximum(rng.standard_normal((n, 8, 14, 14)).astype(np.float32), 0)
    y = np.arange(n) % 10
    batch = 50
    try:
        with CacheWriter(
            out,
            make_codec("quant", 1e-2),
            Layout(sample_shape=x.shape[1:], num_samples=n, chunk_size=2),
            prefix_hash="h",
            build=Build(
                workers=2,
                spool_dir=None if spool_dir == "-" else Path(spool_dir),
                resume_key=None if spool_dir == "-" else "key",
                align=batch,
                check_space=check == "check",
                commit_s=0.0,
            ),
        ) as writer:
            print("resume_from", writer.resume_from, flush=True)
            for lo in range(writer.resume_from, n, batch):
                writer.add(x[lo : lo + batch], y[lo : lo + batch])
                print("added", lo + batch, flush=True)
        print("done", writer.stats["resumed_samples"], flush=True)
    except FreezecacheError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    """
)


def child(tmp_path: Path, *args: str, **kw) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(script), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kw,
    )


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


@pytest.fixture
def small_fs(tmp_path):
    """A 3 MB tmpfs (root only); skipped where mounting is refused."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)],
                          capture_output=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"mount refused: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_full_tmpfs_gives_one_line_and_leaves_nothing(tmp_path, small_fs):
    # 4000 samples of 8x14x14: about 4 MB of spool and 4 MB of file for a 3 MB filesystem.
    code, _, err = finish(child(tmp_path, small_fs / "c.h5", "-", 4000, "check"))
    assert code == 2 and err.count("\n") == 1 and "which has 3.1 MB free" in err, err
    code, _, err = finish(child(tmp_path, small_fs / "c.h5", "-", 4000, "nocheck"))
    assert code == 2 and err.count("\n") == 1, err  # no traceback, no segfault (-11)
    assert "the disk filled up during the build" in err and "nothing was published" in err
    assert os.listdir(small_fs) == []


def test_full_tmpfs_then_more_space_resumes_to_the_same_file(tmp_path, small_fs):
    code, _, _ = finish(child(tmp_path, tmp_path / "ref.h5", "-", 3000, "check"))
    assert code == 0
    ckpt = tmp_path / "ckpt"  # the spool on a roomy filesystem, the cache on the small one
    code, _, err = finish(child(tmp_path, small_fs / "c.h5", ckpt, 3000, "nocheck"))
    assert code == 2 and err.count("\n") == 1 and "3000 of 3000 samples stay in" in err, err
    assert os.listdir(small_fs) == []
    subprocess.run(["mount", "-o", "remount,size=20m", str(small_fs)], check=True)
    code, out, err = finish(child(tmp_path, small_fs / "c.h5", ckpt, 3000, "check"))
    assert code == 0 and "resume_from 3000" in out, err
    assert filecmp.cmp(tmp_path / "ref.h5", small_fs / "c.h5", shallow=False)


def test_a_state_file_that_fills_the_disk_keeps_the_old_one_and_says_so(small_fs):
    from freezecache.core.io import atomic_write_bytes

    target = small_fs / "state.pt"
    atomic_write_bytes(target, b"old state")
    with pytest.raises(FreezecacheError) as err:
        atomic_write_bytes(target, bytes(4 << 20))  # 4 MB into a 3 MB filesystem
    assert "the disk filled up while writing it (4.0 MB); nothing was replaced" in one_line(err)
    assert os.listdir(small_fs) == ["state.pt"] and target.read_bytes() == b"old state"


def test_training_checkpoints_that_cannot_fit_are_refused_before_the_first_epoch(
    tmp_path, monkeypatch
):
    from freezecache.config import Train
    from freezecache.models import create_model
    from freezecache.training.train import Trainer

    model = create_model("resnet20", num_classes=10, in_chans=1, img_size=12)
    need = disk.state_bytes(model)  # weights + momentum: about 2 x 1.1 MB for ResNet-20
    assert 2 * 4 * sum(p.numel() for p in model.parameters()) < need < 2.5 * 2**20
    # the latest checkpoint, the one before it, the next one being written, the published state
    monkeypatch.setattr(disk, "free_bytes", lambda path: 4 * need)  # no room for the margin
    with pytest.raises(FreezecacheError) as err:
        Trainer(model, Train(), seed=0, device=torch.device("cpu"), checkpoint=tmp_path / "c.pt")
    line = one_line(err)
    assert line.startswith(f"training checkpoints ({tmp_path / 'c.pt'}) needs about ")
    assert line.endswith("— free space or set paths.checkpoints to a larger filesystem")
    monkeypatch.setattr(disk, "free_bytes", lambda path: 5 * need)
    Trainer(model, Train(), seed=0, device=torch.device("cpu"), checkpoint=tmp_path / "c.pt")


# -- resumable builds ------------------------------------------------------------------------------
def test_resume_after_a_crash_gives_the_same_file(tmp_path):
    d = data(60)
    build(tmp_path / "ref.h5", d, batch=6)
    kw = {"spool_dir": tmp_path / "ckpt", "resume_key": "k", "align": 6, "commit_s": 0.0}
    first = build(tmp_path / "c.h5", d, batch=6, workers=0, stop_after=40, **kw)
    assert first.resume_from == 0 and not (tmp_path / "c.h5").exists()
    second = build(tmp_path / "c.h5", d, batch=6, **kw)
    assert second.resume_from == 42  # batches of 6 up to sample 42, all spooled (workers=0)
    assert filecmp.cmp(tmp_path / "ref.h5", tmp_path / "c.h5", shallow=False)


def test_resume_point_is_a_multiple_of_chunk_size_and_align(tmp_path):
    kw = {"spool_dir": tmp_path / "ckpt", "resume_key": "k", "commit_s": 0.0, "workers": 0}
    build(tmp_path / "c.h5", data(60), batch=5, align=5, stop_after=40, **kw)
    writer = CacheWriter(
        tmp_path / "c.h5",
        make_codec("quant", 1e-2),
        Layout(sample_shape=SHAPE, num_samples=60, chunk_size=3, extra_shape=(2, 6, 6)),
        prefix_hash=HASH,
        build=Build(align=5, **kw),
    )
    assert writer.resume_from == 30  # lcm(3, 5) = 15
    crash(writer)


def test_another_key_or_layout_discards_the_spool(tmp_path):
    kw = {"spool_dir": tmp_path / "ckpt", "commit_s": 0.0, "workers": 0}
    build(tmp_path / "c.h5", data(60), batch=6, resume_key="k", stop_after=30, **kw)
    assert build(tmp_path / "c.h5", data(60), batch=6, resume_key="other", **kw).resume_from == 0
    build(tmp_path / "c.h5", data(60), batch=6, resume_key="k", stop_after=30, **kw)
    again = build(tmp_path / "c.h5", data(60), batch=6, chunk_size=2, resume_key="k", **kw)
    assert again.resume_from == 0


def test_torn_journal_and_corrupt_spool_blobs_are_cut(tmp_path):
    d = data(60)
    build(tmp_path / "ref.h5", d, batch=6)
    ckpt = tmp_path / "ckpt"
    kw = {"spool_dir": ckpt, "resume_key": "k", "commit_s": 0.0}
    build(tmp_path / "c.h5", d, batch=6, workers=0, stop_after=48, **kw)
    with open(ckpt / "journal.bin", "ab") as f:
        f.write(b"FCJ1 torn record")  # a commit killed half-way
    with h5py.File(tmp_path / "ref.h5") as f:
        at = int(f["x_offsets"][5])  # the start of chunk 5
    with open(ckpt / "x.bin", "r+b") as f:
        f.seek(at + 3)
        f.write(b"\xff\xff")
    writer = build(tmp_path / "c.h5", d, batch=6, **kw)
    assert writer.resume_from == 15  # chunk 5 (samples 15..17) is bad: chunks 0..4 stay
    assert filecmp.cmp(tmp_path / "ref.h5", tmp_path / "c.h5", shallow=False)


def test_a_spool_in_use_is_refused(tmp_path):
    kw = {"spool_dir": tmp_path / "ckpt", "resume_key": "k", "workers": 0}
    first = CacheWriter(
        tmp_path / "c.h5",
        make_codec("quant", 1e-2),
        Layout(sample_shape=SHAPE, num_samples=6, chunk_size=3),
        prefix_hash=HASH,
        build=Build(**kw),
    )
    with pytest.raises(FreezecacheError, match="is in use by another build"):
        CacheWriter(
            tmp_path / "c.h5",
            make_codec("quant", 1e-2),
            Layout(sample_shape=SHAPE, num_samples=6, chunk_size=3),
            prefix_hash=HASH,
            build=Build(**kw),
        )
    first._abort()


def test_spools_of_chunk_ranges_assemble_into_the_one_process_file(tmp_path):
    # How torchrun ranks would share a build: each fills the spool of its chunk range.
    d = data(20)
    del d["extra"], d["pos"]
    build(tmp_path / "ref.h5", d, workers=0, extra_index=None)
    codec = make_codec("quant", 1e-2)
    spools = []
    for rank, (lo, hi) in enumerate([(0, 4), (4, 7)]):
        part = spool.Spool(tmp_path / f"rank{rank}", "key", (lo, hi), resume=False)
        for c in range(lo, hi):
            q = codec.quantize(d["x"][None, 3 * c : 3 * c + 3])
            blob = codec.compress(q.payloads[0])
            part.append(
                blob,
                None,
                crcs=(zlib.crc32(blob), 0),
                errors=(q.errors[0], 0.0),
                code_bytes=q.widths[0],
                y=d["y"][3 * c : 3 * c + 3].astype(np.int64),
                pos=None,
            )
        part.commit()
        spools.append(part)
    with h5py.File(tmp_path / "ref.h5") as f:
        attrs = {name: f.attrs[name] for name in ROOT_ATTRS}
    assemble_cache(tmp_path / "multi.h5", spools, attrs)
    assert filecmp.cmp(tmp_path / "ref.h5", tmp_path / "multi.h5", shallow=False)


def test_sigkill_at_a_random_point_then_resume_gives_the_same_file(tmp_path):
    n = 3000
    code, _, err = finish(child(tmp_path, tmp_path / "ref.h5", "-", n, "check"))
    assert code == 0, err
    kill_at = int(np.random.default_rng(14).integers(10, 55)) * 50  # samples added
    proc = child(tmp_path, tmp_path / "c.h5", tmp_path / "ckpt", n, "check")
    for line in proc.stdout:
        if line.startswith("added") and int(line.split()[1]) >= kill_at:
            proc.send_signal(signal.SIGKILL)
            break
    assert finish(proc)[0] == -signal.SIGKILL
    assert not (tmp_path / "c.h5").exists()
    code, out, err = finish(child(tmp_path, tmp_path / "c.h5", tmp_path / "ckpt", n, "check"))
    resumed = int(out.split()[1])
    assert code == 0 and 0 < resumed <= kill_at and resumed % 50 == 0, (out, err)
    assert f"done {resumed}" in out
    assert filecmp.cmp(tmp_path / "ref.h5", tmp_path / "c.h5", shallow=False)


# Options of a codec that calibrates on the data it first sees, and of one that does not.
CALIBRATED = {"relative": True, "coding": "rans", "channel_axis": 1}


def _calibrated(options: dict, first: np.ndarray) -> Codec:
    """A codec calibrated up front on ``first``, as the cache stage calibrates it."""
    codec = make_codec("quant", 0.25 if options else 1e-2, **options)
    calibrate(codec, first, 3)
    return codec


@pytest.mark.parametrize("options", [{}, CALIBRATED], ids=["absolute", "relative-rans"])
def test_ranks_build_one_cache_together_that_equals_the_one_process_file(tmp_path, options):
    """Each rank writes its chunk range to its own spool; the first range's writer publishes
    the file one writer would, the calibration shared as rank 0 shares it (its options)."""
    d = data(20)  # 7 chunks of 3
    ref = build(tmp_path / "ref.h5", d, batch=6, codec=_calibrated(options, d["x"][:6]))
    first = _calibrated(options, d["x"][:6])
    kw = {"batch": 6, "resume_key": "k", "align": 6, "publish": False}
    build(tmp_path / "multi.h5", d, codec=first, chunk_range=(0, 4), spool_dir=tmp_path / "r0",
          **kw)  # fmt: skip
    other = make_codec("quant", first.tolerance, **first.options)
    build(tmp_path / "multi.h5", d, codec=other, chunk_range=(4, 7), spool_dir=tmp_path / "r1",
          **kw)  # fmt: skip
    assert not (tmp_path / "multi.h5").exists()
    writer = CacheWriter(
        tmp_path / "multi.h5",
        make_codec("quant", first.tolerance, **first.options),
        Layout(
            sample_shape=SHAPE,
            num_samples=20,
            chunk_size=3,
            extra_shape=(2, 6, 6),
            extra_index=[3, 1],
        ),
        prefix_hash=HASH,
        meta={"point": 1},
        build=Build(
            spool_dir=tmp_path / "r0", resume_key="k", align=6, chunk_range=(0, 4), publish=False
        ),
    )
    assert writer.resume_from == 12  # a rerun of rank 0 finds its range done
    writer.close()
    stats = writer.publish_ranges([(tmp_path / "r1", (4, 7))])
    assert filecmp.cmp(tmp_path / "ref.h5", tmp_path / "multi.h5", shallow=False)
    assert {k: stats[k] for k in ("stored_bytes", "max_abs_error")} == {
        k: ref.stats[k] for k in ("stored_bytes", "max_abs_error")
    }
    assert not (tmp_path / "r0").exists() and not (tmp_path / "r1").exists()


def test_publishing_with_a_range_missing_is_one_line(tmp_path):
    d = data(20)
    kw = {"batch": 6, "resume_key": "k", "align": 6, "publish": False}
    w = build(tmp_path / "m.h5", d, chunk_range=(0, 4), spool_dir=tmp_path / "r0", **kw)
    build(tmp_path / "m.h5", d, chunk_range=(4, 7), spool_dir=tmp_path / "r1", stop_after=14,
          **kw)  # fmt: skip
    with pytest.raises(FreezecacheError, match=r"spools hold chunks .* rerun the stage"):
        w.publish_ranges([(tmp_path / "r1", (4, 7))])
    assert not (tmp_path / "m.h5").exists() and (tmp_path / "r1").exists()


def test_a_range_must_start_at_a_resume_point(tmp_path):
    with pytest.raises(ValueError, match="start at a multiple of 6 samples"):
        build(tmp_path / "m.h5", data(20), batch=6, resume_key="k", align=6, publish=False,
              chunk_range=(1, 4), spool_dir=tmp_path / "r")  # fmt: skip


def test_a_calibrated_codec_resumes_to_the_uninterrupted_file(tmp_path):
    """A relative/rANS codec left to calibrate itself calibrates a resumed build on the chunk
    it resumes at (its earlier chunks would decode with the wrong steps and tables);
    calibrated on the data set's first samples, the resumed build is the uninterrupted one."""
    d = data(60)
    build(tmp_path / "ref.h5", d, batch=6, codec=_calibrated(CALIBRATED, d["x"][:6]))
    kw = {"spool_dir": tmp_path / "ckpt", "resume_key": "k", "align": 6, "commit_s": 0.0}
    build(tmp_path / "c.h5", d, batch=6, workers=0, stop_after=40,
          codec=_calibrated(CALIBRATED, d["x"][:6]), **kw)  # fmt: skip
    again = build(tmp_path / "c.h5", d, batch=6, codec=_calibrated(CALIBRATED, d["x"][:6]), **kw)
    assert again.resume_from == 42
    assert filecmp.cmp(tmp_path / "ref.h5", tmp_path / "c.h5", shallow=False)
