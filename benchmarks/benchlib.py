"""Measuring helpers for the cache benchmarks (``benchmarks/bench_cache.py``, issues 6 and 15).

Each function measures one thing on the arrays, models or files it is given and returns plain
numbers, so the benchmark script reads as a list of measurements and a tiny test can run them
all. Timed training goes through the real :class:`~freezecache.training.train.Trainer`; the batches
come
from the functions the train_suffix stage uses (:mod:`freezecache.steps.suffix`), on whatever
device the caller passes.
"""

from __future__ import annotations

import logging
import math
import operator
import os
import platform
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from freezecache.cache.format import CacheInfo, Layout
from freezecache.cache.loader import ChunkShuffleSampler
from freezecache.cache.reader import iter_cache
from freezecache.cache.writer import Build, CacheWriter
from freezecache.codecs import Codec
from freezecache.codecs.quant import QuantCodec
from freezecache.codecs.registry import make_codec
from freezecache.codecs.zfp import ZfpCodec
from freezecache.core.errors import FreezecacheError, optional
from freezecache.training.schedule import Phase
from freezecache.training.train import Trainer, TrainSpec

log = logging.getLogger(__name__)

# The paper's cache build rate (Table A.3: ResNet32 activations, single-thread zfpy on chunks of
# 2), as issue 6 quotes it. P4's goal is ten times this.
PAPER_BUILD_MB_S = 35.0
MB = 1e6
# Other processes using more than this many cores during a timed epoch make its time unreliable.
NOISY_CORES = 0.25


_OPS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt}


@dataclass(frozen=True)
class Goal:
    """A target for one measured number: ``value <op> target``."""

    op: str  # one of _OPS
    target: float

    def met(self, value: float) -> bool:
        """Whether ``value`` meets the goal."""
        return _OPS[self.op](value, self.target)

    def __str__(self) -> str:
        return f"{self.op} {self.target:.3g}"


# Issue 15's targets (P3: about 2 bits per value at every freeze point).
GOALS = {
    "p1_cache_vs_ram": Goal("<=", 1.10),
    "p1_file_cache_vs_ram": Goal("<=", 1.10),
    "p2_vs_flops_ideal": Goal("<=", 1.15),
    "p3_ratio": Goal("<=", 0.06),
    "p4_build_mb_s": Goal(">=", 10 * PAPER_BUILD_MB_S),
    # issue 19's fallback: reading, decoding and augmenting a batch cost at most 5% of the
    # suffix's forward + backward + step (the main goal, epoch_vs_freezeout, is per method)
    "data_vs_compute": Goal("<=", 0.05),
    # issue 29: CachedFeatures through a DataLoader within 10% of the pipeline's own epoch
    "api_loader_vs_stage": Goal("<=", 1.10),
    # issue 27: the pipeline's own epoch (its stage processes, the median epoch) within 3% of
    # the bench's, and a discard method's one-off beyond FreezeOut's at most 1.5 x its floor
    # (one pass of the frozen prefix over the training set plus encoding it)
    "pipeline_epoch_vs_bench": Goal("<=", 1.03),
    "one_off_vs_floor": Goal("<=", 1.5),
}


def goal_row(metric: str, setting: str, value: float, goal: Goal | None = None) -> dict:
    """One measured value against its goal (``GOALS[metric]`` unless given); ``setting`` says
    what was measured (a codec, a freeze point, a loader path)."""
    goal = goal or GOALS[metric]
    return {
        "metric": metric,
        "setting": setting,
        "value": value,
        "goal": str(goal),
        "pass": goal.met(value),
    }


def rate_mb_s(pairs: list[tuple[int, float]]) -> float:
    """MB/s over several (bytes, seconds) measurements taken together."""
    return sum(b for b, _ in pairs) / MB / sum(s for _, s in pairs)


