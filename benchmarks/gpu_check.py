"""Every check that needs a GPU, in one command, for a bare CUDA machine (issue 21).

    python benchmarks/gpu_check.py --out results/gpu [--data-root DIR] [--budget 480]
    make gpu-check

Made for a machine with torch preinstalled and no network, lent for minutes: each step runs as
its own process group under its own timeout (``--budget`` seconds in all, 8 minutes by
default), with this interpreter (``sys.executable``; ``python``, ``dvc`` and ``torchrun`` of
the steps are wrappers that exec it, with a depth guard, never a ``python`` found elsewhere on
PATH). The steps, in order:

1. imports: torch and every required package, first and under a short timeout; a missing one
   stops the check at once with the package's name (nothing else could pass without it);
2. ``freezecache doctor`` on the default profile (JSON kept);
3. the ``gpu``-marked tests (``pytest -m gpu``);
4. the epoch breakdown of ``make bench`` with the loader's decode on the device
   (``bench_cache.py --epochs-only``) on the default profile (before the smoke run: on a
   machine lent for minutes, the numbers that matter most come first);
5. the smoke profile by ``dvc repro`` in a scratch copy of the repository, on CUDA;
6. bf16 x gradient checkpointing trade-offs (``stages/tradeoffs.py``) on CUDA, in that copy;
7. a 2-process NCCL run (the cache stage, whose file must be byte for byte the 1-process one,
   then the suffix) when the machine has 2 GPUs;
8. the default profile by ``dvc repro`` in a second copy, with what is left of the budget (a
   timeout is recorded as such, with the stages it finished).

On a machine without CUDA every CUDA-only step is skipped with one line (``--cpu-smoke`` runs
the smoke repro on the CPU all the same: a check of the copies' machinery, minutes on 2 cores);
``--skip`` leaves out steps by name.
Writes ``gpu_check.json`` and ``gpu_check.md`` (the machine line, one row per step with its
status, seconds and key numbers) and each step's log under ``--out``. Exit status 1 when a step
failed. ``--data-root``: the Fashion-MNIST folder (data.root and pretrain.data.root of the
copies' params) where Debian's package is not installed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 480
RESERVE_S = 10  # kept back for writing the results
# Copied into the scratch repositories: what a clone has, less a run's outputs.
GENERATED = ("runs/", "results/", "data/prepared", "data/cache", "dvc.lock", ".ckpt/", ".whl/")
REQUIRED = ("torch", "numpy", "h5py", "zstandard", "pydantic", "yaml", "typer", "psutil", "tqdm",
            "ptflops", "dvc.repo", "dvclive", "ruamel.yaml", "freezecache.tooling.cli")  # fmt: skip
IMPORT_NAMES = {"yaml": "PyYAML", "dvc.repo": "dvc",
                "freezecache.tooling.cli": "freezecache (src/)"}  # fmt: skip
WRAP_DEPTH = 16  # nested wrapper calls allowed before a loop is assumed


@dataclass
class Step:
    name: str
    what: str
    cap_s: int  # its own timeout (the budget left may cut it shorter)
    cuda_only: bool
    run: Callable[[Check], dict]


@dataclass
class Result:
    name: str
    what: str
    status: str = "skipped"  # passed, failed, skipped
    reason: str = ""
    seconds: float = 0.0
    numbers: dict = field(default_factory=dict)


class StepFailed(Exception):
    """A step's one-line reason for failing, with the numbers it got before."""

    def __init__(self, reason: str, numbers: dict | None = None):
        super().__init__(reason)
        self.numbers = numbers or {}


