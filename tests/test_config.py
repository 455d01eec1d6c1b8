"""params.yaml validation: every problem reported at once, one line each, non-zero exit."""

import pytest

from conftest import ROOT, env_with_venv, load_profile, run
from freezecache.config import load_config, parse_config
from freezecache.core.errors import FreezecacheError
from freezecache.core.yamlio import dump_yaml, load_yaml
from freezecache.steps.model import check_model


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "configs").glob("*.yaml")))
def test_every_profile_is_valid(name):
    cfg = parse_config(load_profile(name), name)
    assert cfg.points and cfg.seeds


def test_default_profile_is_the_committed_params():
    assert load_yaml(ROOT / "params.yaml") == load_profile("default")


def _problems(raw) -> list[str]:
    with pytest.raises(FreezecacheError) as err:
        parse_config(raw)
    return str(err.value).splitlines()


def test_all_problems_reported_at_once():
    raw = load_profile("default")
    raw["train"]["epochs"] = -1
    raw["train"]["lr"] = "fast"
    raw["cache"]["tolerance"] = 0
    raw["rank"]["gamma"] = 1.5
    raw["model"]["colour"] = "red"
    lines = _problems(raw)
    assert len(lines) == 5
    text = "\n".join(lines)
    for key in ("train.epochs", "train.lr", "cache.tolerance", "rank.gamma", "model.colour"):
        assert key in text
    assert "unknown key 'model.colour'" in text


def test_freeze_point_past_last_block():
    raw = load_profile("default")  # resnet20: 9 blocks
    raw["freeze"]["points"] = [
        {"block": 3, "epoch": 1},
        {"block": 10, "epoch": 2},
    ]
    with pytest.raises(FreezecacheError) as err:
        check_model(parse_config(raw))
    (line,) = str(err.value).splitlines()
    assert "freeze.points.1.block = 10 is past the last block of resnet20 (9 blocks)" in line


def test_schedule_consistency():
    raw = load_profile("default")
    raw["freeze"]["points"] = [
        {"block": 5, "epoch": 4},
        {"block": 3, "epoch": 9},
    ]
    raw["cache"]["tolerance"] = [0.1, 0.2, 0.3]
    lines = _problems(raw)
    text = "\n".join(lines)
    assert "freeze.points.1.epoch = 9 must be below train.epochs = 8" in text
    assert "must freeze more blocks at a later epoch" in text
    assert "cache.tolerance has 3 values for 2 freeze points" in text


def test_freeze_points_chain_by_their_order_and_an_old_after_is_one_line():
    raw = load_profile("default")
    raw["freeze"]["points"] = [{"block": 3, "epoch": 1}, {"block": 6, "epoch": 2}]
    cfg = parse_config(raw)
    assert [(p.name, p.prev) for p in cfg.points] == [("p0", "../prefix"), ("p1", "p0")]
    raw["freeze"]["points"][0]["after"] = "../prefix"
    (line,) = _problems(raw)
    assert "freeze.points.0.after is no longer needed" in line


@pytest.mark.parametrize(
    "freeze,message",
    [
        ({"points": "auto", "criterion": {"rule": "gradient"}}, "freeze.criterion.rule"),
        ({"points": "auto", "criterion": {"threshold": 0}}, "freeze.criterion.threshold"),
        ({"points": "auto", "criterion": {"epoch_max": 8}}, "epoch_max = 8 must be below"),
        ({"points": [{"block": 3, "epoch": 1}, {"block": "auto", "epoch": 2}]},
         "only the first point can be auto"),
        ({"points": [{"block": "auto", "epoch": 1}, {"block": 6, "epoch": 2}]},
         "freeze.points.1 must come after whatever the first point decides"),
        ({"points": "sometimes"}, "freeze.points"),
    ],
)  # fmt: skip
def test_auto_points_and_bad_criteria_are_refused_in_one_line(freeze, message):
    raw = load_profile("default")
    raw["freeze"] = {**raw["freeze"], **freeze}
    lines = _problems(raw)
    assert len(lines) == 1 and message in lines[0], lines


def test_auto_is_one_point_with_both_decided():
    raw = load_profile("default")
    raw["freeze"]["points"] = "auto"
    cfg = parse_config(raw)
    assert cfg.auto and [(p.block, p.epoch) for p in cfg.points] == [("auto", "auto")]


