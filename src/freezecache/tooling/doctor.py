"""`freezecache doctor`: is this environment able to run the current profile, and how fast?

One screen, like `dvc doctor`: the versions of the packages that matter (each imported, so a
package present but broken shows as broken, with what needs it and the setting that avoids
it), the device(s) with CUDA, NCCL and bf16, the quant codec decoded on the training device
against the CPU decode bit for bit, free disk under the cache folder, and a measurement of about
20 seconds on the current profile: one suffix epoch from a small cache against one epoch of
plain freezing (FreezeOut), as a ratio, through the stages' own functions. A broken setup (a
required package missing or broken, a device the profile asks for and does not have, a decode
mismatch, no free disk, a measurement that fails) exits with status 1.

Only the `freezecache doctor` command imports this module (no stage does).

Why it is long: one short function per part of the setup (packages, device, decode, disk, the
measurement and the report), each independent of the others; they are one command's report and
change together, and no other module uses them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.metadata as metadata
import json
import logging
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from freezecache.config import Config
from freezecache.core.disk import free_bytes, human
from freezecache.core.errors import first_line

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[3]  # the repository, when run from a checkout
MAX_ROUNDS = 5  # timed rounds of the measurement at most
MIN_FREE = 256 << 20  # less than this under the cache folder is a broken setup
REGISTERED_PLAIN = {"resnet20", "resnet32", "resnet44", "resnet56"}  # need neither timm nor tv


@dataclasses.dataclass
class Check:
    """One line of the report: ``status`` is ok, warn (works, with a cost), skip (not needed
    here) or fail (broken: exit status 1)."""

    section: str
    name: str
    status: str
    detail: str
    numbers: dict = dataclasses.field(default_factory=dict)


# -- packages --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Package:
    dist: str  # the distribution's name (pip install ...)
    module: str  # what is imported to see that it works
    needed: Callable[[Config], str | None]  # why the profile needs it, or None
    without: str  # what happens without it when not needed


def _always(why: str) -> Callable[[Config], str]:
    return lambda cfg: why


def _model_needs(*libs: str) -> Callable[[Config], str | None]:
    def needed(cfg: Config) -> str | None:
        name = cfg.model.name
        if name in REGISTERED_PLAIN:
            return None
        if name == "resnet50" and "torchvision" not in libs:
            return None
        return f"model.name: {name}"

    return needed


PACKAGES = (
    Package("torch", "torch", _always("training"), ""),
    Package("numpy", "numpy", _always("everything"), ""),
    Package("h5py", "h5py", _always("the cache files"), ""),
    Package("zstandard", "zstandard", _always("the quant codec's lossless stage"), ""),
    Package("pydantic", "pydantic", _always("params validation"), ""),
    Package("PyYAML", "yaml", _always("params files"), ""),
    Package("typer", "typer", _always("the commands"), ""),
    Package("psutil", "psutil", _always("stage wall time"), ""),
    Package("tqdm", "tqdm", _always("progress bars"), ""),
    Package("ptflops", "ptflops", _always("FLOPs of every training stage and the plan"), ""),
    Package("dvc", "dvc.repo", _always("the pipeline (dvc repro)"), ""),
    Package("dvclive", "dvclive", _always("the stages' curves and metrics"), ""),
    Package("timm", "timm", _model_needs("timm"), "only for timm models and DeiT"),
    Package(
        "torchvision",
        "torchvision",
        _model_needs("timm", "torchvision"),
        "only for resnet50 and timm models",
    ),  # fmt: skip
    Package(
        "numba",
        "numba",
        lambda c: "cache.coding: rans" if c.cache.coding == "rans" else None,
        "rANS coding unavailable; CPU training decodes through torch (slower)",
    ),  # fmt: skip
    Package(
        "zfpy",
        "zfpy",
        lambda c: "cache.codec: zfp" if c.cache.codec == "zfp" else None,
        "only for cache.codec: zfp",
    ),  # fmt: skip
    Package("vl-convert-python", "vl_convert", lambda c: None, "no `freezecache plots` / SVGs"),
)


def tested_ranges() -> dict[str, str]:
    """distribution (lower case) -> the range pyproject.toml declares (the versions tested),
    extras included; the installed package's metadata when there is no pyproject.toml."""
    pyproject = ROOT / "pyproject.toml"
    try:
        if pyproject.is_file():
            import tomllib

            project = tomllib.loads(pyproject.read_text())["project"]
            extras = project.get("optional-dependencies", {}).values()
            deps = [*project["dependencies"], *(d for group in extras for d in group)]
        else:
            deps = metadata.requires("freezecache") or []
    except Exception:  # noqa: BLE001 (Python 3.10 has no tomllib; not installed: no ranges)
        return {}
    out = {}
    for text in deps:
        if text.startswith("freezecache"):
            continue  # the `all` extra names the others
        spec = text.split(";")[0].strip()
        name = spec
        for sep in "<>=!~ [":
            name = name.split(sep)[0]
        out[name.lower()] = spec[len(name) :].strip()
    return out


