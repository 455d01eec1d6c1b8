"""Faults as a user meets them, through DVC on the smoke profile: a SIGKILL at a seeded random
point of every stage kind, then `dvc repro`, gives the outputs of an uninterrupted run; a kill
after a training stage's first checkpoint, or two SIGINTs 1 ms apart, then `dvc repro`, give its
very bytes (so nothing downstream reruns); a flipped byte in a checkpoint costs an epoch, one in
an input state stops the stage in one line; a full disk, a corrupt cache and a path outside the
repository each give one clear line."""

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import env_with_venv, needs_fashion, run
from freezecache.core.io import tensors_digest
from freezecache.core.yamlio import dump_yaml
from freezecache.reporting.provenance import SUFFIX as PROVENANCE
from freezecache.training.train import RunState
from state_bytes import flip, tensor_spans

# Machine measurements, not results: they differ between any two runs.
TIMING = {
    "epoch_time_s", "samples_per_s", "data_wait_frac", "stage_wall_s", "peak_rss_mb",
    "wall_time_s", "build_s", "decode_s", "decode_mb_s", "encode_s", "encode_mb_s",
    "assemble_s", "resumed_samples", "timestamp", "compress_mb_s", "decompress_mb_s",
    "free_bytes", "step_time_s", "step_times_s", "time_ratio", "stage_seconds", "timings", "time",
    "schedule_time",  # the plan's predicted seconds for the configured schedule
}  # fmt: skip
# One stage of each kind (matrix stages: one item), killed at a seeded random point. In `make
# test` (CI) the kinds no other test here kills: pretrain and train_prefix resume from their
# checkpoints below (RESUMED); plan and tradeoffs only measure and write atomically, as report
# does. Those four run in `make test-all`.
_TEST_ALL = pytest.mark.extended
KINDS = [
    "prepare",
    pytest.param("pretrain", marks=_TEST_ALL),
    pytest.param("plan", marks=_TEST_ALL),
    pytest.param("train_prefix@0", marks=_TEST_ALL),
    "baseline@0-freezeout",
    "cache@0-discard_aug-p1",
    "train_suffix@0-discard_aug-p0",
    pytest.param("tradeoffs", marks=_TEST_ALL),
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
    assert _ran(run(["dvc", "repro"], work).stdout) == {"check"}  # it always runs: nothing else


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

    from conftest import load_profile

    raw = load_profile("smoke")
    raw["paths"]["cache"] = "/some/abs/path"
    (tmp_path / "params.yaml").write_text(dump_yaml(raw))
    done = run(["freezecache", "check"], tmp_path, check=False)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1
    assert "paths.cache = '/some/abs/path' is outside the repository" in errors[0]


# -- resumed runs publish the same bytes; interrupts stop cleanly -------------------------------
RESUMED = ["pretrain", "train_prefix@0", "train_suffix@0-discard-p0"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run_outs(name: str) -> list[str]:
    """A training stage item's state, costs and metrics files, relative to the project."""
    folder = {
        "pretrain": "runs/pretrain",
        "train_prefix@0": "runs/s0/prefix",
        "baseline@0-normal": "runs/s0/normal",
        "train_suffix@0-discard-p0": "runs/s0/discard/p0",
    }[name]
    return [f"{folder}/state.pt", f"{folder}/costs.json", f"{folder}/live/metrics.json"]


def _repro(work: Path, log: Path, *args: str) -> subprocess.Popen:
    """`dvc repro ARGS` in its own process group, its output to ``log``."""
    return subprocess.Popen(
        ["dvc", "repro", *args],
        cwd=work,
        env=env_with_venv(work / "src"),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stop_when(proc: subprocess.Popen, ready, signals: list[int], timeout: float = 900) -> int:
    """Waits until ``ready()``, then sends ``signals`` to the process group 1 ms apart."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, "the stage ended before the moment to stop it"
        assert time.time() < deadline, "the moment to stop the stage never came"
        time.sleep(0.02)
    for i, sig in enumerate(signals):
        if i:
            time.sleep(0.001)
        os.killpg(proc.pid, sig)
    return proc.wait(timeout=600)


def _checkpoints(work: Path, name: str) -> list[Path]:
    folder = work / ".ckpt" / name
    return sorted(folder.glob("*.pt")) if folder.is_dir() else []


def _ran(text: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", text))


def _assert_published_as(work: Path, repo: Path, name: str) -> None:
    """The stage's files as the uninterrupted run wrote them: the state byte for byte, costs
    and metrics but for machine timings; its checkpoint folder gone."""
    state, *jsons = _run_outs(name)
    assert _sha(work / state) == _sha(repo / state), f"{state} has other bytes"
    for rel in jsons:
        got, want = (_strip(json.loads((d / rel).read_text())) for d in (work, repo))
        assert got == want, rel
    assert not (work / ".ckpt" / name).exists(), "a finished stage removes its checkpoints"


@pytest.mark.slow
@needs_fashion
@pytest.mark.parametrize("name", RESUMED)
def test_killed_after_its_first_checkpoint_a_stage_resumes_to_the_same_bytes(
    reference, tmp_path, name
):
    repo, _, _ = reference
    work = _copy(repo, tmp_path / "work")
    proc = _repro(work, tmp_path / "killed.log", "--force", "--single-item", name)
    _stop_when(proc, lambda: _checkpoints(work, name), [signal.SIGKILL])
    assert not (work / _run_outs(name)[0]).exists(), "the kill came after the stage published"
    _resume_and_compare(work, repo, name)


def _resume_and_compare(work: Path, repo: Path, name: str) -> str:
    """Reruns the stage (forced: DVC would restore its outputs from its cache), checks that it
    resumed and published the uninterrupted run's files, and that nothing downstream reruns
    but the report (which reads every stage's wall time); returns the rerun's output."""
    done = run(["dvc", "repro", "--force", "--single-item", name], work)
    text = done.stdout + done.stderr
    assert f"resuming {name} from its checkpoint" in text, text[-3000:]
    _assert_published_as(work, repo, name)
    after = run(["dvc", "repro", "--no-run-cache"], work)
    assert _ran(after.stdout) == {"check", "report"}, after.stdout[-3000:]
    return text


def _interrupted_cleanly(log: Path, code: int) -> str:
    text = log.read_text()
    assert code != 0, "an interrupted stage must not be recorded as done"
    assert "Traceback" not in text and "Exception ignored" not in text, text[-3000:]
    errors = [line for line in text.splitlines() if line.startswith("error: interrupted by")]
    assert len(errors) == 1 and "SIGINT" in errors[0], text[-3000:]
    return text


@pytest.mark.slow
@needs_fashion
def test_a_training_stage_interrupted_killed_and_damaged_resumes_to_the_same_bytes(
    reference, tmp_path
):
    """baseline@0-normal (two epochs here): two SIGINTs 1 ms apart after its first checkpoint
    stop it in one line; resumed, it is killed after its second; a byte flipped in that
    checkpoint's tensor data drops it, and the run goes on from the first: the published
    state is still the uninterrupted run's, byte for byte."""
    repo, _, _ = reference
    name = "baseline@0-normal"
    work = _copy(repo, tmp_path / "work")
    log = tmp_path / "interrupted.log"
    proc = _repro(work, log, "--force", "--single-item", name)
    code = _stop_when(proc, lambda: _checkpoints(work, name), [signal.SIGINT, signal.SIGINT])
    _interrupted_cleanly(log, code)
    assert not (work / _run_outs(name)[0]).exists()
    (latest,) = _checkpoints(work, name)
    first = latest.stat().st_ino

    log = tmp_path / "resumed.log"
    proc = _repro(work, log, "--force", "--single-item", name)
    _stop_when(proc, lambda: latest.exists() and latest.stat().st_ino != first, [signal.SIGKILL])
    assert f"resuming {name} from its checkpoint at epoch 2" in log.read_text()
    assert RunState.load(latest).epoch == 3 and not (work / _run_outs(name)[0]).exists()
    start, end = max(tensor_spans(latest), key=lambda s: s[1] - s[0])
    flip(latest, (start + end) // 2)

    text = _resume_and_compare(work, repo, name)
    dropped = [line for line in text.splitlines() if "content does not match its digest" in line]
    assert len(dropped) == 1 and str(latest.relative_to(work)) in dropped[0], text[-3000:]
    assert f"resuming {name} from its checkpoint at epoch 2" in text


@pytest.mark.slow
@needs_fashion
def test_a_cache_build_interrupted_twice_publishes_nothing_and_reruns_to_the_same_file(
    reference, tmp_path
):
    repo, _, _ = reference
    name = "cache@0-discard_aug-p1"
    outs = ["data/cache/s0/discard_aug/p1.h5", "runs/s0/discard_aug/p1/ranking.json",
            "runs/s0/discard_aug/p1/cache.json"]  # fmt: skip
    work = _copy(repo, tmp_path / "work")
    folder = work / ".ckpt" / name
    log = tmp_path / "interrupted.log"
    proc = _repro(work, log, "--force", "--single-item", name)
    spool = lambda: [p for p in folder.glob("*/identity.json")] if folder.is_dir() else []  # noqa: E731
    code = _stop_when(proc, spool, [signal.SIGINT, signal.SIGINT])
    _interrupted_cleanly(log, code)
    assert not [rel for rel in outs if (work / rel).exists()], "an interrupted build published"
    # what earlier params left in the stage's folder goes once the stage is done
    other = folder / ("0" * 32)  # a key of other params
    other.mkdir()
    (other / "x.bin").write_bytes(b"x" * 1000)

    committed = any(j.stat().st_size for j in folder.glob("*/journal.bin"))
    done = run(["dvc", "repro", "--force", "--single-item", name], work)
    # the smoke cache may be built before its first commit (every second): then it starts over
    assert ("resuming at sample" in done.stdout + done.stderr) == committed
    assert (work / outs[0]).read_bytes() == (repo / outs[0]).read_bytes()
    for rel in outs[1:]:
        got, want = (_strip(json.loads((d / rel).read_text())) for d in (work, repo))
        assert got == want, rel
    assert not folder.exists(), "the spools stay behind"
    after = run(["dvc", "repro", "--no-run-cache"], work)
    assert _ran(after.stdout) == {"check", "report"}, after.stdout[-3000:]


@pytest.mark.slow
@needs_fashion
def test_a_damaged_input_state_stops_the_stage_in_one_line(reference, tmp_path):
    repo, _, _ = reference
    work = _copy(repo, tmp_path / "work")
    rel = "runs/s0/prefix/state.pt"
    state = work / rel
    start, end = max(tensor_spans(state), key=lambda s: s[1] - s[0])
    state.chmod(0o644)
    flip(state, (start + end) // 2)
    done = run(["dvc", "repro", "--force", "--single-item", "baseline@0-normal"], work, check=False)
    text = done.stdout + done.stderr
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert done.returncode != 0 and len(errors) == 1, text[-3000:]
    assert rel in errors[0] and f"`dvc checkout --force {rel}`" in errors[0], errors[0]
    assert "Traceback" not in text and not (work / "runs/s0/normal/state.pt").exists()
    run(["dvc", "checkout", "--force", rel], work)  # what the line says to run
    assert _sha(state) == _sha(repo / rel)
