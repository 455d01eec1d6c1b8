"""benchmarks/gpu_check.py on a machine without a GPU: the steps it can run run, every CUDA-only
step is skipped with one line, a missing package stops it at once with the package's name, its
wrappers exec this interpreter and stop a loop, and it writes its JSON and markdown."""

import json
import subprocess
import sys
import time

import pytest
import torch

import gpu_check

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU behaviour")


def test_without_cuda_every_cuda_step_is_skipped_with_one_line(tmp_path, capsys):
    code = gpu_check.main(["--out", str(tmp_path), "--skip", "doctor", "--budget", "120"])
    assert code == 0
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = {s["name"]: s for s in record["steps"]}
    assert list(steps) == [s.name for s in gpu_check.STEPS]
    assert steps["imports"]["status"] == "passed"
    assert record["machine"]["torch"] == torch.__version__ and record["machine"]["cuda"] is False
    for name in ("gpu_tests", "tradeoffs", "nccl", "bench", "default"):
        assert steps[name]["status"] == "skipped" and steps[name]["reason"] == "no CUDA here"
    assert steps["smoke"]["reason"] == "no CUDA here (--cpu-smoke runs it on the CPU)"
    assert steps["doctor"]["reason"] == "skipped by --skip"
    printed = [line for line in capsys.readouterr().out.splitlines() if "[gpu-check]" in line]
    assert len(printed) == len(gpu_check.STEPS) + 1  # one line per step, one at the end
    md = (tmp_path / "gpu_check.md").read_text()
    assert md.startswith("Machine: no CUDA") and "| gpu_tests | pytest -m gpu | skipped |" in md
    assert (tmp_path / "logs/imports.log").is_file()


def test_a_missing_package_stops_the_check_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "REQUIRED", (*gpu_check.REQUIRED, "no_such_package_xyz"))
    code = gpu_check.main(["--out", str(tmp_path), "--budget", "120"])
    assert code == 1
    steps = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]
    assert steps[0]["status"] == "failed" and "no_such_package_xyz" in steps[0]["reason"]
    assert all(s["reason"] == "not run: the imports failed" for s in steps[1:])


def test_the_wrappers_run_this_interpreter_and_stop_a_loop(tmp_path):
    c = gpu_check.Check(tmp_path, 60, None, set(), work=tmp_path / "work")
    c.wrappers()
    env = c.env()
    done = subprocess.run(["python", "-c", "import sys; print(sys.executable)"], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.stdout.strip() == sys.executable
    looped = {**env, "FREEZECACHE_WRAP_DEPTH": str(gpu_check.WRAP_DEPTH)}
    done = subprocess.run(["python", "-c", "pass"], env=looped, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 97 and "a loop" in done.stderr


def test_a_step_past_its_timeout_is_killed_with_its_children(tmp_path):
    c = gpu_check.Check(tmp_path, 60, None, set(), work=tmp_path / "work")
    c.wrappers()
    c.timeout_s = 2
    started = tmp_path / "child.pid"
    done = c.sh("sleepy", ["sh", "-c", f"sleep 60 & echo $! > {started}; wait"])
    assert done.returncode == 124
    pid = int(started.read_text())
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(pid), "the step's child outlived the timeout"
    assert "[exit 124" in (tmp_path / "logs/sleepy.log").read_text()


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for its reaper)."""
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_the_project_files_leave_out_a_runs_outputs():
    files = gpu_check._project_files()
    assert "dvc.yaml" in files and "src/freezecache/tooling/doctor.py" in files
    assert not any(f.startswith(("runs/", "data/cache", "results/", ".whl/")) for f in files)
    assert "dvc.lock" not in files


def test_a_rerun_of_some_steps_keeps_the_others_earlier_results(tmp_path):
    step = {"name": "default", "what": "default profile", "status": "passed", "reason": "",
            "seconds": 200.0, "numbers": {"stages_run": 31}}  # fmt: skip
    earlier = {"steps": [step]}
    (tmp_path / "gpu_check.json").write_text(json.dumps(earlier))
    code = gpu_check.main(["--out", str(tmp_path), "--skip", "doctor,default", "--budget", "60"])
    assert code == 0
    steps = {s["name"]: s for s in json.loads((tmp_path / "gpu_check.json").read_text())["steps"]}
    assert steps["default"]["status"] == "passed"
    assert steps["default"]["numbers"]["stages_run"] == 31
    assert steps["default"]["reason"] == "(an earlier run)"
    assert steps["doctor"]["reason"] == "skipped by --skip"  # nothing earlier to keep
    assert (
        "| default | default profile | passed | 200 | 31 stages (an earlier run) |"
        in (tmp_path / "gpu_check.md").read_text()
    )


def test_the_report_numbers_come_from_where_the_declarations_put_the_report(tmp_path):
    import shutil

    from conftest import ROOT

    shutil.copytree(ROOT / "src", tmp_path / "src")
    shutil.copy(ROOT / "configs/smoke.yaml", tmp_path / "params.yaml")
    (tmp_path / "results").mkdir()
    report = {"methods": {"normal": {"accuracy_mean": 91.5, "wall_time_s": 12.0}}}
    (tmp_path / "results/report.json").write_text(json.dumps(report))
    got = gpu_check._report_numbers(tmp_path)
    assert got["normal"]["acc"] == 91.5 and got["normal"]["wall_s"] == 12.0


def test_without_git_the_project_files_are_walked(monkeypatch):
    """The tree sent to a GPU machine may come without .git."""

    def no_git(*args, **kwargs):
        raise OSError("git: not a repository")

    monkeypatch.setattr(gpu_check.subprocess, "run", no_git)
    files = gpu_check._project_files()
    assert "dvc.yaml" in files and "src/freezecache/tooling/doctor.py" in files
    assert not any(f.startswith((".git/", ".venv/", "runs/", "results/")) for f in files)
    assert not any("__pycache__" in f for f in files)
