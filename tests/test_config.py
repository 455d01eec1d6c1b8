"""params.yaml validation: every problem reported at once, one line each, non-zero exit."""

import pytest
import yaml

from conftest import ROOT, env_with_venv, load_profile, run
from freezecache.config import load_config, parse_config
from freezecache.errors import FreezecacheError


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "configs").glob("*.yaml")))
def test_every_profile_is_valid(name):
    cfg = parse_config(load_profile(name), name)
    assert cfg.points and cfg.seeds


def test_default_profile_is_the_committed_params():
    assert yaml.safe_load((ROOT / "params.yaml").read_text()) == load_profile("default")


def _problems(raw) -> list[str]:
    with pytest.raises(FreezecacheError) as err:
        parse_config(raw)
    return str(err.value).splitlines()


def test_all_problems_reported_at_once():
    raw = load_profile("default")
    raw["train"]["epochs"] = -1
    raw["train"]["lr"] = "fast"
    raw["cache"]["tolerance"] = 0
    raw["augment"]["gamma"] = 1.5
    raw["model"]["colour"] = "red"
    lines = _problems(raw)
    assert len(lines) == 5
    text = "\n".join(lines)
    for key in ("train.epochs", "train.lr", "cache.tolerance", "augment.gamma", "model.colour"):
        assert key in text
    assert "unknown key 'model.colour'" in text


def test_freeze_point_past_last_block():
    raw = load_profile("default")  # resnet20: 9 blocks
    raw["freeze"]["points"] = [{"block": 3, "epoch": 2}, {"block": 10, "epoch": 4}]
    (line,) = _problems(raw)
    assert "freeze.points.1.block = 10 is past the last block of resnet20 (9 blocks)" in line


def test_schedule_consistency():
    raw = load_profile("default")
    raw["freeze"]["points"] = [{"block": 5, "epoch": 4}, {"block": 3, "epoch": 9}]
    raw["cache"]["tolerance"] = [0.1, 0.2, 0.3]
    lines = _problems(raw)
    text = "\n".join(lines)
    assert "freeze.points.1.epoch = 9 must be below train.epochs = 6" in text
    assert "must freeze more blocks at a later epoch" in text
    assert "cache.tolerance has 3 values for 2 freeze points" in text


def test_tolerance_per_point():
    raw = load_profile("default")
    raw["cache"]["tolerance"] = [0.01, 0.05]
    cfg = parse_config(raw)
    assert cfg.cache.tolerance_at(1) == 0.01 and cfg.cache.tolerance_at(2) == 0.05


def test_unknown_model_and_bad_yaml(tmp_path):
    raw = load_profile("default")
    raw["model"]["name"] = "resnet9000"
    assert "resnet9000" in "\n".join(_problems(raw))
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(FreezecacheError, match="not valid YAML"):
        load_config(bad)


def test_cli_reports_errors_and_exits_nonzero(tmp_path):
    raw = load_profile("default")
    raw["train"]["epochs"] = 0
    raw["augment"]["alpha"] = -0.5
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    done = run(["freezecache", "check"], tmp_path, check=False)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "dvc.yaml").exists()


def test_stage_refuses_bad_params_without_writing(tmp_path):
    raw = load_profile("smoke")
    raw["data"]["train_size"] = -3
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    done = run(["python", str(ROOT / "stages/prepare.py")], tmp_path, check=False)
    assert done.returncode == 2 and "data.train_size" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "data").exists()


def test_profile_command_copies_and_renders(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "smoke.yaml").write_text((ROOT / "configs/smoke.yaml").read_text())
    run(["freezecache", "profile", "smoke"], tmp_path)
    assert (tmp_path / "params.yaml").read_text() == (ROOT / "configs/smoke.yaml").read_text()
    assert "train_suffix_discard_aug_s0_p2" in (tmp_path / "dvc.yaml").read_text()
    done = run(["freezecache", "profile", "nope"], tmp_path, check=False)
    assert done.returncode == 2 and "choose one of: smoke" in done.stderr
    assert env_with_venv()
