"""`freezecache doctor`: a healthy setup passes with its measurement, and each kind of broken
setup (a required package broken, a codec package the profile needs, the device the profile asks
for, a decode mismatch, no free disk, a failing measurement, bad params) exits with status 1
(params: 2) and names what is wrong."""

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import load_profile
from freezecache.core.yamlio import dump_yaml
from freezecache.tooling import doctor
from freezecache.tooling.cli import app


def params_file(tmp_path, **edits) -> str:
    """The smoke profile with every path under ``tmp_path`` (no prepared data there: the
    measurement makes synthetic images), one thread; ``edits``: section -> {key: value}."""
    raw = load_profile("smoke")
    raw["paths"] = {k: str(tmp_path / k) for k in raw["paths"]}
    raw["runtime"]["threads"] = 1
    for section, values in edits.items():
        raw[section].update(values)
    path = tmp_path / "params.yaml"
    path.write_text(dump_yaml(raw))
    return str(path)


def run_doctor(params: str, *args: str):
    return CliRunner().invoke(app, ["doctor", "--params", params, *args])


def lines_of(out: str, mark: str) -> list[str]:
    return [line for line in out.splitlines() if line.strip().startswith(mark)]


def test_a_healthy_setup_passes_with_its_measurement(tmp_path):
    report = tmp_path / "doctor.json"
    done = run_doctor(params_file(tmp_path), "--samples", "128", "--json", str(report))
    assert done.exit_code == 0, done.output
    out = done.output
    assert out.rstrip().splitlines()[-1].startswith("result: ok")
    for section in ("packages:", "device:", "decode:", "disk:", "measure:"):
        assert section in out
    assert not lines_of(out, "FAIL")
    assert "equal bit for bit" in out
    if not torch.cuda.is_available():
        assert "cuda: not available" in out
    assert len(out.splitlines()) <= 40  # one screen
    data = json.loads(report.read_text())
    assert data["ok"] is True
    (m,) = [c for c in data["checks"] if c["section"] == "measure"]
    n = m["numbers"]
    assert m["status"] == "ok" and n["samples"] == 128 and "synthetic" in n["data"]
    assert n["ratio"] == pytest.approx(n["suffix_epoch_s"] / n["freezeout_epoch_s"])
    assert 0 < n["flops_ratio"] < 1 and n["method"] == "discard_aug"


def test_the_measurement_uses_the_prepared_data_when_there_is_some(tmp_path):
    from test_bench import write_prepared

    write_prepared(tmp_path / "data")
    cfg = doctor.load_profile(tmp_path / "none.yaml")[0]
    paths = cfg.paths.model_copy(update={"data": str(tmp_path / "data")})
    cfg = cfg.model_copy(update={"paths": paths})
    used = doctor._small_prepared(cfg, tmp_path / "small", 64)
    assert used.startswith("64 images of")
    meta = json.loads((tmp_path / "small/meta.json").read_text())
    assert meta["train_size"] == 64 and meta["val_size"] == 32 and meta["img_size"] == 12


def test_a_broken_required_package_fails(tmp_path, broken):
    broken("dvclive")
    done = run_doctor(params_file(tmp_path), "--no-measure")
    assert done.exit_code == 1, done.output
    (line,) = lines_of(done.output, "FAIL")
    assert "dvclive" in line and "numpy.core.multiarray" in line and "pip install dvclive" in line
    assert done.output.rstrip().endswith("result: broken: packages/dvclive")


def test_a_broken_codec_package_fails_only_where_the_profile_uses_it(tmp_path, broken):
    broken("zfpy")
    quant = run_doctor(params_file(tmp_path), "--no-measure")
    assert quant.exit_code == 0, quant.output
    (skipped,) = [line for line in lines_of(quant.output, "--") if "zfpy" in line]
    assert "cache.codec: zfp" in skipped

    zfp = run_doctor(params_file(tmp_path, cache={"codec": "zfp"}), "--no-measure")
    assert zfp.exit_code == 1, zfp.output
    (line,) = lines_of(zfp.output, "FAIL")
    assert "zfpy" in line and "needed for cache.codec: zfp" in line


def test_a_package_outside_the_tested_range_is_a_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(doctor, "tested_ranges", lambda: {"numpy": ">=99"})
    done = run_doctor(params_file(tmp_path), "--no-measure")
    assert done.exit_code == 0, done.output
    (line,) = lines_of(done.output, "WARN")
    assert "numpy" in line and "outside the tested range >=99" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_profile_that_asks_for_cuda_without_it_fails(tmp_path):
    done = run_doctor(params_file(tmp_path, runtime={"device": "cuda"}), "--no-measure")
    assert done.exit_code == 1, done.output
    (line,) = lines_of(done.output, "FAIL")
    assert "CUDA is not available" in line


def test_a_decode_mismatch_fails(tmp_path, monkeypatch):
    from freezecache.cache import packed

    real = packed.decode
    monkeypatch.setattr(packed, "decode", lambda *a, **k: real(*a, **k) * 1.0000001 + 1e-7)
    done = run_doctor(params_file(tmp_path), "--no-measure")
    assert done.exit_code == 1, done.output
    (line,) = lines_of(done.output, "FAIL")
    assert "max diff" in line


def test_no_free_disk_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(doctor, "free_bytes", lambda path: 1 << 20)
    done = run_doctor(params_file(tmp_path), "--no-measure")
    assert done.exit_code == 1, done.output
    (line,) = lines_of(done.output, "FAIL")
    assert "1.0 MB free" in line and "paths.cache" in line


def test_a_failing_measurement_fails(tmp_path, monkeypatch):
    import freezecache.steps.cache

    def boom(*args, **kwargs):
        raise RuntimeError("CUDA error: no kernel image is available\nfor execution")

    monkeypatch.setattr(freezecache.steps.cache, "cache_point", boom)
    done = run_doctor(params_file(tmp_path), "--samples", "64")
    assert done.exit_code == 1, done.output
    (line,) = lines_of(done.output, "FAIL")
    assert "RuntimeError: CUDA error: no kernel image is available" in line


def test_bad_params_are_one_line(tmp_path):
    path = params_file(tmp_path, train={"epochs": -1})
    done = run_doctor(path, "--no-measure")
    assert done.exit_code == 2 and "train.epochs" in done.output


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cache", [{}, {"relative": True, "coding": "rans"}])
def test_on_cuda_the_doctor_sees_the_gpus_and_decodes_there_bit_for_bit(tmp_path, cache):
    from freezecache.config import load_config

    if cache.get("coding") == "rans":
        pytest.importorskip("numba")
    cfg = load_config(params_file(tmp_path, runtime={"device": "cuda"}, cache=cache))
    device = {c.name: c for c in doctor.check_device(cfg)}
    assert device["cuda"].status == "ok" and device["cuda"].numbers["count"] >= 1
    assert device["profile"].numbers["device"].startswith("cuda")
    decode = {c.name: c for c in doctor.check_decode(cfg)}
    assert decode["cuda"].status == "ok" and decode["cuda"].numbers["equal"] is True
