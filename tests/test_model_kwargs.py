"""The user's model options (`model.kwargs`) against the arguments freezecache derives, and what
timm would refuse at build time: one line naming the key, a non-zero exit, nothing written."""

import json
from pathlib import Path

import pytest

from conftest import ROOT, load_profile, needs_fashion, project_copy, run
from freezecache.config import DERIVED_KWARGS, HUB_KWARGS, Model, parse_config
from freezecache.core.errors import FreezecacheError
from freezecache.core.yamlio import dump_yaml, load_yaml
from freezecache.models import timm_view
from freezecache.steps.model import build_model, check_model
from test_readme import EXP, readme_commands

VIT = "vit_tiny_patch16_224"
META = {"num_classes": 5, "channels": 1, "img_size": 28}  # the default data: Fashion-MNIST


def _params(tmp_path: Path, name: str, **kwargs) -> Path:
    raw = load_profile("smoke")
    raw["model"] = {"name": name, "checkpoint": None, "kwargs": kwargs}
    path = tmp_path / "params.yaml"
    path.write_text(dump_yaml(raw))
    return path


def _refused(cmd: list[str], cwd: Path) -> str:
    """The one error line of a command that must fail and leave only params.yaml behind."""
    done = run(cmd, cwd, check=False)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2 and len(errors) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert [p.name for p in cwd.rglob("*")] == ["params.yaml"], "something was written"
    return errors[0]


COLLISIONS = [
    ("img_size", 28, "freezecache passes img_size itself, from data.img_size"),
    ("in_chans", 1, "freezecache passes in_chans itself, from data.channels"),
    ("num_classes", 5, "freezecache passes num_classes itself, from data.classes"),
    ("pretrained", True, "set model.checkpoint to a weights file under paths.weights"),
]


@pytest.mark.parametrize(("key", "value", "why"), COLLISIONS)
def test_a_key_freezecache_sets_is_refused_by_validation(key, value, why):
    raw = load_profile("smoke")
    raw["model"] = {"name": VIT, "checkpoint": None, "kwargs": {"patch_size": 4, key: value}}
    with pytest.raises(FreezecacheError) as err:
        parse_config(raw)
    (line,) = str(err.value).splitlines()
    assert line.startswith(f"params.yaml: model.kwargs.{key}: ") and why in line, line


@pytest.mark.parametrize(("key", "value", "why"), COLLISIONS)
def test_a_stage_that_builds_the_model_refuses_it_in_one_line_too(key, value, why):
    """build_model applies the same rule: no `got multiple values for keyword argument`."""
    with pytest.raises(FreezecacheError) as err:
        build_model(Model(name=VIT, kwargs={"patch_size": 4, key: value}), META)
    (line,) = str(err.value).splitlines()
    assert line.startswith(f"model.kwargs.{key}: ") and why in line, line


def test_the_check_stage_refuses_a_collision_before_anything_runs(tmp_path):
    _params(tmp_path, VIT, img_size=28, patch_size=4)
    line = _refused(["python", str(ROOT / "stages/check.py")], tmp_path)
    assert "model.kwargs.img_size: freezecache passes img_size itself" in line
    assert "set data.img_size instead" in line


def test_every_derived_key_has_a_home_and_the_hub_keys_are_timms():
    assert set(DERIVED_KWARGS) == {"img_size", "in_chans", "num_classes"}
    assert all(where.startswith("data.") for where in DERIVED_KWARGS.values())
    assert set(HUB_KWARGS) == set(timm_view._HUB_OPTIONS)  # one list each side, kept equal


REFUSALS = [
    ("no_such_vit", {}, "model.name: unknown model 'no_such_vit'"),
    (VIT, {"patch_size": 4, "colour": "red"}, "model.kwargs.colour: model vit_tiny_patch16_224 "),
    (VIT, {}, "model.kwargs.patch_size: model vit_tiny_patch16_224: patch size 16 does not "),
    (VIT, {"patch_size": 5}, "patch size 5 does not divide the 28-pixel input of patch_embed"),
    ("deit_tiny", {"patch_size": 5}, "model.kwargs.patch_size: img_size 28 is not a multiple"),
    ("resnet20", {"depth": 8}, "model.kwargs.depth: model resnet20 refuses option depth"),
]


@pytest.mark.parametrize(("name", "kwargs", "message"), REFUSALS)
def test_what_timm_would_refuse_is_one_line_where_the_model_is_built(name, kwargs, message):
    with pytest.raises(FreezecacheError) as err:
        build_model(Model(name=name, kwargs=kwargs), META)
    (line,) = str(err.value).splitlines()
    assert message in line, line
    assert line.startswith(("model.name: ", "model.kwargs."))


@pytest.mark.parametrize(("name", "kwargs", "message"), REFUSALS[:3])
def test_freezecache_check_reports_it_without_writing(tmp_path, name, kwargs, message):
    _params(tmp_path, name, **kwargs)
    line = _refused(["freezecache", "check"], tmp_path)
    assert line.startswith("error: params.yaml: ") and message in line, line


def test_the_readme_vit_passes_check_and_lists_its_blocks(tmp_path):
    _params(tmp_path, VIT, patch_size=4)
    cfg = parse_config(load_yaml(tmp_path / "params.yaml"))
    assert check_model(cfg).num_blocks == 12
    out = run(["freezecache", "check"], tmp_path).stdout
    assert f"params.yaml: ok ({VIT}: 12 blocks, layout tokens)" in out
    out = run(
        ["freezecache", "blocks", VIT, "--img-size", "28", "--in-chans", "1", "-k", "patch_size=4"],
        tmp_path,
    ).stdout
    assert f"{VIT}: 12 blocks" in out and "50x192" in out  # 7x7 patches + the class token
    done = run(["freezecache", "blocks", VIT, "-k", "img_size=28"], tmp_path, check=False)
    assert done.returncode == 2 and "give it as --img-size" in done.stderr


@pytest.mark.slow
@pytest.mark.extended  # a ViT's whole pipeline of its own
@needs_fashion
def test_the_readme_vit_example_runs_on_the_smoke_profile(tmp_path):
    """The README's `dvc exp run -S` for a timm ViT, as printed, on the default data (smoke)."""
    (command,) = [c.text for c in readme_commands(EXP) if "model.name=vit" in c.text]
    repo = project_copy(tmp_path / "repo")
    run("git init -q && git config user.email ci@example.com && git config user.name ci", repo)
    run(["freezecache", "profile", "smoke"], repo)
    run("git add -A && git commit -qm smoke", repo)

    run(command, repo)
    params = load_yaml(repo / "params.yaml")
    assert params["model"] == {"name": VIT, "checkpoint": None, "kwargs": {"patch_size": 4}}
    report = json.loads((repo / "results/report.json").read_text())
    assert set(report["methods"]) == {"normal", "freezeout", "discard", "discard_aug"}
    assert (repo / "data/cache/s0/discard_aug/p1.h5").is_file()