# -- machine ---------------------------------------------------------------------------------
def _cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where it exists, else what platform says."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _version(package: str) -> str:
    """An installed package's version, or why there is none (zfpy is optional)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def machine_info(device: torch.device) -> dict:
    """Where the numbers were taken: CPU, cores, torch threads, the training device."""
    info = {
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "torch": torch.__version__,
        "zfpy": _version("zfpy"),
        "python": platform.python_version(),
        # Other work on the machine slows timed epochs; min over repeats damps, not removes it.
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_jiffies(pid: int | str) -> int:
    """User + system clock ticks of one process (Linux /proc), 0 when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state is field 0
    return int(fields[11]) + int(fields[12])


def _own_jiffies() -> int:
    """Ticks of this process and its live children (DataLoader workers)."""
    me = os.getpid()
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == me:
                children.append(entry.name)
    return _cpu_jiffies(me) + sum(_cpu_jiffies(pid) for pid in children)


def _machine_jiffies() -> tuple[int, int]:
    """(busy, total) ticks of all CPUs since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


class OtherLoad:
    """Cores used by other processes while a block runs: 0 on a quiet machine.

    Timed epochs on a shared CPU slow down several-fold when other work runs (torch's threads
    wait for each other), so the benchmark reports this next to its timings. ``cores`` stays
    None where /proc is missing (not Linux).
    """

    def __init__(self) -> None:
        self.cores: float | None = None
        self._start: tuple[int, int, int] | None = None

    def __enter__(self) -> OtherLoad:
        if Path("/proc/stat").is_file():
            self._start = (*_machine_jiffies(), _own_jiffies())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._start is None:
            return
        busy, total, own = (*_machine_jiffies(), _own_jiffies())
        d_busy, d_total = busy - self._start[0], total - self._start[1]
        others = max(0, d_busy - (own - self._start[2]))
        self.cores = (os.cpu_count() or 1) * others / d_total if d_total else 0.0


# -- codecs ----------------------------------------------------------------------------------
def chunks(x: np.ndarray, k: int) -> list[np.ndarray]:
    """Consecutive chunks of ``k`` samples (the last may be shorter), as the cache cuts them."""
    return [x[lo : lo + k] for lo in range(0, len(x), k)]


def quant_groups(codec: QuantCodec, parts: list[np.ndarray], group: int = 64):
    """Uncompressed quant blobs of ``parts``, quantised ``group`` equal chunks at a time."""
    for lo in range(0, len(parts), group):
        batch = parts[lo : lo + group]
        if all(p.shape == batch[0].shape for p in batch):
            yield codec.quantize(np.stack(batch)).payloads
        else:  # a short last chunk
            yield [codec.quantize(p[None]).payloads[0] for p in batch]


def codec_row(codec: Codec, x: np.ndarray, chunk_size: int) -> dict:
    """Ratio, max abs error and encode/decode MB/s of one codec on ``x`` (one thread for zfp
    and none; quant encodes batches of chunks in torch, as the cache writer does).

    For quant, ``unpack_mb_s`` is what a loader worker does when the device dequantizes.
    """
    parts = chunks(np.ascontiguousarray(x, np.float32), chunk_size)
    raw_mb = 4 * x.size / MB
    t0 = time.perf_counter()
    if isinstance(codec, QuantCodec):  # as the cache writer encodes: many chunks per call
        blobs = [codec.compress(p) for group in quant_groups(codec, parts) for p in group]
    else:
        blobs = [codec.encode(part) for part in parts]
    t1 = time.perf_counter()
    decoded = [codec.decode(blob, part.shape) for blob, part in zip(blobs, parts, strict=True)]
    t2 = time.perf_counter()
    row = {
        "ratio": sum(len(b) for b in blobs) / (4 * x.size),
        "max_abs_error": max(
            float(np.abs(p.astype(np.float64) - d).max())
            for p, d in zip(parts, decoded, strict=True)
        ),
        "encode_mb_s": raw_mb / (t1 - t0),
        "decode_mb_s": raw_mb / (t2 - t1),
        "unpack_mb_s": None,
    }
    if isinstance(codec, QuantCodec):
        t0 = time.perf_counter()
        for blob, part in zip(blobs, parts, strict=True):
            codec.unpack(blob, part.shape)
        row["unpack_mb_s"] = raw_mb / (time.perf_counter() - t0)
    return row


def fresh_codec(info: CacheInfo, **changes) -> Codec:
    """A new codec with a cache's settings (``changes`` applied), without its calibration: a
    relative quant codec measures its channel spread again on the first batch, as a build does."""
    calibrated = ("channel_scale", "tables")
    options = {k: v for k, v in info.codec_options.items() if k not in calibrated}
    return make_codec(info.codec_name, info.tolerance, **{**options, **changes})


def build_cache(
    path: Path,
    x: np.ndarray,
    y: np.ndarray,
    codec: Codec,
    *,
    chunk_size: int,
    workers: int,
    batch_size: int = 256,
) -> dict:
    """Write ``x`` into a cache with the real :class:`~freezecache.CacheWriter`.

    Returns the writer's stats plus ``build_s`` and ``build_mb_s`` (float32 MB per wall second:
    encode + verify + spool + assembling the file; the activations are already in memory).
    """
    t0 = time.perf_counter()
    with CacheWriter(
        path,
        codec,
        Layout(sample_shape=x.shape[1:], num_samples=len(x), chunk_size=chunk_size),
        prefix_hash="bench",
        meta={"bench": True},
        build=Build(workers=workers),
    ) as writer:
        for lo in range(0, len(x), batch_size):
            writer.add(x[lo : lo + batch_size], y[lo : lo + batch_size])
    took = time.perf_counter() - t0
    return {**writer.stats, "build_s": took, "build_mb_s": 4 * x.size / MB / took}


def zfp_chunk_baseline(x: np.ndarray, tolerance: float, chunk_size: int = 2) -> dict:
    """The paper's cache build: one thread, zfpy on 4-D chunks of ``chunk_size`` samples."""
    codec = ZfpCodec(tolerance)
    parts = chunks(np.ascontiguousarray(x, np.float32), chunk_size)
    t0 = time.perf_counter()
    stored = sum(len(codec.encode(part)) for part in parts)
    took = time.perf_counter() - t0
    return {"build_s": took, "build_mb_s": 4 * x.size / MB / took, "ratio": stored / (4 * x.size)}