def _in_range(version: str, spec: str) -> bool | None:
    """Whether ``version`` satisfies ``spec``; None when that cannot be told here."""
    if not spec:
        return True
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version

        return Version(version) in SpecifierSet(spec, prereleases=True)
    except Exception:  # noqa: BLE001 (no packaging module, or a local version it rejects)
        return None


def check_packages(cfg: Config) -> list[Check]:
    ranges = tested_ranges()
    out = []
    for p in PACKAGES:
        why = p.needed(cfg)
        try:
            version = metadata.version(p.dist)
        except metadata.PackageNotFoundError:
            version = None
        try:
            importlib.import_module(p.module)
            error = None
        except Exception as err:  # noqa: BLE001 (missing or broken)
            error = first_line(err)
        if error is None:
            label = version or "(version unknown)"
            spec = ranges.get(p.dist.lower(), "")
            inside = _in_range(version, spec) if version else True
            numbers = {"version": version, "tested": spec}
            if inside is False:
                detail = f"{label}: outside the tested range {spec}"
                out.append(Check("packages", p.dist, "warn", detail, numbers))
            else:
                detail = label + (f" (tested {spec})" if spec else "")
                out.append(Check("packages", p.dist, "ok", detail, numbers))
        elif why:
            fix = f"pip install {p.dist}"
            out.append(Check("packages", p.dist, "fail", f"{error} — needed for {why}; {fix}"))
        else:
            state = "not installed" if version is None else f"{version}, broken: {error}"
            out.append(Check("packages", p.dist, "skip", f"{state} — {p.without}"))
    return out


# -- device ------------------------------------------------------------------------------------
def _driver() -> str | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        done = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout else None


def check_device(cfg: Config) -> list[Check]:
    import torch
    import torch.distributed as dist

    from freezecache.core import runtime
    from freezecache.core.errors import FreezecacheError

    out = []
    built = torch.version.cuda
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        names = sorted({torch.cuda.get_device_name(i) for i in range(n)})
        free, total = torch.cuda.mem_get_info(0)
        bf16 = torch.cuda.is_bf16_supported()
        driver = _driver()
        out.append(Check(
            "device", "cuda", "ok",
            f"{n} x {', '.join(names)} ({total / 2**30:.0f} GiB), CUDA {built}"
            + (f", driver {driver}" if driver else "") + f", bf16 {'yes' if bf16 else 'no'}",
            {"count": n, "names": names, "cuda": built, "driver": driver, "bf16": bf16,
             "memory_gib": total / 2**30, "free_gib": free / 2**30},
        ))  # fmt: skip
        nccl = dist.is_available() and dist.is_nccl_available()
        version = ".".join(map(str, torch.cuda.nccl.version())) if nccl else None
        detail = f"NCCL {version}" if nccl else "not available: multi-GPU runs use gloo"
        out.append(Check("device", "nccl", "ok" if nccl else "warn", detail, {"nccl": version}))
    else:
        why = "torch is a CPU build" if built is None else f"torch built for CUDA {built}"
        detail = f"not available ({why}): training runs on the CPU"
        out.append(Check("device", "cuda", "ok", detail, {"count": 0}))
    try:
        device = runtime.pick_device(cfg.runtime.device)
    except FreezecacheError as err:
        out.append(Check("device", "profile", "fail", str(err)))
        return out
    want = cfg.distributed.nproc_per_node
    have = torch.cuda.device_count() if device.type == "cuda" else want
    status = "ok" if have >= want else "warn"
    detail = f"runtime.device {cfg.runtime.device} -> {device}, {want} process(es) per node"
    if status == "warn":
        detail += f" but {have} GPU(s)"
    out.append(Check("device", "profile", status, detail, {"device": str(device)}))
    return out