class Check:
    """Runs the steps: environment, wrappers, scratch copies, the budget."""

    def __init__(self, out: Path, budget_s: float, data_root: Path | None, skip: set[str],
                 work: Path | None = None):  # fmt: skip
        self.out, self.data_root, self.skip = out, data_root, skip
        self.deadline = time.monotonic() + budget_s
        self.work = work or Path(tempfile.mkdtemp(prefix="freezecache-gpu-check-"))
        self.bin = self.work / "bin"
        self.cuda = False
        self.gpus = 0
        self.repos: dict[str, Path] = {}
        self.timeout_s = 0.0  # the current step's
        self.machine: dict = {}
        self.cpu_smoke = False  # run the smoke repro on the CPU when there is no CUDA

    # -- environment ----------------------------------------------------------------------------
    def wrappers(self) -> None:
        """python/python3/dvc/torchrun/freezecache in a bin folder first on PATH, each exec'ing
        this interpreter by its absolute path; more than WRAP_DEPTH nested calls stop with a
        line (a wrapper that ends up calling itself cannot loop for the whole budget)."""
        self.bin.mkdir(parents=True)
        exe = shlex.quote(sys.executable)
        tools = {"python": "", "python3": "", "dvc": "-m dvc", "torchrun":
                 "-m torch.distributed.run", "freezecache": "-m freezecache"}  # fmt: skip
        for name, args in tools.items():
            script = self.bin / name
            script.write_text(
                "#!/bin/sh\n"
                "depth=$(( ${FREEZECACHE_WRAP_DEPTH:-0} + 1 ))\n"
                f'if [ "$depth" -gt {WRAP_DEPTH} ]; then echo "gpu_check: {name} wrapper '
                f'nested {WRAP_DEPTH} deep: a loop" >&2; exit 97; fi\n'
                "export FREEZECACHE_WRAP_DEPTH=$depth\n"
                f'exec {exe} {args} "$@"\n'
            )
            script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)

    def env(self, repo: Path = ROOT) -> dict:
        """This interpreter's tools first on PATH, the repository's own src first on
        PYTHONPATH (a copy runs its own code), no DVC analytics, unbuffered output."""
        path = [str(repo / "src"), *filter(None, os.environ.get("PYTHONPATH", "").split(":"))]
        return {
            **os.environ,
            "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": os.pathsep.join(path),
            "DVC_NO_ANALYTICS": "1",
            "PYTHONUNBUFFERED": "1",
            "GIT_AUTHOR_NAME": "gpu-check", "GIT_AUTHOR_EMAIL": "gpu-check@localhost",
            "GIT_COMMITTER_NAME": "gpu-check", "GIT_COMMITTER_EMAIL": "gpu-check@localhost",
        }  # fmt: skip

    @property
    def device(self) -> str:
        return "cuda" if self.cuda else "cpu"

    def left(self) -> float:
        return self.deadline - time.monotonic() - RESERVE_S

    def sh(self, name: str, cmd: list[str], cwd: Path = ROOT, timeout: float | None = None,
           repo: Path | None = None) -> subprocess.CompletedProcess:  # fmt: skip
        """Run ``cmd`` in its own process group under the step's timeout (or ``timeout``);
        on timeout the whole group is killed (dvc's stages, torchrun's workers). Its output goes
        to the step's log as it comes (a killed step's log shows how far it got) and comes back
        as ``stdout``; ``returncode`` 124 on timeout."""
        limit = min(timeout or self.timeout_s, self.left())
        if limit <= 1:
            raise StepFailed("no time left in the budget")
        log = self.out / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        with open(log, "a") as f:
            f.write(f"$ {shlex.join(cmd)}  (cwd {cwd}, timeout {limit:.0f} s)\n")
            f.flush()
            at = f.tell()
            proc = subprocess.Popen(cmd, cwd=cwd, env=self.env(repo or cwd), stdout=f,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)  # fmt: skip
            try:
                code = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                code = 124
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # what the command left running
        with open(log, errors="replace") as f:
            f.seek(at)
            output = f.read()
        with open(log, "a") as f:
            f.write(f"\n[exit {code} after {time.monotonic() - start:.1f} s]\n")
        return subprocess.CompletedProcess(cmd, code, output, "")

    def python(self, name: str, args: list[str], **kw) -> subprocess.CompletedProcess:
        return self.sh(name, [sys.executable, *args], **kw)

    # -- scratch repositories -------------------------------------------------------------------
    def copy(self, key: str, profile: str, device: str) -> Path:
        """A git repository with the project's files (what a clone has, no run outputs) and
        ``profile`` as params.yaml, on ``device``, with the data root given."""
        dump_yaml, load_yaml = _yamlio()

        dest = self.work / key
        files = _project_files()
        data_root = self.data_root.resolve() if self.data_root else None
        for rel in files:
            src = ROOT / rel
            if data_root and _inside(src.resolve(), data_root):
                continue
            if src.is_file():
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / rel)
        raw = load_yaml(ROOT / "configs" / f"{profile}.yaml")
        raw["runtime"]["device"] = device
        if data_root:
            raw["data"]["root"] = str(data_root)
            if raw.get("pretrain"):
                raw["pretrain"]["data"]["root"] = str(data_root)
        (dest / "params.yaml").write_text(dump_yaml(raw))
        for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "commit", "-qm", f"gpu check: {profile}"]):  # fmt: skip
            done = self.sh(f"copy-{key}", cmd, cwd=dest, timeout=60)
            if done.returncode != 0:
                raise StepFailed(f"{shlex.join(cmd)} failed in the scratch copy: "
                                 f"{_last_line(done.stdout)}")  # fmt: skip
        self.repos[key] = dest
        return dest


