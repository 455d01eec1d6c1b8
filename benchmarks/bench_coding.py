"""Lossless coding of quant codes (GitHub issue 15): which stage after quantisation wins?

Real features: ResNet-20 trained 2 epochs on 12k Fashion-MNIST images (benchmarks/_features.py),
outputs of blocks 3 and 6 for the first ``--samples`` training images. For each point and
tolerance (absolute 0.1, relative 0.1 / 0.25 / 0.5 of each channel's std) the codes are the real
``QuantCodec.quantize`` codes of one sample per chunk (the cache's chunk size 1), and every
idea codes each chunk on its own, as the cache stores it:

- ``quant zstd`` / ``quant rans``: the codec end to end (quantise in torch 64 chunks per call as
  the writer does, lossless stage, full CPU decode; ``unpack`` = the loader's share when the
  device dequantizes);
- lossless stages alone on the same codes: zstd levels, zstd with a trained dictionary, blosc2
  bitshuffle + zstd / lz4, bit packing, a zero bitmap + nonzero codes, a Lorenzo residual + zstd,
  order-0 rANS (constriction), and the context rANS of ``freezecache.codecs.rans``;
- reference: order-0 entropy of the codes (bits per value).

MB/s are float32 MB per second of one thread's CPU time (``time.thread_time``), so that other
processes on a shared machine disturb them less; the load average is printed with them. The cache
build rate (the real CacheWriter, 2 encoder threads, wall clock) is measured per codec as well.
Ideas whose package is missing are listed as skipped. Writes ``--out`` (JSON).

    PYTHONPATH=src python benchmarks/bench_coding.py --out results/bench_coding.json
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import typer
import zstandard

sys.path.insert(0, str(Path(__file__).parent))
import benchlib as bench  # noqa: E402
from _features import real_features  # noqa: E402
from freezecache.cache.format import CacheInfo, open_cache  # noqa: E402
from freezecache.cache.reader import CacheDataset  # noqa: E402
from freezecache.codecs import rans  # noqa: E402
from freezecache.codecs.quant import QuantCodec  # noqa: E402
from freezecache.codecs.registry import make_codec  # noqa: E402
from freezecache.tooling.results import stamp  # noqa: E402

log = logging.getLogger("bench_coding")
MB = 1e6
TOLERANCES = (("abs 0.1", 0.1, False), ("rel 0.1", 0.1, True), ("rel 0.25", 0.25, True),
              ("rel 0.5", 0.5, True))  # fmt: skip


def _rate(raw_bytes: int, seconds: float) -> float:
    return raw_bytes / MB / max(seconds, 1e-9)


def timed(fn: Callable, items: list) -> tuple[list, float]:
    """fn over items and the thread CPU seconds it took."""
    t0 = time.thread_time()
    out = [fn(item) for item in items]
    return out, time.thread_time() - t0


def codes_of(codec: QuantCodec, x: np.ndarray) -> np.ndarray:
    """The quant codes (n, *shape) uint8 of one-sample chunks (tolerances keep them < 256)."""
    opts = {"relative": True, "channel_scale": codec.channel_scale} if codec.relative else {}
    zstd = make_codec("quant", codec.tolerance, coding="zstd", **opts)
    q = zstd.quantize(x[:, None])
    planes = [zstd.unpack(zstd.compress(p), (1, *x.shape[1:]))[0] for p in q.payloads]
    if max(p.shape[0] for p in planes) != 1:
        raise SystemExit("codes wider than a byte at this tolerance: pick a larger one")
    return np.stack([p[0] for p in planes]).reshape(x.shape)


# -- lossless stages on codes: name -> (encode(q) -> bytes-like, decode(blob, shape) -> q) -----
def _zigzag(r: np.ndarray) -> np.ndarray:
    return np.where(r >= 0, 2 * r, -2 * r - 1).astype(np.uint8)


def _unzigzag(u: np.ndarray) -> np.ndarray:
    u = u.astype(np.int16)
    return (u >> 1) ^ -(u & 1)


def _lorenzo(q: np.ndarray) -> np.ndarray:
    p = np.pad(q.astype(np.int16), [(0, 0)] * (q.ndim - 2) + [(1, 0), (1, 0)])
    return p[..., 1:, 1:] - p[..., :-1, 1:] - p[..., 1:, :-1] + p[..., :-1, :-1]


def stages(train: np.ndarray) -> dict[str, tuple[Callable, Callable] | str]:
    """Every lossless idea, fitted (tables, dictionary) on the codes ``train``."""
    c1, c3, c9 = (zstandard.ZstdCompressor(level=n) for n in (1, 3, 9))
    d = zstandard.ZstdDecompressor()
    dictionary = zstandard.train_dictionary(16384, [s.tobytes() for s in train])
    cd, dd = (
        zstandard.ZstdCompressor(level=3, dict_data=dictionary),
        zstandard.ZstdDecompressor(dict_data=dictionary),
    )

    def raw(dec):
        return lambda blob, shape: np.frombuffer(dec.decompress(blob), np.uint8).reshape(shape)

    out: dict[str, tuple[Callable, Callable] | str] = {
        "zstd 1 (today)": (lambda q: c1.compress(q.tobytes()), raw(d)),
        "zstd 3": (lambda q: c3.compress(q.tobytes()), raw(d)),
        "zstd 9": (lambda q: c9.compress(q.tobytes()), raw(d)),
        "zstd 3 + 16k dictionary": (lambda q: cd.compress(q.tobytes()), raw(dd)),
    }
    bits = max(1, int(train.max()).bit_length() + 1)  # one spare bit for codes beyond train

    def pack(q):
        return np.packbits(np.unpackbits(q.reshape(-1, 1), axis=1)[:, 8 - bits :]).tobytes()

    def unpack(blob, shape):
        b = np.unpackbits(np.frombuffer(blob, np.uint8))[: np.prod(shape) * bits].reshape(-1, bits)
        return np.packbits(np.pad(b, ((0, 0), (8 - bits, 0))), axis=1).reshape(shape)

    out[f"bit packing ({bits} bits)"] = (pack, unpack)

    def zmask(q):
        flat = q.ravel()
        mask = c1.compress(np.packbits(flat != 0).tobytes())
        return len(mask).to_bytes(4, "little") + mask + c1.compress((flat[flat != 0] - 1).tobytes())

    def unzmask(blob, shape):
        n = int.from_bytes(blob[:4], "little")
        mask = np.unpackbits(np.frombuffer(d.decompress(blob[4 : 4 + n]), np.uint8))
        q = np.zeros(mask.size, np.uint8)
        q[mask.astype(bool)] = np.frombuffer(d.decompress(blob[4 + n :]), np.uint8) + 1
        return q[: np.prod(shape)].reshape(shape)

    out["zero bitmap + nonzeros, zstd 1"] = (zmask, unzmask)
    out["Lorenzo residual + zstd 1"] = (
        lambda q: c1.compress(_zigzag(_lorenzo(q)).tobytes()),
        lambda blob, shape: np.cumsum(
            np.cumsum(_unzigzag(np.frombuffer(d.decompress(blob), np.uint8)).reshape(shape), -1),
            -2,
        ).astype(np.uint8),
    )
    out.update(_blosc_stages())
    out.update(_constriction_stage(train))
    tables = rans.Tables(rans.fit_tables(train))

    def ctx_encode(q):
        return tables.encode(q)

    def ctx_decode(blob, shape):
        planes = np.empty((1, int(np.prod(shape))), np.uint8)
        if not tables.decode_into(*blob, shape, planes):
            raise RuntimeError("context rANS round trip failed")
        return planes.reshape(shape)

    out["context rANS (freezecache.rans)"] = (ctx_encode, ctx_decode)
    return out


def _blosc_stages() -> dict:
    """blosc2 bitshuffle + zstd / lz4, one thread (skipped without python-blosc2)."""
    try:
        import blosc2
    except ImportError:
        return {"blosc2 bitshuffle": "skipped: python-blosc2 not installed"}
    out = {}
    for codec, level in ((blosc2.Codec.ZSTD, 1), (blosc2.Codec.ZSTD, 5), (blosc2.Codec.LZ4, 5)):
        params = {"codec": codec, "clevel": level, "filters": [blosc2.Filter.BITSHUFFLE],
                  "typesize": 1, "nthreads": 1}  # fmt: skip
        out[f"blosc2 bitshuffle + {codec.name.lower()} {level}"] = (
            lambda q, p=params: blosc2.compress2(q.tobytes(), **p),
            lambda blob, shape: np.frombuffer(blosc2.decompress2(blob), np.uint8).reshape(shape),
        )
    return out


def _constriction_stage(train: np.ndarray) -> dict:
    """Order-0 rANS with one static table (skipped without constriction)."""
    try:
        import constriction
    except ImportError:
        return {"order-0 rANS (constriction)": "skipped: constriction not installed"}
    counts = np.bincount(train.ravel(), minlength=256).astype(np.float64) + 0.01
    model = constriction.stream.model.Categorical(counts / counts.sum(), perfect=False)

    def encode(q):
        coder = constriction.stream.stack.AnsCoder()
        coder.encode_reverse(q.ravel().astype(np.int32), model)
        return coder.get_compressed()

    def decode(blob, shape):
        coder = constriction.stream.stack.AnsCoder(blob)
        return coder.decode(model, int(np.prod(shape))).astype(np.uint8).reshape(shape)

    return {"order-0 rANS (constriction)": (encode, decode)}


def size_of(blob) -> int:
    """Stored bytes of a stage's output (the context rANS gives its arrays)."""
    if isinstance(blob, tuple):  # words, escapes, per-lane counts (uint32 each in the blob)
        return blob[0].nbytes + blob[1].nbytes + 4 * (blob[2].size + blob[3].size)
    return blob.nbytes if isinstance(blob, np.ndarray) else len(blob)  # constriction: uint32