# -- decode on the device ----------------------------------------------------------------------
def _features(n: int = 8, shape=(16, 14, 14)) -> np.ndarray:
    """ReLU-like maps: half the samples with one-byte codes, half with two-byte codes."""
    g = np.random.default_rng(0)
    x = np.maximum(g.normal(size=(n, *shape)), 0).astype(np.float32)
    x[n // 2 :] *= 400.0
    return x


def check_decode(cfg: Config) -> list[Check]:
    """The quant codec of the profile (its tolerance, mode and coding) decoded on the training
    device (codes travel, ``q * step + lo`` runs there) against the CPU decode, bit for bit."""
    import torch

    from freezecache.cache import packed
    from freezecache.codecs.registry import make_codec
    from freezecache.core import runtime
    from freezecache.core.errors import FreezecacheError

    c = cfg.cache
    x = _features()
    shape = x.shape[1:]
    try:
        codec = make_codec("quant", c.tolerance_at(1), relative=c.relative, coding=c.coding)
        if c.relative:
            codec.calibrate(x)
        if c.coding == "rans":
            codec.quantize(x[None])  # fits the rANS tables, as the cache stage does
        blobs = [codec.encode(x[i : i + 1]) for i in range(len(x))]
        want = np.concatenate([codec.decode(b, (1, *shape)) for b in blobs])
        part = packed.pack(codec, blobs, [1] * len(x), shape, shape[0])
        lo_shape = codec.lo_shape((1, *shape))[1:]
        step = packed.steps(codec, shape)
    except FreezecacheError as err:
        return [Check("decode", "quant", "fail", str(err))]
    setting = f"quant {c.tolerance_at(1):g}{' relative' if c.relative else ''} {c.coding}"
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    try:
        training = str(runtime.pick_device(cfg.runtime.device))
    except FreezecacheError:
        training = "cpu"
    out = []
    for device in devices:
        got = packed.decode(part, shape, lo_shape, step, device).cpu().numpy()
        same = got.dtype == want.dtype and np.array_equal(got, want)
        what = "torch on the CPU" if device == "cpu" else f"the GPU ({device})"
        detail = f"{setting}: {what} vs the CPU decode (numpy), {want.size} values: " + (
            "equal bit for bit" if same else f"max diff {np.abs(got - want).max():.3g}"
        )
        out.append(Check("decode", device, "ok" if same else "fail", detail, {"equal": same}))
    if "cuda" not in devices:
        out.append(Check("decode", "cuda", "skip", "cuda: not available"))
    out[-1].numbers["training_device"] = training
    return out


# -- disk --------------------------------------------------------------------------------------
def check_disk(cfg: Config) -> list[Check]:
    where = Path(cfg.paths.cache)
    free = free_bytes(where)
    status = "ok" if free >= MIN_FREE else "fail"
    detail = f"{human(free)} free under {where}"
    if status == "fail":
        detail += f" (under {human(MIN_FREE)}): free space or set paths.cache"
    return [Check("disk", "cache", status, detail, {"free_bytes": free})]


# -- the measurement ---------------------------------------------------------------------------
def _small_prepared(cfg: Config, out: Path, samples: int) -> str:
    """A prepared folder of at most ``samples`` training images: the profile's prepared data
    when it exists, else synthetic images of the profile's shape. Returns what it used."""
    from freezecache.data import load_prepared, load_val
    from freezecache.data.sources import known_num_classes

    src = Path(cfg.paths.data)
    out.mkdir(parents=True)
    if (src / "meta.json").is_file():
        train, test, meta = load_prepared(src)
        val = load_val(src)
        splits = {"train": (train.images[:samples], train.labels[:samples]),
                  "test": (test.images[:128], test.labels[:128])}  # fmt: skip
        if val is not None:
            splits["val"] = (val.images[:128], val.labels[:128])
        used = f"{samples if len(train.labels) >= samples else len(train.labels)} images of {src}"
    else:
        d = cfg.data
        channels = d.channels or (1 if d.name == "fashion_mnist" else 3)
        classes = len(d.classes) if d.classes else (known_num_classes(d.name) or 10)
        g = np.random.default_rng(0)
        n = samples + 256
        images = g.integers(0, 256, (n, channels, d.img_size, d.img_size), dtype=np.uint8)
        labels = np.arange(n) % classes
        splits = {"train": (images[:samples], labels[:samples]),
                  "val": (images[samples : samples + 128], labels[samples : samples + 128]),
                  "test": (images[samples + 128 :], labels[samples + 128 :])}  # fmt: skip
        meta = {"name": d.name, "classes": [str(i) for i in range(classes)],
                "num_classes": classes, "channels": channels, "img_size": d.img_size,
                "mean": [0.5] * channels, "std": [0.29] * channels}  # fmt: skip
        used = f"{samples} synthetic images ({src} has no prepared data)"
    for name, (images, labels) in splits.items():
        np.savez(out / f"{name}.npz", images=images, labels=labels)
        meta[f"{name}_size"] = int(len(labels))
    if "val" not in splits:
        meta["val_size"] = 0
    (out / "meta.json").write_text(json.dumps(meta))
    return used


def _timed_epoch(trainer, spec, epoch: int) -> float:
    """Train ``spec`` for epoch ``epoch``; the training loop's seconds (validation apart)."""
    trainer.state.epoch = epoch
    trainer.fit(dataclasses.replace(spec, phase=spec.phase._replace(start=epoch, end=epoch + 1)))
    return float(trainer.state.history[-1]["epoch_time_s"])


def measure(cfg: Config, samples: int = 512, rounds: int = 3, budget_s: float = 8.0) -> dict:
    """One suffix epoch from a small cache (built by the cache stage's own function, trained as
    train_suffix trains: ``steps.suffix.suffix_spec``) against one FreezeOut epoch on the same
    images, in a scratch copy of the profile; a warm-up epoch each, then
    the fastest of at least ``rounds`` rounds, more (up to MAX_ROUNDS) while the timed epochs
    took under ``budget_s`` seconds in all (a fast device gets a steadier minimum)."""
    import copy

    from freezecache.config.scratch import scratch_profile
    from freezecache.core.methods import method
    from freezecache.pipeline import STAGES, start_of_point
    from freezecache.steps.cache import cache_point, frozen_model
    from freezecache.steps.context import Context
    from freezecache.steps.run import image_spec
    from freezecache.steps.suffix import cached_features, suffix_spec
    from freezecache.training.schedule import Phase
    from freezecache.training.train import RunState, Trainer

    names = cfg.methods.discard
    name = next((n for n in names if method(n).needs_ranking), names[0] if names else "discard")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="freezecache-doctor-") as tmp:
        used = _small_prepared(cfg, Path(tmp) / "data", samples)
        work = scratch_profile(cfg, Path(tmp), own_data=True, first_point=True,
                               rank_samples=samples)  # fmt: skip
        seed, point = work.seeds[0], work.points[0]
        RunState(model={}).save(STAGES["pretrain"].path("state", work))  # a seeded random init
        ctx = Context(work, seed, "train_suffix", method=name, p=point)
        RunState(model=ctx.new_model().state_dict()).save(start_of_point(work, seed, name, point))
        built = time.perf_counter()
        stats = cache_point(work, seed, name, point.i)
        build_s = time.perf_counter() - built
        model, _ = frozen_model(ctx, point)
        path = STAGES["cache"].path("cache", work, seed=seed, method=name, p=point)

        def trainer(m):
            return Trainer(m, work.train, seed=seed, device=ctx.device)

        m_suffix = copy.deepcopy(model)
        features = cached_features(ctx, path, name, m_suffix, point.block)
        spec_s = suffix_spec(ctx, m_suffix, point.block, features, (0, 1))
        m_freeze = copy.deepcopy(model)
        spec_f = image_spec(ctx, m_freeze, Phase("freeze", point.block, 0, 1))
        runs = {"suffix": (trainer(m_suffix), spec_s), "freezeout": (trainer(m_freeze), spec_f)}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for epoch in range(MAX_ROUNDS + 1):  # epoch 0 warms up (kernels, allocators, numba)
            for key, (t, spec) in runs.items():
                seconds = _timed_epoch(t, spec, epoch)
                if epoch:
                    times[key].append(seconds)
            timed = sum(sum(v) for v in times.values())
            if epoch >= rounds and timed >= budget_s:
                break
        flops_ratio = None
        with contextlib.suppress(Exception):  # a broken ptflops is reported with the packages
            from freezecache.accounting.flops import part_flops

            meta = ctx.meta
            part = part_flops(model, point.block, (meta["channels"], meta["img_size"],
                                                   meta["img_size"]))  # fmt: skip
            flops_ratio = 3 * part["suffix_fwd"] / (3 * part["suffix_fwd"] + part["prefix_fwd"])
        best = {k: min(v) for k, v in times.items()}
        return {
            "ratio": best["suffix"] / best["freezeout"],
            "suffix_epoch_s": best["suffix"],
            "freezeout_epoch_s": best["freezeout"],
            "epochs_s": times,
            "flops_ratio": flops_ratio,
            "samples": len(ctx.train),
            "data": used,
            "method": name,
            "block": point.block,
            "device": str(ctx.device),
            "cache_build_s": build_s,
            "compression_ratio": stats.get("compression_ratio"),
            "seconds": time.perf_counter() - start,
            "load_per_core": _load_per_core(),
        }