# -- helpers ------------------------------------------------------------------------------------
def _yamlio():
    """(dump_yaml, load_yaml) of this checkout's library: profiles read and written as DVC
    reads and writes params.yaml (a bare machine has no freezecache installed)."""
    if str(ROOT / "src") not in sys.path:
        sys.path.insert(0, str(ROOT / "src"))
    from freezecache.core.yamlio import dump_yaml, load_yaml

    return dump_yaml, load_yaml


def _project_files() -> list[str]:
    """The tracked and untracked-but-not-ignored files (git), else every file but a run's
    outputs and caches (a tree without .git)."""
    try:
        done = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                              capture_output=True, timeout=60, check=True)  # fmt: skip
        files = [f for f in done.stdout.decode().split("\0") if f]
    except (OSError, subprocess.SubprocessError):
        skip = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis",
                "dvclive", "cache", "tmp"}  # fmt: skip
        files = []
        for folder, dirs, names in os.walk(ROOT):
            here = Path(folder).relative_to(ROOT)
            # .dvc/cache and .dvc/tmp, not the project's own cache/ package
            dirs[:] = [d for d in dirs if not d.endswith(".egg-info") and (
                d not in skip or (d in ("cache", "tmp") and here.name != ".dvc"))]  # fmt: skip
            files += [(here / n).as_posix() for n in names if n != ".git"]  # a worktree's
    return [f for f in files if not f.startswith(GENERATED)]


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def _error_line(text: str) -> str:
    """The most telling line of a failed command's output: its last error, else its last."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.search(r"(^error|Error\b|ERROR|FAILED|Traceback)", line):
            return line[:300]
    return _last_line(text)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def _report_numbers(repo: Path) -> dict:
    """Test accuracy and wall time per method from a finished run's report (the copy's own
    declarations say where it is)."""
    sys.path.insert(0, str(repo / "src"))
    try:
        from freezecache.config import load_config
        from freezecache.pipeline import STAGES

        path = repo / STAGES["report"].path("json", load_config(repo / "params.yaml"))
    finally:
        sys.path.remove(str(repo / "src"))
    if not path.is_file():
        return {}
    methods = json.loads(path.read_text()).get("methods", {})
    return {m: {"acc": r.get("accuracy_mean"), "wall_s": r.get("wall_time_s"),
                "min_memory_mb": r.get("min_memory_mb"),
                "cuda_min_memory_mb": r.get("cuda_min_memory_mb")}
            for m, r in methods.items()}  # fmt: skip


# -- the steps -----------------------------------------------------------------------------------
def step_imports(c: Check) -> dict:
    """Every required import in a fresh interpreter; the machine's line from the same run."""
    probe = (
        "import importlib, json, platform, sys\n"
        f"missing = {{}}\nfor m in {list(REQUIRED)!r}:\n"
        "    try: importlib.import_module(m)\n"
        "    except Exception as e:\n"
        "        missing[m] = (str(e).strip().splitlines() or [type(e).__name__])[0]\n"
        "info = {'python': platform.python_version(), 'missing': missing}\n"
        "try:\n"
        "    import torch\n"
        "    info['torch'] = torch.__version__\n"
        "    info['cuda_build'] = torch.version.cuda\n"
        "    info['cuda'] = torch.cuda.is_available()\n"
        "    info['gpus'] = torch.cuda.device_count() if info['cuda'] else 0\n"
        "    info['gpu'] = torch.cuda.get_device_name(0) if info['cuda'] else None\n"
        "except Exception as e:\n"
        "    info['torch_error'] = str(e)\n"
        "print('GPUCHECK ' + json.dumps(info))\n"
    )
    done = c.python("imports", ["-c", probe])
    found = re.search(r"^GPUCHECK (.*)$", done.stdout, re.M)
    if done.returncode != 0 or not found:
        raise StepFailed(f"the import probe failed: {_error_line(done.stdout)}")
    info = json.loads(found.group(1))
    driver = None
    smi = shutil.which("nvidia-smi")
    if smi:
        d = c.sh("imports", [smi, "--query-gpu=name,driver_version,memory.total",
                             "--format=csv,noheader"], timeout=20)  # fmt: skip
        if d.returncode == 0:
            driver = d.stdout.strip().splitlines()[-1] if d.stdout.strip() else None
    info["nvidia_smi"] = driver
    c.cuda, c.gpus = bool(info.get("cuda")), int(info.get("gpus") or 0)
    c.machine = info
    if info["missing"]:
        names = ", ".join(f"{IMPORT_NAMES.get(m, m)} ({why})" for m, why in info["missing"].items())
        raise StepFailed(f"missing or broken: {names} — install them (see README: installing "
                         "into an existing environment)", info)  # fmt: skip
    return info


