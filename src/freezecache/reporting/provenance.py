"""Where a result came from: a sidecar ``<result>.provenance.json`` next to each generated result.

It records the command, the commit (and whether the working copy differed from it), the profile
and the digest of its params, a digest per file of the code the result depends on, a digest per
file written, the machine (CPU model, cores, torch threads, device), the date and how long the
producer took. ``freezecache results status`` compares it with the checkout; ``freezecache
readme`` prints one line of it under each section.

Why a sidecar and not a field inside each result: results come as Markdown, CSV and SVG as well
as JSON, and a result must stay the same bytes when rerun with the same seed (the date and the
machine move on every run); the sidecar holds what moves, the result what does not. One sidecar
covers every file a producer writes in one run (the report's seven files, the bench's four).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

from freezecache.core.io import atomic_write_json, file_digest

SUFFIX = ".provenance.json"
VERSION = 1
PROFILES = "configs"  # the named profiles, configs/<name>.yaml


def sidecar(result: Path) -> Path:
    """The provenance file of a result, named by its first file (plan.md: plan + SUFFIX)."""
    return result.with_name(result.stem + SUFFIX)


# -- what went in -------------------------------------------------------------------------------
def load_params(path: Path) -> dict:
    """A params file as a plain mapping (what its digest and the changed keys are taken of)."""
    return yaml.safe_load(path.read_text()) or {}


def subset(params: dict, keys: list[str] | None) -> dict:
    """The values of dotted ``keys`` (``train.lr``, ``cache``) of a params mapping; all of it
    when ``keys`` is None."""
    if keys is None:
        return params
    out = {}
    for key in keys:
        node: object = params
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out[key] = node
    return out


def digest(obj: object) -> str:
    """A short digest of a JSON-able value, independent of key order."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def profile_of(params: dict, root: Path) -> str | None:
    """The name of the profile in configs/ whose content ``params`` is, or None."""
    for path in sorted((root / PROFILES).glob("*.yaml")):
        if load_params(path) == params:
            return path.stem
    return None


def code_digests(files: list[str], root: Path) -> dict[str, str]:
    """Repository path -> digest of each code file (``missing`` for one that is gone)."""
    return {
        f: file_digest(root / f)[:16] if (root / f).is_file() else "missing" for f in sorted(files)
    }


def _rel(path: Path, root: Path) -> str:
    path = Path(os.path.abspath(path))
    try:
        return path.relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def commit(root: Path, files: list[str]) -> tuple[str | None, bool | None]:
    """HEAD's commit, and whether any of ``files`` differs from it in the working copy (None
    when ``root`` is not a git checkout)."""
    head = _git(root, "rev-parse", "HEAD")
    if head is None:
        return None, None
    changed = _git(root, "status", "--porcelain", "--untracked-files=all", "--", *files)
    return head, bool(changed) if changed is not None else None


def machine(device: str | None = None) -> dict:
    """CPU model, cores, torch's intra-op threads in this process, and the device."""
    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import torch

    if device is None:
        device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    threads = torch.get_num_threads()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": threads, "device": device}


def command_line() -> str:
    """How this process was started, as a user would type it (``python stages/report.py``,
    ``freezecache sweep``)."""
    argv = list(sys.argv)
    head = argv[0]
    if head.endswith(".py"):
        head = "python " + _rel(Path(head), Path.cwd())
    else:
        head = Path(head).name
    return " ".join([head, *(shlex.quote(a) for a in argv[1:])])


def _process_seconds() -> float | None:
    """Wall seconds since this process started (what a benchmark took)."""
    try:
        import psutil

        return time.time() - psutil.Process().create_time()
    except Exception:  # noqa: BLE001 (psutil missing or the process table unreadable: no time)
        return None


# -- writing and reading ------------------------------------------------------------------------
def record(
    path: Path,
    files: list[Path],
    *,
    code: list[str],
    params: Path | None,
    root: Path,
    keys: list[str] | None = None,
    duration_s: float | None = None,
    device: str | None = None,
    command: str | None = None,
) -> dict:
    """Writes the provenance of ``files`` (just written) to ``path`` and returns it.

    ``code``: repository paths of the code they depend on; ``params``: the params file they were
    made from (None: no params); ``keys``: the params keys they depend on (None: all);
    ``duration_s``: how long making them took (default: this process's age); ``command``: what
    made them (default: this process's command line)."""
    raw = load_params(params) if params is not None else None
    profile = profile_of(raw, root) if raw is not None else None
    watched = list(code)
    if params is not None:
        watched.append(f"{PROFILES}/{profile}.yaml" if profile else _rel(params, root))
    head, dirty = commit(root, watched)
    rec = {
        "version": VERSION,
        "command": command or command_line(),
        "commit": head,
        "dirty": dirty,
        "profile": profile,
        "params_file": _rel(params, root) if params is not None else None,
        "params_keys": keys,
        "params_digest": digest(subset(raw, keys)) if raw is not None else None,
        "code_digest": digest(code_digests(code, root)),
        "machine": machine(device),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(duration_s if duration_s is not None else _process_seconds() or 0, 1),
        "files": {_rel(f, root): file_digest(f)[:16] for f in files},
        "code": code_digests(code, root),
        "params": raw,
    }
    atomic_write_json(path, rec)
    return rec