def _load_per_core() -> float | None:
    """The 1-minute load average per core: above 1, other work shares the cores (noisy times)."""
    try:
        import os

        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except (AttributeError, OSError):
        return None


def check_measure(cfg: Config, samples: int) -> list[Check]:
    try:
        m = measure(cfg, samples)
    except Exception as err:  # noqa: BLE001 (any failure of the pipeline's own code is a finding)
        log.debug("measurement failed", exc_info=True)
        return [Check("measure", "epoch", "fail", f"{type(err).__name__}: {first_line(err)}")]
    flops = f", FLOPs ratio {m['flops_ratio']:.2f}" if m["flops_ratio"] else ""
    detail = (
        f"suffix epoch from the cache {m['suffix_epoch_s']:.2f} s / FreezeOut epoch "
        f"{m['freezeout_epoch_s']:.2f} s = {m['ratio']:.2f}{flops} ({m['method']}, block "
        f"{m['block']}, {m['samples']} samples on {m['device']}, {m['seconds']:.0f} s in all)"
    )
    load = m["load_per_core"]
    if m["device"] == "cpu" and load is not None and load > 1:
        detail += f"; other work is running (load {load:.1f} per core): the times are noisy"
    return [Check("measure", "epoch", "ok", detail, m)]


# -- the report --------------------------------------------------------------------------------
def load_profile(params: Path) -> tuple[Config, str]:
    """The params file's config, or the default profile when there is none."""
    from freezecache.config import load_config

    if params.is_file():
        return load_config(params), str(params)
    return Config(), f"no {params}: the default profile"


