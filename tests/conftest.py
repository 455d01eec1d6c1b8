"""Shared fixtures: the repository root and tiny prepared datasets."""

from __future__ import annotations

import importlib.abc
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmarks' helpers (not a package)
FASHION = Path("/usr/share/datasets/fashion-mnist")


def env_with_venv(src: Path | None = None) -> dict:
    """Environment where `python` and `dvc` are this interpreter's (the stages call `python`).

    `src`: run that copy's library instead of the installed one (a project copy must run its
    own code, not the checkout's that the editable install points to)."""
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "DVC_NO_ANALYTICS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    if src is not None:
        env["PYTHONPATH"] = str(src)
    return env


def run(cmd: list[str] | str, cwd: Path, check: bool = True, **kw) -> subprocess.CompletedProcess:
    own_src = Path(cwd) / "src" / "freezecache"
    done = subprocess.run(
        cmd,
        cwd=cwd,
        env=env_with_venv(own_src.parent if own_src.is_dir() else None),
        capture_output=True,
        text=True,
        shell=isinstance(cmd, str),
        **kw,
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"{cmd} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return done


def load_profile(name: str) -> dict:
    """A profile as DVC and the stages read it (YAML 1.2)."""
    from freezecache.core.yamlio import load_yaml

    return load_yaml(ROOT / "configs" / f"{name}.yaml")


def project_copy(dest: Path) -> Path:
    """Copies the project's tracked and untracked-but-not-ignored files (what a clone has)."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    generated = ("runs/", "results/", "data/prepared", "data/cache", "dvc.lock")  # a run's outputs
    for rel in filter(None, files):
        if rel.startswith(generated):
            continue
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def timed_repro(repo: Path, *args: str) -> tuple[str, dict[str, float]]:
    """``dvc repro`` (and ``args``) in ``repo``: its output, and the seconds each stage it ran
    took (from its 'Running stage' line to the next one, or to the end)."""
    proc = subprocess.Popen(
        ["dvc", "repro", *args], cwd=repo, env=env_with_venv(repo / "src"), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    lines, starts = [], []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("Running stage '"):
            starts.append((line.split("'")[1], time.monotonic()))
    code = proc.wait()
    out = "".join(lines)
    if code != 0:
        raise AssertionError(f"dvc repro failed ({code}):\n{out[-4000:]}")
    ends = [t for _, t in starts[1:]] + [time.monotonic()]
    return out, {name: end - t for (name, t), end in zip(starts, ends, strict=True)}


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """The smoke profile run once by ``dvc repro`` in a fresh git repository and committed: the
    finished run the slow tests share (each stage kind once, not once per test). Never change
    it (not even by a DVC command that writes, like ``dvc repro``): take a :func:`smoke_copy`.
    Returns (repo, the repro's output, seconds per stage)."""
    if not (FASHION / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (make setup installs it)")
    repo = project_copy(tmp_path_factory.mktemp("smoke") / "repo")
    run("git init -q && git config user.email ci@example.com && git config user.name ci", repo)
    run(["freezecache", "profile", "smoke"], repo)
    run("git add -A && git commit -qm smoke", repo)
    out, seconds = timed_repro(repo)
    run("git add -A && git commit -qm ran", repo)
    return repo, out, seconds


def smoke_copy(smoke_run, dest: Path) -> Path:
    """A writable copy of the finished smoke run (its git history, DVC cache and run cache
    included: a stage whose inputs an edit leaves alone is restored, not rerun)."""
    shutil.copytree(smoke_run[0], dest, symlinks=True)
    return dest


needs_fashion = pytest.mark.skipif(
    not (FASHION / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed (make setup installs it)",
)


def augment_once(x, *, mode, g, flip_p=0.5, crop_pad=0, noise_std=0.0, blur_p=0.0,
                 blur_sigma=0.5, extra=None, where=None, layout=None):  # fmt: skip
    """One batch through :func:`freezecache.training.augment.augment_features` as a stage would:
    draws
    from ``g``, a noise bank from ``g``, noise ``noise_std`` x the batch's std."""
    from freezecache.training import augment

    layout = augment.resolve_layout(x, layout)
    scale = noise_std * float(x.float().std()) if noise_std else 0.0
    aug = augment.FeatureAug(mode, flip_p, crop_pad, scale, blur_p, blur_sigma, layout)
    numel = x[0].numel()
    bank = augment.NoiseBank(numel, g) if scale else None
    return augment.augment_features(
        x, aug, aug.draw(x.shape[0], g, bank, numel), bank, extra=extra, where=where
    )


# -- packages that fail to import --------------------------------------------------------------
BROKEN = ImportError("numpy.core.multiarray failed to import")  # as zfpy's numpy-1 wheel fails


class _Refuse(importlib.abc.MetaPathFinder):
    """Makes every import of the given top-level packages raise ``error``."""

    def __init__(self, names: tuple[str, ...], error: Exception) -> None:
        self.names, self.error = names, error

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in self.names:
            raise self.error
        return None


@pytest.fixture
def broken(monkeypatch):
    """``broken("zfpy", ...)``: those packages (and ``also``, e.g. a module that imports one at
    its top) unimportable for the test; sys.modules and sys.meta_path are restored after."""

    def make(*names: str, also: tuple[str, ...] = (), error: Exception = BROKEN) -> None:
        for mod in list(sys.modules):
            if mod.split(".")[0] in names or mod in also:
                monkeypatch.delitem(sys.modules, mod)
        monkeypatch.setattr(sys, "meta_path", [_Refuse(names, error), *sys.meta_path])

    return make


def experiment_runs(shown) -> list[tuple[dict, dict]]:
    """(params.yaml's params, results/metrics.json's metrics) of every run in `dvc exp show
    --json` that has metrics, in the order shown (baseline and experiments alike)."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            params = node.get("params", {}).get("params.yaml", {}).get("data", {})
            metrics = node.get("metrics", {}).get("results/metrics.json", {}).get("data", {})
            if isinstance(params, dict) and params and "acc" in metrics:
                found.append((params, metrics))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(shown)
    return found


def edit_params(repo: Path, key: str, value) -> None:
    """Sets dotted ``key`` of ``repo``'s params.yaml to ``value`` (written as DVC writes it)."""
    from freezecache.core.yamlio import dump_yaml, load_yaml

    raw = load_yaml(repo / "params.yaml")
    node = raw
    *parents, last = key.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    (repo / "params.yaml").write_text(dump_yaml(raw))
