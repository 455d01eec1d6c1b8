"""SIGINT and SIGTERM in a stage (core.interrupts under pipeline.guard): once or twice 1 ms
apart, during work, during encoder threads, or while outputs are written: one line, exit
128 + signal, no traceback, and outputs all written or none."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import ROOT, env_with_venv

# A stage body: enters the guard, starts encoder-like threads, says it is working, then works
# (or writes two outputs inside a deferred block) until signalled.
STAGE = """
import sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from freezecache.core import interrupts
from freezecache.core.interrupts import exit_on_signal
from freezecache.pipeline.guard import stage

exit_on_signal()
out = Path(sys.argv[2])
with stage(Path(sys.argv[1])):
    pool = ThreadPoolExecutor(2)
    futures = [pool.submit(time.sleep, 0.2) for _ in range(8)]
    interrupts.at_success(lambda: (out / "cleared").write_text("x"))
    (out / "working").write_text("x")
    if sys.argv[3] == "publish":
        with interrupts.deferred():
            (out / "a").write_text("x")
            time.sleep(1.5)
            (out / "b").write_text("x")
    else:
        try:
            while True:
                time.sleep(0.01)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
"""


def _start(tmp_path: Path, mode: str) -> subprocess.Popen:
    script = tmp_path / "stage.py"
    script.write_text(textwrap.dedent(STAGE))
    params = ROOT / "configs" / "smoke.yaml"
    return subprocess.Popen(
        [sys.executable, str(script), str(params), str(tmp_path), mode],
        env=env_with_venv(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _when(path: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def _signal(proc: subprocess.Popen, sig: int, times: int) -> None:
    for i in range(times):
        if i:
            time.sleep(0.001)
        os.kill(proc.pid, sig)


@pytest.mark.parametrize(
    ("sig", "times"), [(signal.SIGINT, 1), (signal.SIGINT, 2), (signal.SIGTERM, 2)]
)
def test_a_signal_while_working_stops_in_one_line(tmp_path, sig, times):
    proc = _start(tmp_path, "work")
    _when(tmp_path / "working")
    _signal(proc, sig, times)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and signal.Signals(sig).name in lines[0], err
    assert "dvc repro" in lines[0]
    assert not (tmp_path / "cleared").exists()  # a stopped stage keeps its checkpoints


def test_a_signal_while_outputs_are_written_waits_for_all_of_them(tmp_path):
    proc = _start(tmp_path, "publish")
    _when(tmp_path / "a")
    _signal(proc, signal.SIGINT, 2)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert (tmp_path / "b").exists(), "the deferred block was cut short"
    assert not (tmp_path / "cleared").exists()
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_a_finished_stage_runs_its_success_calls(tmp_path):
    """Without a signal the success calls run (and a publish block ends normally)."""
    proc = _start(tmp_path, "publish")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert (tmp_path / "cleared").exists() and (tmp_path / "b").exists()