def run_checks(cfg: Config, *, measure_epochs: bool = True, samples: int = 512) -> list[Check]:
    checks = check_packages(cfg)
    if any(c.status == "fail" and c.name in ("torch", "numpy") for c in checks):
        return checks  # nothing below can run
    for part in (check_device, check_decode, check_disk):
        try:
            checks += part(cfg)
        except Exception as err:  # noqa: BLE001 (a broken package shows here as a failed part)
            checks.append(Check(part.__name__[6:], "error", "fail", first_line(err)))
    if measure_epochs:
        if any(c.status == "fail" for c in checks):
            checks.append(Check("measure", "epoch", "skip", "skipped: fix the failures first"))
        else:
            checks += check_measure(cfg, samples)
    return checks


MARK = {"ok": "ok", "warn": "WARN", "skip": "--", "fail": "FAIL"}


def render(checks: list[Check], source: str, cfg: Config) -> str:
    c = cfg.cache
    lines = [
        f"freezecache doctor — {source}: {cfg.model.name} on {cfg.data.name}, cache "
        f"{c.codec} ({c.coding}), runtime.device {cfg.runtime.device}",
        f"python {platform.python_version()} ({sys.executable}), {platform.system()} "
        f"{platform.machine()}",
    ]
    section = None
    for check in checks:
        if check.section != section:
            section = check.section
            lines.append(f"{section}:")
        lines.append(f"  {MARK[check.status]:<4}  {check.name:<17} {check.detail}")
    failed = [f"{x.section}/{x.name}" for x in checks if x.status == "fail"]
    warned = sum(x.status == "warn" for x in checks)
    verdict = f"broken: {', '.join(failed)}" if failed else "ok"
    lines.append(f"result: {verdict}" + (f" ({warned} warning(s))" if warned else ""))
    return "\n".join(lines)


def to_json(checks: list[Check], source: str) -> dict:
    return {
        "source": source,
        "ok": not any(c.status == "fail" for c in checks),
        "python": platform.python_version(),
        "checks": [dataclasses.asdict(c) for c in checks],
    }
