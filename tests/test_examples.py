"""The examples of the README's "Use it from Python" run as a user runs them, on tiny data: a
timm model fine-tuned from a cache of its frozen prefix, in a plain loop and in Accelerate."""

import importlib.util
import re
import subprocess
import sys

import pytest

from conftest import ROOT, env_with_venv, needs_fashion

TINY = ["--samples", "192", "--epochs", "2", "--workers", "2"]


def _run(script: str, tmp_path) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *TINY],
        cwd=tmp_path, env=env_with_venv(ROOT / "src"), capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list(tmp_path.iterdir())  # the cache lived in a temporary folder
    return done.stdout


def _accuracies(out: str) -> list[float]:
    return [float(a) for a in re.findall(r"epoch \d+: test accuracy (\d\.\d+)", out)]


@pytest.mark.slow
@needs_fashion
def test_the_plain_pytorch_example(tmp_path):
    out = _run("train_from_cache.py", tmp_path)
    samples, shape = re.search(r"cache: (\d+) x \((\d+, \d+, \d+)\)", out).groups()
    assert samples == "192" and shape == "64, 7, 7"  # timm resnet18 after its first stage
    acc = _accuracies(out)
    assert len(acc) == 2 and all(0.0 <= a <= 1.0 for a in acc)


@pytest.mark.slow
@needs_fashion
@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="accelerate missing")
def test_the_accelerate_example(tmp_path):
    acc = _accuracies(_run("train_from_cache_accelerate.py", tmp_path))
    assert len(acc) == 2 and all(0.0 <= a <= 1.0 for a in acc)