def step_doctor(c: Check) -> dict:
    report = c.out / "doctor.json"
    done = c.python("doctor", ["-m", "freezecache.tooling.cli", "doctor", "--json", str(report)])
    numbers = {}
    if report.is_file():
        data = json.loads(report.read_text())
        for check in data["checks"]:
            if check["section"] == "measure" and check["status"] == "ok":
                n = check["numbers"]
                numbers = {k: n[k] for k in ("ratio", "suffix_epoch_s", "freezeout_epoch_s",
                                             "flops_ratio", "samples", "device")}  # fmt: skip
            if check["section"] == "decode" and check["name"] == "cuda":
                numbers["cuda_decode_equal"] = check["numbers"].get("equal")
        numbers["failed"] = [f"{x['section']}/{x['name']}" for x in data["checks"]
                             if x["status"] == "fail"]  # fmt: skip
    if done.returncode == 124:
        raise StepFailed("timed out", numbers)
    if done.returncode != 0:
        raise StepFailed(f"doctor: {_last_line(done.stdout)}", numbers)
    return numbers


def step_gpu_tests(c: Check) -> dict:
    done = c.python("gpu_tests", ["-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                  "-o", "addopts=", "tests"])  # fmt: skip
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|deselected)",
                                               _last_line(done.stdout))}  # fmt: skip
    if done.returncode == 124:
        raise StepFailed("timed out", counts)
    if done.returncode != 0 or counts.get("failed") or counts.get("error"):
        raise StepFailed(f"pytest -m gpu: {_last_line(done.stdout)}", counts)
    if not counts.get("passed"):
        raise StepFailed(f"no gpu test passed: {_last_line(done.stdout)}", counts)
    return counts


def _repro(c: Check, name: str, repo: Path) -> dict:
    start = time.monotonic()
    done = c.python(name, ["-m", "dvc", "repro"], cwd=repo)
    stages = _stages_run(done.stdout)
    numbers = {"stages_run": len(stages), "seconds": round(time.monotonic() - start, 1)}
    if done.returncode == 124:
        last = stages[-1] if stages else "none"
        raise StepFailed(f"timed out after {numbers['seconds']:.0f} s with {len(stages)} stages "
                         f"started (the last: {last})", numbers)  # fmt: skip
    if done.returncode != 0:
        raise StepFailed(f"dvc repro: {_error_line(done.stdout)}", numbers)
    numbers["methods"] = _report_numbers(repo)
    return numbers


def step_smoke(c: Check) -> dict:
    repo = c.copy("smoke", "smoke", c.device)  # the CPU only with --cpu-smoke
    numbers = _repro(c, "smoke", repo)
    numbers["device"] = c.device
    return numbers