def record_stage(name: str, cfg, params: Path, duration_s: float | None = None) -> dict:
    """The provenance of pipeline stage ``name``'s git-tracked outputs, written to its
    ``provenance`` output: its code is its own and every upstream stage's."""
    from freezecache.pipeline import STAGES
    from freezecache.pipeline.deps import ROOT, pipeline_code, pipeline_params

    stage = STAGES[name]
    files = [stage.path(r, cfg) for r, o in stage.outs.items() if not o.cache and r != "provenance"]
    return record(stage.path("provenance", cfg), files, code=pipeline_code(name, ROOT),
                  params=params, root=ROOT, keys=pipeline_params(name),
                  duration_s=duration_s)  # fmt: skip


def read(path: Path) -> dict | None:
    """A provenance file, or None when there is none (or it is not one)."""
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except ValueError:
        return None
    return rec if isinstance(rec, dict) and rec.get("version") == VERSION else None


# -- comparing with the checkout ----------------------------------------------------------------
def _changed_keys(old: object, new: object, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two params mappings."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new), key=str)
        out = []
        for k in keys:
            out += _changed_keys(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def _listed(items: list[str], most: int = 3) -> str:
    shown = ", ".join(items[:most])
    return shown + (f" (+{len(items) - most} more)" if len(items) > most else "")


def changes(rec: dict, *, code: list[str], profile: str | None, root: Path) -> list[str]:
    """What changed since ``rec`` was written, one short phrase each (empty: current).

    ``code``: the files of code the result depends on now; ``profile``: the profile it must be
    made from (None: it reads no params)."""
    out = []
    if profile is not None:
        if rec.get("profile") != profile:
            made = rec.get("profile") or f"{rec.get('params_file')}, no profile"
            out.append(f"made from {made}, not configs/{profile}.yaml")
        else:
            keys = rec.get("params_keys")
            now = subset(load_params(root / PROFILES / f"{profile}.yaml"), keys)
            if digest(now) != rec.get("params_digest"):
                keys = _changed_keys(subset(rec.get("params") or {}, keys), now)
                out.append(f"params of configs/{profile}.yaml: {_listed(keys) or 'changed'}")
    then, now = rec.get("code", {}), code_digests(code, root)
    moved = sorted(f for f in set(then) | set(now) if then.get(f) != now.get(f))
    if moved:
        out.append(f"code: {_listed(moved)}")
    files = [
        f
        for f, d in rec.get("files", {}).items()
        if not (root / f).is_file() or file_digest(root / f)[:16] != d
    ]
    if files:
        out.append(f"files changed after it was made: {_listed(sorted(files))}")
    return out


def line(rec: dict) -> str:
    """One short line for the README: command, commit, profile and params, code, machine, date,
    time taken."""
    m = rec.get("machine", {})
    cpu = (m.get("cpu") or "?").replace("(R)", "").replace("(TM)", "").replace(" CPU", "")
    cpu = cpu.split(" @ ")[0]
    head = (rec.get("commit") or "no commit")[:9]
    if rec.get("dirty"):
        head += " + uncommitted changes"
    params = (
        f"profile {rec['profile'] or rec['params_file']} (params {rec['params_digest'][:8]})"
        if rec.get("params_digest")
        else "no params"
    )
    threads = m.get("torch_threads")
    where = f"{cpu}, {m.get('cores')} cores" + (f", {threads} torch threads" if threads else "")
    minutes = (rec.get("duration_s") or 0) / 60
    took = f"{minutes:.0f} min" if minutes >= 1 else f"{rec.get('duration_s', 0):.0f} s"
    return (
        f"`{rec.get('command')}` · commit {head} · {params} · code {rec['code_digest'][:8]} · "
        f"{where}, {m.get('device')} · {rec.get('date', '?')[:10]} · {took}"
    )
