"""Resume keys (pipeline.keys) and `freezecache gc`: what no current params can resume goes,
with its size; what the current stages resume, or may once their inputs exist, stays."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import yaml

from conftest import load_profile, run
from freezecache.config import load_config
from freezecache.pipeline import STAGES
from freezecache.pipeline.keys import HALF, inputs_key, params_key, run_key
from freezecache.tooling import gc


def _project(tmp_path: Path, monkeypatch, **changes) -> object:
    """A smoke project folder with the inputs of train_prefix@0 built (and the schedule views
    check writes); its config."""
    raw = load_profile("smoke")
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        raw[section][key] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    for rel in ("runs/params.ok", "runs/allowed_blocks.json", "runs/pretrain/state.pt",
                "data/prepared/train.npz", "data/weights/.keep", "runs/schedule_views/prefix.json",
                "runs/schedule_views/normal.json"):  # fmt: skip
        Path(rel).parent.mkdir(parents=True, exist_ok=True)
        Path(rel).write_text(rel)
    return load_config(Path("params.yaml"))


def test_the_key_follows_the_declared_params_and_deps(tmp_path, monkeypatch):
    cfg = _project(tmp_path, monkeypatch)
    item = {"seed": 0, "method": "normal"}
    key = run_key(cfg, "baseline", item)
    assert len(key) == 2 * HALF
    lr = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": 0.5})})
    assert params_key(lr, "baseline") != params_key(cfg, "baseline")  # train.lr: declared
    codec = cfg.model_copy(update={"cache": cfg.cache.model_copy(update={"tolerance": 0.5})})
    assert run_key(codec, "baseline", item) == key  # the cache is not baseline's business
    assert inputs_key(cfg, "baseline", item) == (key[HALF:], False)  # no prefix state yet
    Path("runs/s0/prefix").mkdir(parents=True)
    Path("runs/s0/prefix/state.pt").write_text("prefix")
    Path("runs/s0/prefix/decision.json").write_text("{}")
    inputs, complete = inputs_key(cfg, "baseline", item)
    assert complete and inputs != key[HALF:]
    Path("data/prepared/val.npz").write_text("a new file in a folder dep")
    assert inputs_key(cfg, "baseline", item)[0] != inputs
    assert STAGES["baseline"].item_name(item) == "baseline@0-normal"


def _entry(folder: Path, name: str, size: int) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if name.endswith("/"):
        path.mkdir()
        (path / "x.bin").write_bytes(b"\0" * size)
    else:
        path.write_bytes(b"\0" * size)
    return path


def test_gc_frees_what_no_current_params_resume(tmp_path, monkeypatch):
    cfg = _project(tmp_path, monkeypatch)
    prefix = Path(".ckpt/train_prefix@0")
    key = run_key(cfg, "train_prefix", {"seed": 0})
    earlier = _project(tmp_path, monkeypatch, **{"train.lr": 0.5})
    old_params = run_key(earlier, "train_prefix", {"seed": 0})
    cfg = _project(tmp_path, monkeypatch)
    old_inputs = key[:HALF] + "0" * HALF
    dead = 2**22 + 12345  # beyond the pid range: no such process
    kept = {
        _entry(prefix, f"{key}.pt", 1000),
        _entry(prefix, f"{key}.prev.pt", 1000),
        _entry(Path(".ckpt/pretrain"), f"{run_key(cfg, 'pretrain', {'seed': 0})}.pt", 10),
    }
    stale = {
        _entry(prefix, f"{old_params}.pt", 3000),
        _entry(prefix, f"{old_inputs}.pt", 2000),
        _entry(prefix, f".{key}.pt.{dead}.tmp", 500),
        _entry(prefix, "0123.pt", 7),  # an older version's key
        _entry(Path(".ckpt/baseline@7-normal"), f"{key}.pt", 100),  # seed 7: not in params
        _entry(Path(".ckpt/cache@0-discard-p1"), f"{old_params}/", 4000),
    }
    # a cache build of other params that is running now: its spool is locked, so it stays
    busy = _entry(Path(".ckpt/cache@0-discard-p0"), f"{old_params}/", 10)
    fd = os.open(busy / "lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    kept.add(busy)
    # the suffix of p1 waits for p0's state: same params, other inputs, may resume
    suffix = run_key(cfg, "train_suffix", {"seed": 0, "method": "discard", "p": cfg.points[1]})
    kept.add(_entry(Path(".ckpt/train_suffix@0-discard-p1"), f"{suffix[:HALF]}{'1' * HALF}.pt", 5))
    # a state file's write killed midway, and one being written now
    stale.add(_entry(Path("runs/s0/prefix"), f".state.pt.{dead}.tmp", 100))
    live = _entry(Path("runs/s0/prefix"), f".costs.json.{os.getpid()}.tmp", 100)
    try:
        entries = gc.scan(cfg)
        assert {e.path for e in entries if e.stale} == stale
        assert {e.path for e in entries if not e.stale} == kept
        why = {e.path.name: e.why for e in entries}
        assert why[f"{old_params}.pt"] == "earlier params"
        assert why[f"{old_inputs}.pt"] == "earlier inputs"
        assert why[f".{key}.pt.{dead}.tmp"] == "left by an interrupted write"
        text = gc.render(entries, dry_run=True)
        assert text.splitlines()[-1] == "would free 9.7 KB in 7 entries; kept 2.0 KB in 5 entries"
        assert all(p.exists() for p in stale)  # a dry run removes nothing
        gc.free(entries)
        assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
        assert live.exists()
        assert not Path(".ckpt/baseline@7-normal").exists()  # empty folders go too
    finally:
        os.close(fd)


def test_gc_command_lists_sizes_and_frees(tmp_path, monkeypatch):
    cfg = _project(tmp_path, monkeypatch)
    earlier = _entry(Path(".ckpt/baseline@9-normal"), "x.pt", 2_500_000)
    done = run(["freezecache", "gc", "--dry-run"], tmp_path)
    assert "2.5 MB  stale  .ckpt/baseline@9-normal/x.pt  (no stage of params.yaml)" in done.stdout
    assert done.stdout.splitlines()[-1].startswith("would free 2.5 MB in 1 entry")
    assert earlier.exists()
    done = run(["freezecache", "gc"], tmp_path)
    assert done.stdout.splitlines()[-1].startswith("freed 2.5 MB in 1 entry")
    assert not earlier.exists() and cfg.paths.checkpoints == ".ckpt"