def step_tradeoffs(c: Check) -> dict:
    repo = c.repos.get("smoke")
    if repo is None or not (repo / "runs/s0/prefix/state.pt").is_file():
        raise StepFailed("needs the smoke run's weights (its step did not finish)")
    out = c.out / "tradeoffs_cuda.json"  # not the stage's own outputs: those of this step
    md = c.out / "tradeoffs_cuda.md"
    code = ("import sys; from pathlib import Path; from freezecache.config import load_config; "
            "from freezecache.pipeline import STAGES; from freezecache.planning.tradeoffs import "
            "measure_tradeoffs, write; cfg = load_config('params.yaml'); "
            "rows = measure_tradeoffs(cfg, steps=7, warmup=2, weights=STAGES['train_prefix']"
            ".path('state', cfg, seed=cfg.seeds[0])); "
            f"write(rows, Path({str(out)!r}), Path({str(md)!r}))")  # fmt: skip
    done = c.python("tradeoffs", ["-c", code], cwd=repo)
    if done.returncode == 124:
        raise StepFailed("timed out")
    if done.returncode != 0:
        raise StepFailed(f"tradeoffs: {_error_line(done.stdout)}")
    keep = ("part", "precision", "grad_checkpointing", "accounted_memory_mb", "cuda_peak_mb",
            "step_time_s")  # fmt: skip
    return {"rows": [{k: r.get(k) for k in keep} for r in json.loads(out.read_text())]}


def step_nccl(c: Check) -> dict:
    dump_yaml, load_yaml = _yamlio()
    repo = c.repos.get("smoke")
    if repo is None or not (repo / "dvc.lock").is_file():
        raise StepFailed("needs the smoke run (its step did not finish)")
    raw = load_yaml(repo / "params.yaml")
    block = raw["freeze"]["points"][0]["block"]
    cache = repo / "data/cache/s0/discard_aug/p0.h5"
    one = _md5(cache)
    # gloo only where a test runs this step without CUDA
    raw["distributed"].update(nproc_per_node=2, backend="nccl" if c.cuda else "gloo")
    (repo / "params_nccl.yaml").write_text(dump_yaml(raw))
    item = ["--seed", "0", "--method", "discard_aug", "--point", "0",
            "--params", "params_nccl.yaml"]  # fmt: skip
    numbers: dict = {"block": block}
    for stage in ("cache", "train_suffix"):
        start = time.monotonic()
        done = c.python("nccl", ["-m", "freezecache.pipeline.launch", f"stages/{stage}.py", *item],
                        cwd=repo)  # fmt: skip
        numbers[f"{stage}_s"] = round(time.monotonic() - start, 1)
        if done.returncode != 0:
            why = "timed out" if done.returncode == 124 else _error_line(done.stdout)
            raise StepFailed(f"2-process {stage}: {why}", numbers)
        if stage == "cache":
            numbers["cache_identical"] = _md5(cache) == one
            if not numbers["cache_identical"]:
                raise StepFailed("the 2-process cache differs from the 1-process one", numbers)
    metrics = repo / "runs/s0/discard_aug/p0/live/metrics.json"
    if metrics.is_file():
        numbers["metrics"] = json.loads(metrics.read_text())
    return numbers


def step_bench(c: Check) -> dict:
    repo = c.repos.get("default") or c.copy("default", "default", c.device)
    done = c.python("bench", ["benchmarks/bench_cache.py", "--epochs-only", "--repeats", "2",
                              "--out", str(c.out)], cwd=repo)  # fmt: skip
    if done.returncode == 124:
        raise StepFailed("timed out")
    if done.returncode != 0:
        raise StepFailed(f"bench: {_error_line(done.stdout)}")
    res = json.loads((c.out / "bench_epochs.json").read_text())
    epochs = res["p1_p2"]["breakdown"]["epochs"]
    return {
        "epoch_s": {k: round(v["epoch_s"], 3) for k, v in epochs.items()},
        "p1_cache_vs_ram": res["p1_cache_vs_ram"],
        "p2_vs_flops_ideal": res["p2_vs_flops_ideal"],
        "goals": res["p1_p2"]["breakdown"]["goals"],
    }


def step_default(c: Check) -> dict:
    repo = c.repos.get("default") or c.copy("default", "default", c.device)
    return _repro(c, "default", repo)


STEPS = (
    Step("imports", "every required package imports; the machine", 60, False, step_imports),
    Step("doctor", "freezecache doctor (default profile)", 200, False, step_doctor),
    Step("gpu_tests", "pytest -m gpu", 150, True, step_gpu_tests),
    Step("bench", "epoch breakdown, decode on the device", 180, True, step_bench),
    Step("smoke", "smoke profile: dvc repro on CUDA", 240, True, step_smoke),
    Step("tradeoffs", "bf16 x checkpointing trade-offs on CUDA", 120, True, step_tradeoffs),
    Step("nccl", "2 processes on NCCL: cache (byte-identical) + suffix", 150, True, step_nccl),
    Step("default", "default profile: dvc repro on CUDA, the time left", 600, True, step_default),
)