# -- batches ---------------------------------------------------------------------------------
def batch_orders(
    num_samples: int, chunk_size: int, batch_size: int, seed: int, epoch: int
) -> list[np.ndarray]:
    """Sample indices of each batch the cache loader gives in ``epoch``.

    The loader draws chunks with :class:`~freezecache.ChunkShuffleSampler` and takes
    ``batch_size // chunk_size`` chunks per batch; this repeats that order for data in RAM.
    """
    num_chunks = math.ceil(num_samples / chunk_size)
    sampler = ChunkShuffleSampler(num_chunks, seed)
    sampler.set_epoch(epoch)
    order = list(sampler)
    per_batch = max(1, batch_size // chunk_size)
    batches = []
    for lo in range(0, num_chunks, per_batch):
        group = order[lo : lo + per_batch]
        ids = [np.arange(c * chunk_size, min((c + 1) * chunk_size, num_samples)) for c in group]
        batches.append(np.concatenate(ids))
    return batches


def features_in_ram(path: Path, info: CacheInfo, device: torch.device) -> dict[str, Tensor]:
    """A whole cache decoded to float32 on ``device``, in data-set order: ``x``, ``y`` and the
    stored extras (what the RAM baseline trains from: no decoding while it trains)."""
    parts: dict[str, list[Tensor]] = {}
    for batch in iter_cache(path, info):
        for key, value in batch.items():
            if key != "index":
                parts.setdefault(key, []).append(value)
    return {key: torch.cat(values).to(device) for key, values in parts.items()}


def ram_batches(arrays: dict[str, Tensor], orders: list[np.ndarray]) -> Iterator[dict]:
    """Batch dicts (as the cache loader gives them) gathered from features held in memory."""
    device = next(iter(arrays.values())).device
    for ids in orders:
        idx = torch.from_numpy(ids).to(device)
        yield {key: value.index_select(0, idx) for key, value in arrays.items()}


# -- timing ----------------------------------------------------------------------------------
def timed_epoch(
    trainer: Trainer,
    *,
    state: str,
    position: int,
    forward: Callable[[Tensor], Tensor],
    batches: Iterable[tuple[Tensor, Tensor]],
    steps: int,
) -> dict:
    """Train one epoch over ``batches`` with the real training loop, without evaluation.

    Returns the epoch's history row (``epoch_time_s``, ``data_wait_frac``, ...). The trainer
    syncs CUDA before stopping its clock.
    """
    epoch = trainer.state.epoch
    trainer.fit(
        TrainSpec(
            phase=Phase(state, position, epoch, epoch + 1),
            forward=forward,
            batches=lambda _: batches,
            steps_per_epoch=max(steps, 1),
        )
    )
    return trainer.state.history[-1]


def summary(rows: list[dict]) -> dict:
    """Epoch time of repeated epochs (history rows): the minimum, which other load disturbs
    least, every repeat, and the data-wait fraction of the fastest epoch."""
    times = [r["epoch_time_s"] for r in rows]
    best = rows[times.index(min(times))]
    return {
        "min_s": min(times),
        "all_s": times,
        "data_wait_frac": best["data_wait_frac"],
        "other_cores": best.get("other_cores"),
    }


# -- report ----------------------------------------------------------------------------------
def compare_codecs(rows: list[dict], tolerance: float, a: str, b: str) -> dict | None:
    """Codec ``a`` against ``b`` in the codec table at the listed tolerance nearest ``tolerance``.

    ``better`` is True when ``a`` is smaller and faster both ways.
    """
    tols = sorted({r["tolerance"] for r in rows})
    if not tols:
        return None
    tol = min(tols, key=lambda t: abs(math.log(t / tolerance)))
    by_name = {r["codec"]: r for r in rows if r["tolerance"] == tol}
    if a not in by_name or b not in by_name:
        return None
    ra, rb = by_name[a], by_name[b]
    keys = ("ratio", "encode_mb_s", "decode_mb_s")
    better = ra["ratio"] < rb["ratio"] and all(ra[k] > rb[k] for k in keys[1:])
    return {"a": a, "b": b, "tolerance": tol, "better": better, **{
        f"{k}_{side}": row[k] for k in keys for side, row in (("a", ra), ("b", rb))
    }}  # fmt: skip


def comparison_text(c: dict) -> str:
    """One sentence for :func:`compare_codecs`' result."""
    verdict = "better on all three" if c["better"] else "not better on all three"
    return (
        f"{c['a']} vs {c['b']} at tolerance {c['tolerance']:g}: ratio {c['ratio_a']:.3f} vs "
        f"{c['ratio_b']:.3f}, encode {c['encode_mb_s_a']:.0f} vs {c['encode_mb_s_b']:.0f} MB/s, "
        f"decode {c['decode_mb_s_a']:.0f} vs {c['decode_mb_s_b']:.0f} MB/s: {c['a']} is {verdict}."
    )


def _fmt(value: object, digits: int = 3) -> str:
    """Numbers for the tables: 3 significant digits, '—' for None."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "PASS" if value else "MISS"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _table(header: list[str], rows: list[list[object]]) -> list[str]:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def _goals_table(goals: list[dict]) -> list[str]:
    """Every goal as a row: what was measured, the value and PASS/MISS."""
    rows = [[g["metric"], g["setting"], g["value"], g["goal"], g["pass"]] for g in goals]
    return _table(["metric", "setting", "value", "goal", "pass"], rows)


def _setup_text(res: dict) -> str:
    """Where and on what the numbers were measured."""
    m, s = res["machine"], res["setup"]
    gpu = f" ({m['gpu']})" if "gpu" in m else ""
    mode = "relative to each channel's std" if s["relative"] else "absolute"
    loader = s["loader"]
    return (
        f"Measured on {m['cpu']} ({m['cpu_count']} cores, {m['torch_threads']} torch threads, "
        f"load average {_fmt(m['load_avg_1m'])} at the start, "
        f"{_fmt(m.get('load_avg_1m_end'))} at the end), training device `{m['device']}`{gpu}, "
        f"torch {m['torch']}. {s['model']} on {s['dataset']}, {s['samples']} training samples, "
        f"batch {s['batch_size']}, freeze points at blocks {s['points']}; caches built by the "
        f"cache stage for `{s['method']}` ({s['augment']} augmentation). The profile's codec is "
        f"`{s['codec']}` at tolerance {', '.join(_fmt(x) for x in s['tolerances'])} ({mode}, "
        f"{s['coding']} coding, chunk {s['chunk_size']}, {s['encode_workers']} encoder threads); "
        f"loader workers {loader['workers']}, device decode {loader['device_decode']}, "
        f"in_memory {loader['in_memory']}; min of {s['repeats']} interleaved epochs. "
        f"Weights: {s['weights']}."
    )


def _points_table(points: list[dict]) -> list[str]:
    """P3 and build rates per freeze point, one column per build setting."""
    labels = list(points[0]["builds"])
    header = ["point", "block", "features", "tolerance", "cache stage ratio",
              "with flipped channels", *[f"{b} ratio" for b in labels], "paper chunk 2 ratio",
              *[f"{b} build MB/s" for b in labels], "paper-style MB/s"]  # fmt: skip
    rows = [
        [p["point"], p["block"], "x".join(map(str, p["feature_shape"])), p["tolerance"],
         p["p3_ratio"], p["p3_cache_ratio"], *[p["builds"][b]["ratio"] for b in labels],
         p["p3_paper_chunk2_ratio"], *[p["builds"][b]["build_mb_s"] for b in labels],
         p["baseline_mb_s"]]
        for p in points
    ]  # fmt: skip
    return _table(header, rows)


def _ideas_table(ideas: dict, setup: dict, load: float | None) -> list[str]:
    """The coding ideas at the tolerance setting nearest the profile's, one column group per
    freeze point (bench.json has every setting)."""
    points = ideas.get("points") or []
    if not points:
        return []
    want = f"{'rel' if setup['relative'] else 'abs'} {setup['tolerances'][0]:g}"
    labels = [p["tolerance"] for p in points]
    label = want if want in labels else labels[0]
    chosen = [p for p in points if p["tolerance"] == label]
    keys = ("bits_per_value", "encode_mb_s", "decode_mb_s")
    header = ["idea", *[f"{k.split('_')[0]} (block {p['block']})" for p in chosen for k in keys]]
    rows = []
    for i, r in enumerate(chosen[0]["rows"]):
        cells = [p["rows"][i] for p in chosen]
        if "note" in r:
            rows.append([r["idea"], r["note"], *["—"] * (len(header) - 2)])
            continue
        rows.append([r["idea"], *[c.get(k) for c in cells for k in keys]])
    machine = ideas.get("machine", {})  # the coding benchmark's own run, when read from it
    load = machine.get("load_avg_1m_end", machine.get("load_avg_1m", load))
    return [
        f"### Coding ideas (quant codes, tolerance {label}, {ideas.get('samples')} samples)",
        "",
        f"From {ideas['source']} (load average {_fmt(load)}); bits per value and float32 MB/s "
        "of one thread. bench.json has every tolerance setting.",
        "",
        *_table(header, rows),
        "",
    ]


def to_markdown(res: dict) -> str:
    """bench.md: the goals, the per-point sizes, the epoch times, the codecs and coding ideas."""
    m, s, t = res["machine"], res["setup"], res["p1_p2"]
    lines = [
        "## Cache benchmarks",
        "",
        _setup_text(res),
        "",
        *_goals_table(res["goals"]),
        "",
        f"p4_baseline_mb_s (the paper's way: one thread, zfp chunks of 2): "
        f"{_fmt(res['p4_baseline_mb_s'])} MB/s. Builds run the real CacheWriter on features in "
        "memory (encode, verify, spool, assemble the file); zfp chunks are decoded again to check "
        "the bound, quant's bound follows from its float32 arithmetic.",
        "",
        "### Per freeze point (P3, P4)",
        "",
        *_points_table(res["p3"]),
        "",
        "Cache stage ratio: F(x) in the cache the cache stage built (the profile's settings); "
        "with flipped channels: the whole cache, stored F(flip(x)) channels included. The other "
        "ratios and rates come from builds of the same features at the same tolerance number.",
        "",
        *breakdown_markdown(t["breakdown"], s["points"][0]),
        *pipeline_markdown(t),
        f"P2 uses the `{t['p2_cache']}` epoch (the stage's loader.in_memory): suffix / full "
        f"epoch time {_fmt(t['suffix_vs_full_time'])}, suffix / full training FLOPs "
        f"{_fmt(t['suffix_vs_full_flops'])}.",
        "",
        f"### Codecs (point 1, {s['codec_samples']} samples)",
        "",
        *_table(
            [
                "codec",
                "tolerance",
                "ratio",
                "max abs error",
                "encode MB/s",
                "decode MB/s",
                "unpack MB/s",
            ],
            [
                [
                    r["codec"],
                    r["tolerance"],
                    r["ratio"],
                    r["max_abs_error"],
                    r["encode_mb_s"],
                    r["decode_mb_s"],
                    r["unpack_mb_s"],
                ]
                for r in res["codecs"]
            ],
        ),  # fmt: skip
        "",
        "zfp and none encode and decode on one thread; quant encodes 64 chunks per call in torch "
        f"({m['torch_threads']} threads), as the cache writer does. Unpack = the loader's share "
        "of quant decoding when the device dequantizes.",
        "",
        *_ideas_table(res.get("coding_ideas") or {}, s, m.get("load_avg_1m_end")),
    ]
    epochs = t["breakdown"]["epochs"].values()
    busy = [e["other_cores"] for e in epochs if e["other_cores"] is not None]
    if busy and max(busy) > NOISY_CORES:
        lines += [
            f"**Noisy machine:** other processes used up to {max(busy):.2f} cores during the "
            "fastest timed epochs; P1 and P2 are unreliable, rerun on a quiet machine.",
            "",
        ]
    if res.get("codec_comparison"):
        lines += [comparison_text(res["codec_comparison"]), ""]
    return "\n".join(lines)


PARTS = ("read + unpack", "decode", "augment", "decode + augment (fused)", "data, other",
         "forward", "backward", "optimizer step", "loop, other")  # fmt: skip


def breakdown_markdown(b: dict, block: int) -> list[str]:
    """The epoch breakdown (benchmarks/_epochs.py): one row per setting, the goal ratios and
    the one-off costs with the break-even against FreezeOut."""
    e, labels = b["epochs"], b["labels"]
    parts = [p for p in PARTS if any(p in r["parts_s"] for r in e.values())]
    rows = [
        [labels[n], r["epoch_s"], *[r["parts_s"].get(p) for p in parts], r["validation_s"],
         ", ".join(f"{v:.2f}" for v in r["epochs_s"]), r["other_cores"]]
        for n, r in e.items()
    ]  # fmt: skip
    goals = [
        [labels[n], g["epoch_vs_freezeout"], g["flops_vs_freezeout"], g["epoch_goal"],
         g["epoch_goal_met"], g["data_vs_compute"], g["data_vs_compute"] <= 0.05,
         g["break_even_epochs"]]
        for n, g in b["goals"].items()
    ]  # fmt: skip
    names = list(b["fixed_s"])
    costs = sorted({k for f in b["fixed_s"].values() for k in f})
    fixed = [[labels[n], *[b["fixed_s"][n].get(k) for k in costs], sum(b["fixed_s"][n].values())]
             for n in names]  # fmt: skip
    return [
        f"### Where an epoch goes (after the freeze point at block {block})",
        "",
        *_table(
            [
                "setting",
                "epoch s",
                *parts,
                "validation s",
                f"all {b['rounds']} rounds s",
                "other processes (cores)",
            ],
            rows,
        ),  # fmt: skip
        "",
        "Seconds of the fastest of the interleaved rounds, one epoch each, through each stage's "
        "own functions; the parts are timed sections of that epoch (results/bench_epochs.svg). "
        "Read + unpack: batch indexing, or the cache's blobs and zstd; decode: to float32 maps; "
        "augment: flip, crop, noise (on raw images: crop and flip); fused: the cache's decode "
        "and augmentation in one CPU pass. Validation runs once per epoch (with a frozen "
        "prefix, on its features computed once).",
        "",
        *_table(
            [
                "method",
                "epoch / FreezeOut",
                "FLOPs per step / FreezeOut",
                "goal (1.05 x)",
                "goal met",
                "data / compute",
                "<= 0.05",
                "break-even (epochs)",
            ],
            goals,
        ),
        "",
        *_table(["method", *costs, "one-off s"], fixed),
        "",
        "One-off costs after the shared prefix run: the start-up of each stage process (its "
        "interpreter and imports), its setup (model, loader, validation features) and, for the "
        "discard methods, the cache stage's ranking and build. Break-even: epochs after the "
        "freeze point from which the method's run is shorter than FreezeOut's.",
        "",
    ]


def pipeline_markdown(t: dict) -> list[str]:
    """The pipeline's own stage processes of this run (bench_cache.stage_runs): per method its
    epochs against the bench's and FreezeOut's, its one-off against FreezeOut's and its floor."""
    stages, goals = t.get("stages"), t.get("pipeline", {})
    if not stages:
        return []
    labels, bench = t["breakdown"]["labels"], t["breakdown"]["epochs"]
    rows = []
    for name, r in stages.items():
        g = goals.get(name, {})
        rows.append([
            labels[name], r["wall_s"], r["epochs"], r["median_epoch_s"],
            g.get("epoch_vs_bench", r["fastest_epoch_s"] / bench[name]["epoch_s"]),
            g.get("epoch_vs_freezeout"), g.get("epoch_goal"), r["epoch_s"], r["one_off_s"],
            g.get("one_off_extra_s"), g.get("floor_s"), g.get("one_off_vs_floor"),
            g.get("break_even_epochs"),
        ])  # fmt: skip
    head = ["method", "stages' wall s", "epochs", "median epoch s", "fastest / bench's",
            "/ FreezeOut's", "goal (1.05 x FLOPs)", "per epoch with validation s", "one-off s",
            "one-off - FreezeOut's s", "floor s", "/ floor (<= 1.5)",
            "break-even (epochs)"]  # fmt: skip
    return [
        "### The pipeline's own stages, side by side (this run)",
        "",
        *_table(head, rows),
        "",
        "Each method after the shared run as `dvc repro` runs it: its stage processes, one after "
        "another, from the weights the epochs above trained from; figures from each stage's own "
        "records, as the report reads them (the median of a stage's epochs is its epoch: the "
        "first one's warm-up counts in the one-off); against the bench's epoch, its fastest "
        "epoch (the bench keeps its fastest round). Floor: one pass of the frozen prefix over "
        "the training set plus encoding it, as the cache stage timed them; the one-off's parts "
        "are the table above.",
        "",
    ]


def svg(spec: dict) -> str | None:
    """A Vega-Lite spec as SVG (vl-convert bundles Vega: no network); None without vl-convert."""
    try:
        vl_convert = optional("vl_convert", "vl-convert-python", why="for the bench's SVG plot")
    except FreezecacheError as err:
        log.warning("no SVG plot: %s", err)
        return None
    return vl_convert.vegalite_to_svg(spec)