@pytest.mark.parametrize(
    "classes,pre,message",
    [
        ([5, 6, 12], [0, 1], "data.classes has 12, but fashion_mnist has class ids 0..9 only"),
        ([], [0, 1], "data.classes is empty"),
        ([5, 5, 6], [0, 1], "data.classes lists class 5 more than once"),
        ([4, 5, 6], [0, 4], "pretrain.data.classes and data.classes overlap ([4])"),
        ([5, 6], [], "pretrain.data.classes is empty"),
    ],
)
def test_class_splits_are_validated(classes, pre, message):
    raw = load_profile("default")
    raw["data"]["classes"] = classes
    raw["pretrain"]["data"]["classes"] = pre
    lines = _problems(raw)
    assert len(lines) == 1 and message in lines[0], lines


@pytest.mark.parametrize("key", ["cache", "runs", "data"])
def test_paths_outside_the_repository_are_refused(key, tmp_path):
    raw = load_profile("default")
    raw["paths"][key] = "/some/abs/path" if key != "data" else "../elsewhere"
    with pytest.raises(FreezecacheError) as err:
        parse_config(raw, repo=tmp_path)
    (line,) = str(err.value).splitlines()
    assert f"paths.{key} = " in line and "outside the repository" in line
    raw["paths"][key] = str(tmp_path / "inside")
    parse_config(raw, repo=tmp_path)


def test_checkpoint_must_be_under_the_weights_folder(tmp_path):
    raw = load_profile("scratch")
    raw["model"]["checkpoint"] = "elsewhere/w.pth"
    with pytest.raises(FreezecacheError) as err:
        parse_config(raw, repo=tmp_path)
    (line,) = str(err.value).splitlines()
    assert "model.checkpoint = 'elsewhere/w.pth' must be a file under paths.weights" in line


def test_methods_must_be_in_the_list_of_their_kind():
    raw = load_profile("default")
    raw["methods"] = {"baselines": ["normal", "discard"], "discard": ["discard_aug", "normal"]}
    lines = _problems(raw)
    assert len(lines) == 2
    assert "methods.baselines.1" in lines[0] and "methods.discard.1" in lines[1]


def test_tolerance_per_point():
    raw = load_profile("smoke")  # two freeze points
    raw["cache"]["tolerance"] = [0.01, 0.05]
    cfg = parse_config(raw)
    assert cfg.cache.tolerance_at(1) == 0.01 and cfg.cache.tolerance_at(2) == 0.05


def test_unknown_model_and_bad_yaml(tmp_path):
    raw = load_profile("default")
    raw["model"]["name"] = "resnet9000"
    with pytest.raises(FreezecacheError, match="resnet9000"):
        check_model(parse_config(raw))
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(FreezecacheError, match="not valid YAML"):
        load_config(bad)


def test_cli_reports_errors_and_exits_nonzero(tmp_path):
    raw = load_profile("default")
    raw["train"]["epochs"] = 0
    raw["rank"]["alpha"] = -0.5
    (tmp_path / "params.yaml").write_text(dump_yaml(raw))
    done = run(["freezecache", "check"], tmp_path, check=False)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "dvc.yaml").exists()


def test_stage_refuses_bad_params_without_writing(tmp_path):
    raw = load_profile("smoke")
    raw["data"]["train_size"] = -3
    (tmp_path / "params.yaml").write_text(dump_yaml(raw))
    done = run(["python", str(ROOT / "stages/prepare.py")], tmp_path, check=False)
    assert done.returncode == 2 and "data.train_size" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "data").exists()


def test_profile_command_copies_the_profile(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "smoke.yaml").write_text((ROOT / "configs/smoke.yaml").read_text())
    run(["freezecache", "profile", "smoke"], tmp_path)
    assert (tmp_path / "params.yaml").read_text() == (ROOT / "configs/smoke.yaml").read_text()
    assert not (tmp_path / "dvc.yaml").exists()  # the pipeline's shape comes from params
    done = run(["freezecache", "profile", "nope"], tmp_path, check=False)
    assert done.returncode == 2 and "choose one of: smoke" in done.stderr
    assert env_with_venv()