def run_steps(c: Check) -> list[Result]:
    results = []
    stop = None
    for step in STEPS:
        r = Result(step.name, step.what)
        results.append(r)
        if stop:
            r.reason = stop
        elif step.name in c.skip:
            r.reason = "skipped by --skip"
        elif step.cuda_only and not c.cuda and not (step.name == "smoke" and c.cpu_smoke):
            r.reason = "no CUDA here"
            if step.name == "smoke":
                r.reason += " (--cpu-smoke runs it on the CPU)"
        elif step.name == "nccl" and c.gpus < 2:
            r.reason = f"{c.gpus} GPU(s): NCCL needs 2"
        elif c.left() < 5:
            r.reason = "no time left in the budget"
        else:
            c.timeout_s = min(step.cap_s, c.left())
            start = time.monotonic()
            try:
                r.numbers = step.run(c)
                r.status = "passed"
            except StepFailed as err:
                r.status, r.reason, r.numbers = "failed", str(err), err.numbers
            except Exception as err:  # noqa: BLE001 (a bug in a step is that step's failure)
                r.status, r.reason = "failed", f"{type(err).__name__}: {err}"
            r.seconds = round(time.monotonic() - start, 1)
            if step.name == "imports" and r.status == "failed":
                stop = "not run: the imports failed"
        mark = {"passed": "ok  ", "failed": "FAIL", "skipped": "--  "}[r.status]
        print(f"[gpu-check] {mark} {r.name:<10} {r.seconds:6.1f} s  {r.reason}", flush=True)
    return results


# -- the report ----------------------------------------------------------------------------------
def machine_line(m: dict) -> str:
    if m.get("cuda"):
        gpu = m.get("gpu")
        smi = [x.strip() for x in (m.get("nvidia_smi") or "").split(",")]
        if len(smi) == 3:  # name, driver, memory (nvidia-smi's csv)
            gpu = f"{smi[0]} ({smi[2]}), driver {smi[1]}"
        return (f"{m.get('gpus')} x {gpu}; CUDA {m.get('cuda_build')}, torch {m.get('torch')}, "
                f"Python {m.get('python')}")  # fmt: skip
    return (
        f"no CUDA ({platform.processor() or platform.machine()}, {os.cpu_count()} cores); "
        f"torch {m.get('torch')} (CUDA build {m.get('cuda_build')}), Python {m.get('python')}"
    )


def _numbers_text(r: Result) -> str:
    n = r.numbers
    if r.name == "doctor" and "ratio" in n:
        text = (f"suffix/FreezeOut epoch {n['ratio']:.2f} (FLOPs {n.get('flops_ratio') or 0:.2f}) "
                f"on {n['device']}")  # fmt: skip
        if n.get("cuda_decode_equal") is not None:
            text += f"; decode on CUDA = CPU bit for bit: {n['cuda_decode_equal']}"
        return text
    if r.name == "gpu_tests":
        return ", ".join(f"{v} {k}" for k, v in n.items())
    if r.name in ("smoke", "default") and "stages_run" in n:
        accs = ", ".join(f"{m} {v['acc']:.1f}%" for m, v in n.get("methods", {}).items()
                         if v.get("acc") is not None)  # fmt: skip
        return f"{n['stages_run']} stages" + (f"; test acc. {accs}" if accs else "")
    if r.name == "nccl" and "cache_identical" in n:
        return f"2-rank cache identical: {n['cache_identical']}"
    if r.name == "bench" and "epoch_s" in n:
        e = n["epoch_s"]
        parts = ", ".join(f"{k} {v:.2f} s" for k, v in e.items() if "," not in k)
        return f"{parts}; P1 {n['p1_cache_vs_ram']:.2f}, P2 {n['p2_vs_flops_ideal']:.2f}"
    return ""