def stage_rows(q: np.ndarray, train: np.ndarray, raw_bytes: int) -> list[dict]:
    """Ratio (of float32), bits per value and MB/s of every lossless idea on codes ``q``."""
    rows = []
    chunks = [q[i : i + 1] for i in range(len(q))]
    for name, stage in stages(train).items():
        if isinstance(stage, str):
            rows.append({"idea": name, "note": stage})
            continue
        encode, decode = stage
        encode(chunks[0]), decode(encode(chunks[0]), chunks[0].shape)  # warm-up (jit)
        blobs, enc_s = timed(encode, chunks)
        decoded, dec_s = timed(lambda b, f=decode: f(b, chunks[0].shape), blobs)
        assert all(np.array_equal(a, b) for a, b in zip(decoded, chunks, strict=True)), name
        stored = sum(size_of(b) for b in blobs)
        rows.append({
            "idea": name, "ratio": stored / raw_bytes, "bits_per_value": 8 * stored / q.size,
            "encode_mb_s": _rate(raw_bytes, enc_s), "decode_mb_s": _rate(raw_bytes, dec_s),
        })  # fmt: skip
    return rows


def codec_rows(x: np.ndarray, tol: float, relative: bool) -> list[dict]:
    """The codec end to end per coding, and its cache build rate (CacheWriter, wall clock)."""
    rows = []
    for coding in ("zstd", "rans"):
        codec = make_codec("quant", tol, coding=coding, relative=relative)
        codec.quantize(x[:256, None])  # calibrates on the first batch, as the writer does
        t0 = time.thread_time()
        blobs = [codec.compress(p) for g in bench.quant_groups(codec, list(x[:, None])) for p in g]
        enc_s = time.thread_time() - t0
        shape = (1, *x.shape[1:])
        decoded, dec_s = timed(lambda b, c=codec, s=shape: c.decode(b, s), blobs)
        _, unpack_s = timed(lambda b, c=codec, s=shape: c.unpack(b, s), blobs)
        pairs = zip(decoded, x, strict=True)
        err = max(float(np.abs(d[0].astype(np.float64) - s).max()) for d, s in pairs)
        with tempfile.TemporaryDirectory() as tmp:
            warm = make_codec("quant", tol, coding=coding, relative=relative)
            bench.build_cache(  # jit and allocator warm-up; the timed build follows
                Path(tmp) / "w.h5", x[:64], np.zeros(64, np.int64), warm, chunk_size=1, workers=2
            )
            built = bench.build_cache(
                Path(tmp) / "c.h5", x, np.zeros(len(x), np.int64),
                make_codec("quant", tol, coding=coding, relative=relative),
                chunk_size=1, workers=2,
            )  # fmt: skip
            info = open_cache(Path(tmp) / "c.h5")
            loader_mb_s = loader_rate(Path(tmp) / "c.h5", info, x.nbytes)
        rows.append({
            "idea": f"quant {coding} (codec end to end)",
            "ratio": sum(len(b) for b in blobs) / x.nbytes,
            "bits_per_value": 8 * sum(len(b) for b in blobs) / x.size,
            "max_abs_error": err, "max_bound": codec.max_bound,
            "encode_mb_s": _rate(x.nbytes, enc_s), "decode_mb_s": _rate(x.nbytes, dec_s),
            "unpack_mb_s": _rate(x.nbytes, unpack_s), "build_mb_s": built["build_mb_s"],
            "loader_mb_s": loader_mb_s,
        })  # fmt: skip
    return rows


