"""Faults as a user meets them, through DVC on the smoke profile: a SIGKILL at a seeded random
point of every stage kind, then `dvc repro`, gives the outputs of an uninterrupted run; a full
disk, a corrupt cache and a path outside the repository each give one clear line."""

import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import env_with_venv, needs_fashion, run
from freezecache.core.io import tensors_digest
from freezecache.reporting.provenance import SUFFIX as PROVENANCE
from freezecache.training.train import RunState

# Machine measurements, not results: they differ between any two runs.
TIMING = {
    "epoch_time_s", "samples_per_s", "data_wait_frac", "stage_wall_s", "peak_rss_mb",
    "wall_time_s", "build_s", "decode_s", "decode_mb_s", "encode_s", "encode_mb_s",
    "assemble_s", "resumed_samples", "timestamp", "compress_mb_s", "decompress_mb_s",
    "free_bytes", "step_time_s", "step_times_s", "time_ratio", "stage_seconds", "timings", "time",
}  # fmt: skip
# One stage of each kind (matrix stages: one item), killed at a seeded random point.
KINDS = [
    "prepare",
    "pretrain",
    "plan",
    "train_prefix@0",
    "baseline@0-freezeout",
    "cache@0-discard_aug-p1",
    "train_suffix@0-discard_aug-p0",
    "tradeoffs",
    "report",
]


def _strip(value):
    """JSON content without machine timings (nested)."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _fingerprint(repo: Path) -> dict:
    """Every output of the run: weights and histories, cache bytes, JSON minus timings."""
    out = {}
    for f in sorted(repo.joinpath("runs").rglob("state.pt")):
        s = RunState.load(f)
        out[str(f.relative_to(repo))] = (tensors_digest(s.model), _strip(s.history), s.epoch)
    for f in sorted(repo.joinpath("data/cache").rglob("*.h5")):
        out[str(f.relative_to(repo))] = f.read_bytes()
    for f in sorted(
        [*repo.joinpath("runs").rglob("*.json"), *repo.joinpath("results").rglob("*.json")]
    ):
        if not f.name.endswith(PROVENANCE):  # when and where a result was made: not a result
            out[str(f.relative_to(repo))] = _strip(json.loads(f.read_text()))
    for f in sorted(repo.joinpath("data/prepared").glob("*.npz")):
        out[str(f.relative_to(repo))] = f.read_bytes()
    return out


@pytest.fixture(scope="module")
def reference(smoke_run):
    """The smoke pipeline run once, uninterrupted (shared), its outputs' fingerprint and each
    stage's seconds."""
    repo, _, seconds = smoke_run
    return repo, _fingerprint(repo), seconds


def _copy(repo: Path, dest: Path) -> Path:
    shutil.copytree(repo, dest, symlinks=True)
    return dest


def _started(proc: subprocess.Popen) -> threading.Event:
    """Set once DVC says it runs the stage (its output read to the end meanwhile, so a full
    pipe never stalls the stage)."""
    started = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            if line.startswith("Running stage '"):
                started.set()

    threading.Thread(target=read, daemon=True).start()
    return started


@pytest.mark.slow
@needs_fashion
@pytest.mark.parametrize("target", KINDS)
def test_sigkill_at_a_random_point_then_repro_gives_the_same_outputs(reference, tmp_path, target):
    repo, expected, seconds = reference
    work = _copy(repo, tmp_path / "work")
    rng = random.Random(f"{target}-kill")
    delay = rng.uniform(0.2, 0.9) * seconds[target]  # into the stage, as long as it took there
    proc = subprocess.Popen(
        ["dvc", "repro", "--force", "--single-item", target],
        cwd=work,
        env=env_with_venv(work / "src"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: dvc and the stage it runs
    )
    assert _started(proc).wait(timeout=300), f"{target} never started"
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    run(["dvc", "repro"], work)
    got = _fingerprint(work)
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key] == value, f"{key} differs after a kill at {delay:.1f}s into {target}"
    assert "Running stage" not in run(["dvc", "repro"], work).stdout


@pytest.mark.slow
@needs_fashion
def test_a_corrupt_cache_is_refused_in_one_line_before_training(reference, tmp_path):
    repo, _, _ = reference
    work = _copy(repo, tmp_path / "work")
    cache = work / "data/cache/s0/discard/p0.h5"
    cache.chmod(0o644)
    import h5py

    with h5py.File(cache, "r+") as f:
        y = f["y"][()]
        y[:8] = 7
        f["y"][:] = y
    done = run(
        ["python", "stages/train_suffix.py", "--seed", "0", "--method", "discard", "--point", "0"],
        work,
        check=False,
    )
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1, done.stderr[-2000:]
    assert "'y' does not match its digest" in errors[0] and "Traceback" not in done.stderr


def _can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.mark.slow
@needs_fashion
@pytest.mark.skipif(not _can_mount(), reason="needs root to mount a small tmpfs")
def test_a_full_disk_stops_the_cache_stage_in_one_line_and_a_rerun_succeeds(reference, tmp_path):
    repo, expected, _ = reference
    work = _copy(repo, tmp_path / "work")
    small = work / "data/cache"
    shutil.rmtree(small)
    small.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)])
    if done.returncode != 0:
        pytest.skip("mount refused in this sandbox")
    try:
        target = "cache@0-discard-p0"
        # --force: the run cache would otherwise restore the reference's output instead of running
        failed = run(["dvc", "repro", "--force", "--single-item", target], work, check=False)
        text = failed.stdout + failed.stderr
        assert failed.returncode != 0
        assert "needs about" in text and "free" in text and "Traceback" not in text, text[-2000:]
        assert not (small / "s0/discard/p0.h5").exists()
        subprocess.run(["mount", "-o", "remount,size=64m", str(small)], check=True)
        run(["dvc", "repro", "--force", "--single-item", target], work)
        assert (small / "s0/discard/p0.h5").read_bytes() == expected["data/cache/s0/discard/p0.h5"]
    finally:
        subprocess.run(["umount", "-l", str(small)])


def test_a_path_outside_the_repository_is_refused_by_check(tmp_path):
    import yaml

    from conftest import load_profile

    raw = load_profile("smoke")
    raw["paths"]["cache"] = "/some/abs/path"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    done = run(["freezecache", "check"], tmp_path, check=False)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1
    assert "paths.cache = '/some/abs/path' is outside the repository" in errors[0]