def markdown(results: list[Result], m: dict, total_s: float, out: Path) -> str:
    lines = [
        f"Machine: {machine_line(m)}. `python benchmarks/gpu_check.py` ({total_s:.0f} s in all).",
        "",
        "| step | what | status | s | numbers / reason |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        text = " ".join(filter(None, [_numbers_text(r), r.reason])).replace("|", "\\|")
        lines.append(f"| {r.name} | {r.what} | {r.status} | {r.seconds:.0f} | {text} |")
    text = "\n".join(lines) + "\n"
    for extra, title in (("tradeoffs_cuda.md", "Trade-offs on CUDA"),
                         ("bench_epochs.md", "Epoch breakdown on the GPU")):  # fmt: skip
        if (out / extra).is_file():
            text += f"\n#### {title}\n\n{(out / extra).read_text()}"
    return text


# Files under --out that a step writes (a step left out by --skip keeps its earlier ones).
OWN_FILES = {
    "imports": ["logs/imports.log"],
    "doctor": ["doctor.json", "logs/doctor.log"],
    "gpu_tests": ["logs/gpu_tests.log"],
    "smoke": ["logs/smoke.log", "logs/copy-smoke.log"],
    "tradeoffs": ["tradeoffs_cuda.json", "tradeoffs_cuda.md", "logs/tradeoffs.log"],
    "nccl": ["logs/nccl.log"],
    "bench": ["bench_epochs.json", "bench_epochs.md", "logs/bench.log", "logs/copy-default.log"],
    "default": ["logs/default.log"],
}


def _earlier(path: Path, skip: set[str]) -> dict[str, Result]:
    """The earlier run's results of the steps left out now (a rerun of the steps that failed
    or timed out keeps the others), marked as such."""
    if not path.is_file() or not skip:
        return {}
    try:
        steps = json.loads(path.read_text())["steps"]
    except (ValueError, KeyError):
        return {}
    out = {}
    for s in steps:
        if s["name"] in skip and s["status"] != "skipped":
            r = Result(**s)
            if not r.reason.endswith("(an earlier run)"):
                r.reason = f"{r.reason} (an earlier run)".strip()
            out[r.name] = r
    return out


def _stamp(out: Path, seconds: float, argv: list[str] | None) -> None:
    """The provenance of gpu_check.md and .json (freezecache.tooling.results.stamp), in a fresh
    interpreter: the steps imported the library from the scratch copies, since removed."""
    code = ("import sys; from pathlib import Path; from freezecache.tooling.results import stamp; "
            "o = Path(sys.argv[1]); stamp(sys.argv[2], [o / 'gpu_check.md', o / 'gpu_check.json'], "
            "Path('params.yaml'), duration_s=float(sys.argv[3]), command=sys.argv[4])")  # fmt: skip
    command = shlex.join(["python", "benchmarks/gpu_check.py", *(sys.argv[1:] if argv is None
                                                                 else argv)])  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    args = [sys.executable, "-c", code, str(out), __file__, str(seconds), command]
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        print(f"[gpu-check] no provenance written: {done.stderr.strip()[-300:]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "results" / "gpu")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for every step")
    p.add_argument("--data-root", type=Path, default=None, help="Fashion-MNIST folder")
    p.add_argument("--skip", default="", help="steps to leave out, comma-separated")
    p.add_argument("--keep", action="store_true", help="keep the scratch copies")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="without CUDA, run the smoke repro on the CPU (minutes; checks the "
                   "machinery of the copies)")  # fmt: skip
    args = p.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    earlier = _earlier(out / "gpu_check.json", skip)
    for step, files in OWN_FILES.items():  # what the steps that run now will write again
        if step not in earlier:
            for name in files:
                (out / name).unlink(missing_ok=True)
    start = time.monotonic()
    c = Check(out, args.budget, args.data_root, skip)
    c.cpu_smoke = args.cpu_smoke
    try:
        c.wrappers()
        results = run_steps(c)
    finally:
        if not args.keep:
            shutil.rmtree(c.work, ignore_errors=True)
    results = [earlier.get(r.name, r) for r in results]
    total = time.monotonic() - start
    record = {
        "machine": c.machine,
        "machine_line": machine_line(c.machine),
        "budget_s": args.budget,
        "seconds": round(total, 1),
        "steps": [asdict(r) for r in results],
    }
    (out / "gpu_check.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    (out / "gpu_check.md").write_text(markdown(results, c.machine, total, out))
    _stamp(out, total, argv)
    failed = [r.name for r in results if r.status == "failed"]
    print(f"[gpu-check] {total:.0f} s; {'failed: ' + ', '.join(failed) if failed else 'ok'}; "
          f"wrote {out / 'gpu_check.json'} and gpu_check.md")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