def loader_rate(path: Path, info: CacheInfo, raw_bytes: int) -> float:
    """float32 MB/s of the training loader's CPU part: in-memory cache, device-decode batches of
    64 (the default profile's path), one thread's CPU time."""
    dataset = CacheDataset(path, info, device_decode=True, in_memory=True)
    ids = list(range(info.num_chunks))
    batches = [ids[i : i + 64] for i in range(0, len(ids), 64)]
    _, seconds = timed(dataset.__getitems__, batches)
    return _rate(raw_bytes, seconds)


def entropy0(q: np.ndarray) -> float:
    """Order-0 entropy of the codes, bits per value."""
    p = np.bincount(q.ravel()) / q.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def main(
    out: Path = typer.Option(Path("results/bench_coding.json"), help="JSON to write"),
    samples: int = typer.Option(1024, help="feature samples per point (the first 256 fit tables)"),
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    feats = real_features(samples=max(samples, 1024))
    load_start = os.getloadavg()[0]
    results = []
    for block, x in feats.items():
        x = np.ascontiguousarray(x[:samples])
        for label, tol, relative in TOLERANCES:
            codec = make_codec("quant", tol, relative=relative)
            codec.calibrate(x[:256])  # as the writer: the first batch
            q = codes_of(codec, x)
            rows = codec_rows(x, tol, relative) + stage_rows(q, q[:256], x.nbytes)
            results.append({
                "block": block, "tolerance": label, "shape": list(x.shape[1:]),
                "zeros": float((q == 0).mean()), "entropy0_bits": entropy0(q), "rows": rows,
            })  # fmt: skip
            print_table(results[-1])
    machine = bench.machine_info(__import__("torch").device("cpu"))
    machine["load_avg_1m_start"], machine["load_avg_1m_end"] = load_start, os.getloadavg()[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine, "samples": samples, "points": results}
    out.write_text(json.dumps(payload, indent=1))
    stamp(__file__, [out])
    print(f"load average {load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; "
          f"wrote {out}")  # fmt: skip


def print_table(res: dict) -> None:
    """One point and tolerance as a text table."""
    head = f"block {res['block']} {res['shape']}, tolerance {res['tolerance']}"
    print(f"\n{head}: {res['zeros']:.2f} zero codes, order-0 entropy {res['entropy0_bits']:.2f}")
    print(f"  {'idea':38s} {'ratio':>7s} {'bits':>6s} {'enc MB/s':>9s} {'dec MB/s':>9s} "
          f"{'unpack':>7s} {'build':>6s} {'loader':>7s}")  # fmt: skip
    for r in res["rows"]:
        if "note" in r:
            print(f"  {r['idea']:38s} {r['note']}")
            continue
        keys = ("unpack_mb_s", "build_mb_s", "loader_mb_s")
        extra = "".join(f" {r[k]:7.0f}" if k in r else " " * 8 for k in keys)
        print(f"  {r['idea']:38s} {r['ratio']:7.4f} {r['bits_per_value']:6.2f} "
              f"{r['encode_mb_s']:9.0f} {r['decode_mb_s']:9.0f}{extra}")  # fmt: skip


if __name__ == "__main__":
    typer.run(main)
