"""Cache writer benchmarks (issue 14): build throughput, and the time a resumed build saves.

    python benchmarks/bench_store.py throughput            # one build, JSON on stdout
    python benchmarks/bench_store.py throughput --resumable --commit-s 0.25
    python benchmarks/bench_store.py compare --before DIR  # builds alternating two source trees
    python benchmarks/bench_store.py resume --at 0.9       # SIGKILL at 90%, then resume

Activations are synthetic (ReLU of seeded Gaussians, ``--shape`` per sample, 12k samples of
16x28x28 by default, like the default profile's first freeze point), made batch by batch from
``(seed, batch index)`` so a resumed build can skip making the batches it does not need, as a
cache stage skips computing them. MB/s are float32 MB of input per wall second. Every result
carries the load average (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MB = 1e6


def batch_of(seed: int, index: int, size: int, shape: tuple[int, ...]) -> np.ndarray:
    """Batch ``index`` of the synthetic activations: the same bytes whenever it is made."""
    rng = np.random.default_rng([seed, index])
    return np.maximum(rng.standard_normal((size, *shape), dtype=np.float32), 0)


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def build(
    args: argparse.Namespace, out: Path, spool: Path | None, progress: bool, ready: bool = False
) -> dict:
    """One cache build through the real CacheWriter; resumable when ``spool`` is given.

    ``ready``: make all batches before the clock starts (the activations already in memory, as
    in ``make bench``); otherwise each batch is made when it is due and its time is left out of
    ``write_s``.
    """
    from freezecache.cache import Build, CacheWriter, Layout
    from freezecache.codecs.registry import make_codec

    shape = tuple(args.shape)
    kw = {}
    if spool is not None:  # the new writer's resume arguments
        kw = {"spool_dir": spool, "resume_key": "bench", "align": args.batch}
        kw["commit_s"] = args.commit_s
    made = {}
    if ready:
        for lo in range(0, args.samples, args.batch):
            size = min(args.batch, args.samples - lo)
            made[lo] = batch_of(args.seed, lo // args.batch, size, shape)
    start = time.perf_counter()
    with CacheWriter(
        out,
        make_codec(args.codec, args.tol),
        Layout(sample_shape=shape, num_samples=args.samples, chunk_size=args.chunk_size),
        prefix_hash="bench",
        build=Build(workers=args.workers, **kw),
    ) as writer:
        first = getattr(writer, "resume_from", 0)
        make_s = 0.0
        for lo in range(first, args.samples, args.batch):
            t0 = time.perf_counter()
            size = min(args.batch, args.samples - lo)
            x = made.pop(lo) if ready else batch_of(args.seed, lo // args.batch, size, shape)
            make_s += time.perf_counter() - t0
            writer.add(x, np.arange(lo, lo + len(x)) % 10)
            if progress:
                print("added", lo + len(x), flush=True)
    took = time.perf_counter() - start
    raw = 4 * args.samples * int(np.prod(shape))
    return {
        "wall_s": took,
        "write_s": took - make_s,  # the writer's share: encode, spool, assemble
        "build_mb_s": raw / MB / (took - make_s),
        "resumed_samples": first,
        "stored_bytes": writer.stats["stored_bytes"],
        "file_bytes": out.stat().st_size,
    }


def cmd_throughput(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        load = loadavg()
        spool = Path(tmp) / "ckpt" if args.resumable else None
        row = build(args, Path(tmp) / "c.h5", spool, progress=False, ready=True)
    print(json.dumps({**row, "load_start": load, "load_end": loadavg()}))


def _child(args: argparse.Namespace, *extra: str) -> list[str]:
    cmd = [sys.executable, __file__, *extra, "--samples", str(args.samples), "--batch",
           str(args.batch), "--codec", args.codec, "--tol", str(args.tol), "--workers",
           str(args.workers), "--chunk-size", str(args.chunk_size), "--seed", str(args.seed),
           "--shape", *map(str, args.shape), "--tmp", args.tmp,
           "--commit-s", str(args.commit_s)]  # fmt: skip
    return cmd


def _env(src: str) -> dict:
    return {**os.environ, "PYTHONPATH": str(Path(src).resolve())}


def cmd_compare(args: argparse.Namespace) -> None:
    """Throughput of two source trees, alternating, ``--rounds`` builds each."""
    trees = {"before": args.before, "after": args.after}
    rows: dict[str, list[dict]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, src in trees.items():
            done = subprocess.run(
                _child(args, "throughput"), env=_env(src), capture_output=True, text=True
            )
            if done.returncode:
                sys.exit(done.stderr)
            rows[name].append(json.loads(done.stdout))
    for name, runs in rows.items():
        rates = [r["build_mb_s"] for r in runs]
        loads = [r["load_start"] for r in runs] + [r["load_end"] for r in runs]
        print(
            f"{name:6s} {trees[name]}: build {statistics.median(rates):.0f} MB/s median "
            f"(runs {', '.join(f'{v:.0f}' for v in rates)}), load {min(loads):.2f}-{max(loads):.2f}"
        )


def cmd_resume(args: argparse.Namespace) -> None:
    """Uninterrupted build vs. SIGKILL at ``--at`` of the samples, then a resumed build."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        load = loadavg()
        full = _run_child(args, src, tmp / "ref.h5", None)
        kill_at = int(args.at * args.samples)
        proc = subprocess.Popen(
            _child(args, "child", "--out", str(tmp / "c.h5"), "--spool", str(tmp / "ckpt")),
            env=_env(src), stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        t0 = time.perf_counter()
        for line in proc.stdout:
            if line.startswith("added") and int(line.split()[1]) >= kill_at:
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait()
        killed_s = time.perf_counter() - t0
        resumed = _run_child(args, src, tmp / "c.h5", tmp / "ckpt")
        same = (tmp / "ref.h5").read_bytes() == (tmp / "c.h5").read_bytes()
    print(
        json.dumps(
            {
                "samples": args.samples,
                "commit_s": args.commit_s,
                "killed_at_samples": kill_at,
                "killed_after_s": killed_s,
                "uninterrupted_wall_s": full["wall_s"],
                "resumed_wall_s": resumed["wall_s"],
                "resumed_from": resumed["resumed_samples"],
                "saved_s": full["wall_s"] - resumed["wall_s"],
                "saved_fraction": 1 - resumed["wall_s"] / full["wall_s"],
                "byte_identical": same,
                "load_start": load,
                "load_end": loadavg(),
            }
        )
    )


def _run_child(args: argparse.Namespace, src: str, out: Path, spool: Path | None) -> dict:
    extra = ["child", "--out", str(out), "--quiet"]
    if spool is not None:
        extra += ["--spool", str(spool)]
    done = subprocess.run(_child(args, *extra), env=_env(src), capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr)
    return json.loads(done.stdout.splitlines()[-1])


def cmd_child(args: argparse.Namespace) -> None:
    spool = Path(args.spool) if args.spool else None
    print(json.dumps(build(args, Path(args.out), spool, progress=not args.quiet)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["throughput", "compare", "resume", "child"])
    parser.add_argument("--samples", type=int, default=12000)
    parser.add_argument("--shape", type=int, nargs="+", default=[16, 28, 28])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--codec", default="quant")
    parser.add_argument("--tol", type=float, default=0.1)
    parser.add_argument("--chunk-size", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--at", type=float, default=0.9)
    parser.add_argument("--commit-s", type=float, default=1.0, help="writer commit interval")
    parser.add_argument("--before", default="src")
    parser.add_argument("--after", default="src")
    parser.add_argument("--tmp", default=tempfile.gettempdir())
    parser.add_argument("--out")
    parser.add_argument("--spool")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--resumable", action="store_true", help="throughput: with a spool")
    args = parser.parse_args()
    {"throughput": cmd_throughput, "compare": cmd_compare, "resume": cmd_resume,
     "child": cmd_child}[args.command](args)  # fmt: skip


if __name__ == "__main__":
    main()
