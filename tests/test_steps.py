"""The method's steps end to end without DVC: every model, chained freeze points, cache checks."""

import json

import pytest
import torch

from conftest import load_profile, needs_fashion
from freezecache.cache.format import open_cache
from freezecache.cache.reader import iter_cache
from freezecache.config import parse_config
from freezecache.core.errors import FreezecacheError
from freezecache.core.timing import STAGE_SECTIONS, Sections
from freezecache.core.yamlio import dump_yaml
from freezecache.models import split
from freezecache.pipeline import STAGES
from freezecache.pipeline.guard import stage
from freezecache.steps.baselines import baseline, train_prefix
from freezecache.steps.cache import cache_point, frozen_model
from freezecache.steps.context import Context
from freezecache.steps.model import prefix_hash
from freezecache.steps.prepare import prepare
from freezecache.steps.pretrain import pretrain
from freezecache.steps.suffix import train_suffix
from freezecache.training.train import RunState


def _config(tmp_path, **changes):
    raw = load_profile("smoke")
    raw["paths"] = {k: str(tmp_path / k) for k in raw["paths"]}
    raw["data"].update(train_size=96, val_size=32, test_size=48)
    raw["pretrain"] = None
    raw["rank"]["samples"] = 32
    for section, values in changes.items():
        raw[section] = (
            {**(raw.get(section) or {}), **values} if isinstance(values, dict) else values
        )
    return parse_config(raw)


def _run_chain(cfg, method):
    prepare(cfg)
    pretrain(cfg)
    train_prefix(cfg, 0)
    for p in cfg.points:
        cache_point(cfg, 0, method, p.i)
        train_suffix(cfg, 0, method, p.i)


def _points(*blocks):
    """One point per block, at epochs 1, 2, ... (the smoke profile trains 3)."""
    return [{"block": b, "epoch": i + 1} for i, b in enumerate(blocks)]


@pytest.mark.slow
@pytest.mark.extended  # a chain of its own per model (the smoke run covers resnet20's)
@needs_fashion
@pytest.mark.parametrize(
    "model,kwargs,blocks",
    [
        # (the CIFAR ResNets' chain: every smoke run, resnet20)
        ("resnet50", {}, (3, 7)),
        ("deit_tiny", {"patch_size": 4}, (4, 8)),
    ],
)
def test_every_model_runs_the_discard_chain(tmp_path, model, kwargs, blocks):
    cfg = _config(
        tmp_path,
        data={"img_size": 32, "channels": 3},
        model={"name": model, "kwargs": kwargs},
        freeze={"points": _points(*blocks)},
        train={"batch_size": 32},
    )
    _run_chain(cfg, "discard_aug")
    folder = tmp_path / "runs/s0/discard_aug/p1"
    state = RunState.load(folder / "state.pt")
    assert state.epoch == cfg.train.epochs
    assert [r["state"] for r in state.history] == ["full", "discard", "discard"]
    metrics = json.loads((folder / "live/metrics.json").read_text())
    assert 0.0 <= metrics["test_acc"] <= 1.0 and metrics["step"] == cfg.train.epochs
    info = open_cache(tmp_path / "cache/s0/discard_aug/p1.h5")
    assert info.num_samples == 96 and info.extra_shape is not None
    if model == "deit_tiny":
        assert info.has_extra_pos  # token replacement stores positions per sample


@pytest.mark.slow
@needs_fashion
def test_the_second_cache_holds_exact_flipped_features(tmp_path):
    """At point 2 the stored channels are F(flip(x)) of the raw images through the whole frozen
    prefix, within the codec's bound (not a previous cache's flipped view pushed further)."""
    tol = 1e-3
    cfg = _config(tmp_path, cache={"tolerance": tol, "codec": "quant"})
    _run_chain(cfg, "discard_aug")
    point = cfg.points[1]
    ctx = Context(cfg, 0, "cache", method="discard_aug", p=point)
    model, _ = frozen_model(ctx, point)
    prefix, _ = split(model, point.block)
    path = ctx.out("cache")
    info = open_cache(path, expect_prefix_hash=prefix_hash(model, point.block))
    channels = torch.tensor(info.extra_index)
    assert len(channels) == round(cfg.rank.gamma * info.sample_shape[0])
    batches = list(iter_cache(path, info))
    cached = torch.cat([b["x"] for b in batches])
    stored = torch.cat([b["extra"] for b in batches])
    with torch.no_grad():
        direct = torch.cat([prefix(x) for x, _ in ctx.train.batches(64)])
        flipped = torch.cat([prefix(x.flip(-1)) for x, _ in ctx.train.batches(64)])
    assert (cached - direct).abs().max().item() <= tol
    assert (stored - flipped[:, channels]).abs().max().item() <= tol
    # the stored view is what a flip alone cannot give: F(flip(x)) != flip(F(x)) there
    assert (flipped[:, channels] - direct.flip(-1)[:, channels]).abs().max().item() > 10 * tol


@pytest.mark.slow
@needs_fashion
def test_cache_of_another_prefix_is_refused(tmp_path):
    cfg = _config(tmp_path)
    prepare(cfg)
    pretrain(cfg)
    train_prefix(cfg, 0)
    cache_point(cfg, 0, "discard", 0)
    # change the prefix run's weights in place: the cache no longer matches them
    state_file = STAGES["train_prefix"].path("state", cfg, seed=0)
    state = RunState.load(state_file)
    state.model = {k: v + 0.01 if v.is_floating_point() else v for k, v in state.model.items()}
    state.save(state_file)
    with pytest.raises(FreezecacheError, match="prefix"):
        train_suffix(cfg, 0, "discard", 0)
    assert not (tmp_path / "runs/s0/discard/p0/live/metrics.json").exists()


@pytest.mark.slow
@needs_fashion
def test_stages_record_time_and_peak_memory(tmp_path):
    cfg = _config(tmp_path, methods={"baselines": ["normal_noflip"], "discard": []})
    prepare(cfg)
    pretrain(cfg)
    with Sections(STAGE_SECTIONS):  # what guard.stage runs a stage under
        baseline(cfg, 0, "normal_noflip")
    costs = json.loads(
        STAGES["baseline"].path("costs", cfg, seed=0, method="normal_noflip").read_text()
    )
    assert costs["peak_rss_mb"] > 50 and costs["stage_wall_s"] > 0
    assert all(s["cache_in_ram_mb"] == 0.0 for s in costs["states"])  # no cache
    t = costs["timings"]  # where the stage's time went
    assert t["epochs"] == 3 and t["train_s"] > 0 and t["startup_s"] >= 0
    assert 0 < t["epoch_median_s"] <= t["train_s"]  # a steady epoch, the first's warm-up aside
    assert t["validation_s"] > 0 and t["accounting_s"] > 0 and t["test_s"] > 0
    published = RunState.load(STAGES["baseline"].path("state", cfg, seed=0, method="normal_noflip"))
    assert not any("epoch_time_s" in r for r in published.history)  # timings are not results
    state = RunState.load(STAGES["baseline"].path("state", cfg, seed=0, method="normal_noflip"))
    assert [r["epoch"] for r in state.history] == [1, 2, 3]  # its own run, not the prefix's


@needs_fashion
@pytest.mark.parametrize("position", [2, 5])
def test_validation_on_a_frozen_prefix_s_features_equals_the_whole_model(tmp_path, position):
    """Features computed once, the suffix run each epoch: the same numbers, bit for bit."""
    cfg = _config(tmp_path)
    prepare(cfg)
    pretrain(cfg)
    ctx = Context(cfg, 0, "train_prefix")
    model = ctx.new_model()
    whole = ctx.evaluate(model)
    assert ctx.evaluator(model, position)() == whole
    assert ctx.evaluator(model, 0)() == whole


@needs_fashion
def test_the_build_reuses_the_ranking_passes_and_writes_the_same_file(tmp_path, monkeypatch):

    from freezecache.cache import build as cache_build

    cfg = _config(tmp_path)
    prepare(cfg)
    pretrain(cfg)
    train_prefix(cfg, 0)
    path = STAGES["cache"].path("cache", cfg, seed=0, method="discard_aug", p=cfg.points[0])
    cache_point(cfg, 0, "discard_aug", 0)
    reused = path.read_bytes()
    monkeypatch.setattr(cache_build, "REUSE_BYTES", 0)  # the ranking's passes not kept
    cache_point(cfg, 0, "discard_aug", 0)
    assert path.read_bytes() == reused


@needs_fashion
def test_without_flips_discard_aug_ranks_nothing_and_caches_what_discard_does(tmp_path):
    """train.flip_p 0: a stored flipped view would never be read, so Discard & Aug. pays no
    ranking, no flipped pass and stores nothing; its features are Discard's, bit for bit."""
    from freezecache.accounting.costs import overhead_flops

    cfg = _config(tmp_path, train={"flip_p": 0.0})
    assert not cfg.stores_flips("discard_aug") and _config(tmp_path).stores_flips("discard_aug")
    prepare(cfg)
    pretrain(cfg)
    train_prefix(cfg, 0)
    with Sections(STAGE_SECTIONS):  # what guard.stage runs a stage under
        stats = cache_point(cfg, 0, "discard_aug", 0)
    assert stats["stored_channels"] == 0 and stats["stores_flips"] is False
    assert "flipped_forward_s" not in stats["timings"]  # no flipped pass, no ranking passes
    p = cfg.points[0]
    ranking = STAGES["cache"].path("ranking", cfg, seed=0, method="discard_aug", p=p)
    assert json.loads(ranking.read_text()) == {"kind": "none"}
    cache_point(cfg, 0, "discard", 0)
    paths = [
        STAGES["cache"].path("cache", cfg, seed=0, method=m, p=p)
        for m in ("discard", "discard_aug")
    ]
    infos = [open_cache(path) for path in paths]
    assert all(info.extra_shape is None for info in infos)
    a, b = (
        [batch["x"] for batch in iter_cache(path, info)]
        for path, info in zip(paths, infos, strict=True)
    )
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    parts = {q.block: {"prefix_fwd": 1.0} for q in cfg.points}
    assert overhead_flops(cfg, parts, 96, "discard_aug") == overhead_flops(
        cfg, parts, 96, "discard"
    )


def test_bn_recalibration_changes_only_batchnorm_statistics():
    from freezecache.models import create_model
    from freezecache.steps.suffix import recalibrate_bn

    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=5, in_chans=1, img_size=12)
    prefix, suffix = split(model, 3)
    with torch.no_grad():
        batches = [prefix(torch.randn(8, 1, 12, 12)) * 3 + 1 for _ in range(3)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recalibrate_bn(suffix, batches)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(
        k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")
        for k in changed
    )
    assert not any(k.startswith(("stem.", "blocks.0.", "blocks.1.", "blocks.2.")) for k in changed)
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert model.training  # modes restored


@pytest.mark.slow
@needs_fashion
@pytest.mark.parametrize("source", ["cache", "images"])
def test_bn_recalibration_resumes_to_the_same_state(tmp_path, source, monkeypatch):
    """Killed after the last epoch's checkpoint but before publishing, the rerun recalibrates
    again and publishes what an uninterrupted run does."""
    from freezecache.steps import run as run_step

    def runs(folder):
        cfg = _config(folder, train={"bn_recalibrate": source},
                      freeze={"points": _points(2)})  # fmt: skip
        prepare(cfg)
        pretrain(cfg)
        train_prefix(cfg, 0)
        cache_point(cfg, 0, "discard", 0)
        return cfg

    cfg = runs(tmp_path / "a")
    train_suffix(cfg, 0, "discard", 0)
    want = RunState.load(STAGES["train_suffix"].path("state", cfg, seed=0, method="discard",
                                                     p=cfg.points[0]))  # fmt: skip
    cfg = runs(tmp_path / "b")
    finish = run_step.Run.finish

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt  # as a SIGKILL after the last checkpoint

    monkeypatch.setattr(run_step.Run, "finish", killed)
    with pytest.raises(KeyboardInterrupt):
        train_suffix(cfg, 0, "discard", 0)
    monkeypatch.setattr(run_step.Run, "finish", finish)
    train_suffix(cfg, 0, "discard", 0)
    got = RunState.load(STAGES["train_suffix"].path("state", cfg, seed=0, method="discard",
                                                    p=cfg.points[0]))  # fmt: skip
    assert all(torch.equal(got.model[k], want.model[k]) for k in want.model)
    assert got.history == want.history
    # the point's last validation is the recalibrated model's (what the recipe search reads)
    ctx = Context(cfg, 0, "train_suffix", method="discard", p=cfg.points[0])
    model = ctx.new_model()
    model.load_state_dict(got.model)
    assert ctx.evaluate(model)["val_acc"] == pytest.approx(got.history[-1]["val_acc"], abs=1e-6)


def test_stage_arguments_are_checked(tmp_path):
    cfg_path = tmp_path / "params.yaml"

    raw = load_profile("smoke")
    cfg_path.write_text(dump_yaml(raw))
    for kwargs, message in (
        ({"seed": 7}, "--seed 7"),
        ({"method": ("discard_noaug", "discard")}, "methods.discard"),
        ({"point": 4}, "--point 4: params.yaml has 2 freeze points (0..1)"),
    ):
        with pytest.raises(SystemExit) as done, stage(cfg_path, **kwargs):
            pass
        assert done.value.code == 2, message


def _imagefolder(root, classes=3, per_class=6, size=28):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split_name in ("train", "test"):
        for c in range(classes):
            d = root / split_name / f"class{c}"
            d.mkdir(parents=True)
            for i in range(per_class):
                img = torch.randint(0, 256, (size, size), generator=g, dtype=torch.uint8)
                Image.fromarray(img.numpy(), mode="L").save(d / f"{i}.png")


@pytest.mark.slow
@needs_fashion
def test_pretrain_stage_feeds_the_main_run_with_a_new_head(tmp_path):
    _imagefolder(tmp_path / "folder")
    cfg = _config(
        tmp_path,
        pretrain={
            "data": {"name": "imagefolder", "root": str(tmp_path / "folder"), "img_size": 28},
            "epochs": 1,
            "lr": 0.05,
        },
    )
    prepare(cfg)
    pretrain(cfg)
    pre = RunState.load(tmp_path / "runs/pretrain/state.pt")
    assert pre.epoch == 1 and not any(k.startswith("head.") for k in pre.model)
    model = Context(cfg, 0, "train_prefix").new_model()
    for name, value in model.state_dict().items():
        if name.startswith("stem."):
            assert torch.equal(value, pre.model[name]), name
    assert model.state_dict()["head.fc.weight"].shape[0] == 5  # the five target classes


@pytest.mark.slow
@needs_fashion
@pytest.mark.parametrize(
    "cache",
    [{}, pytest.param({"relative": True, "tolerance": 0.25, "coding": "rans"},
                      marks=pytest.mark.extended)],  # the same estimator, other inputs
    ids=["abs", "rel-rans"],
)  # fmt: skip
def test_the_plan_predicts_the_cache_sizes_within_ten_percent(tmp_path, cache):
    """The plan measures with the starting weights, so this fine-tunes them barely (a tiny
    learning rate) and checks the estimator itself: layout, extras, HDF5 overhead. How far
    real fine-tuning moves the sizes is measured on the default (results/plan.md vs cache.csv);
    from random init the prediction can be several times off, which the plan says. A relative
    tolerance and rANS are calibrated on the data, stored channels with their own scales."""
    from freezecache.steps.plan import plan

    raw = load_profile("smoke")
    cfg = _config(tmp_path, pretrain=raw["pretrain"], train={"lr": 1e-6}, cache=cache)
    prepare(cfg)
    pretrain(cfg)
    plan(cfg)
    predicted = json.loads(STAGES["plan"].path("json", cfg).read_text())
    train_prefix(cfg, 0)
    rows = {r["block"]: r for r in predicted["blocks"]}
    first = cfg.points[0]
    for method, key in (("discard", "cache_bytes"), ("discard_aug", "cache_bytes_with_extra")):
        cache_point(cfg, 0, method, first.i)
        actual = STAGES["cache"].path("cache", cfg, seed=0, method=method, p=first).stat().st_size
        assert rows[first.block][key] == pytest.approx(actual, rel=0.10), method
    assert predicted["caches_bytes"] > 0 and predicted["free_bytes"] > 0
    text = STAGES["plan"].path("md", cfg).read_text()
    assert "| 2 (point 1) |" in text and "starting weights: pre-trained" in text


@needs_fashion
def test_only_stages_that_declare_plots_write_dvclive_curves(tmp_path):
    """Undeclared files under runs/ would change the report's folder dependency on checkout."""
    raw = load_profile("smoke")
    cfg = _config(tmp_path, pretrain=raw["pretrain"])
    prepare(cfg)
    pretrain(cfg)
    train_prefix(cfg, 0)
    assert "plots" not in STAGES["pretrain"].outs and "plots" in STAGES["train_prefix"].outs
    assert (tmp_path / "runs/pretrain/live/metrics.json").exists()
    assert not (tmp_path / "runs/pretrain/live/plots").exists()
    assert (tmp_path / "runs/s0/prefix/live/plots/metrics/val_acc.tsv").exists()


@needs_fashion
def test_the_plan_times_a_vit_with_its_stored_tokens(tmp_path):
    """The plan's time prediction reads, decodes and augments a batch as the training stage
    does; for tokens that means the stored tokens at their positions (the CI once failed here)."""
    from freezecache.steps.plan import plan

    cfg = _config(
        tmp_path,
        data={"img_size": 32, "channels": 3},
        model={"name": "deit_tiny", "kwargs": {"patch_size": 8, "depth": 4}},  # 3 candidates
        freeze={"points": _points(2, 3)},
        train={"batch_size": 32},
    )
    prepare(cfg)
    pretrain(cfg)
    plan(cfg)
    rows = json.loads(STAGES["plan"].path("json", cfg).read_text())["blocks"]
    assert rows and all(r["time"]["epoch_s"]["discard_aug"] > 0 for r in rows)
    assert all(r["time"]["freezeout_epoch_s"] > 0 for r in rows)
    # what every stage process pays, measured once: each stage's start-up spawned as DVC does
    over = rows[0]["time"]["overheads"]
    assert set(over["startup_s"]) == {"baseline", "cache", "train_suffix"}
    assert all(v > 0.05 for v in over["startup_s"].values()) and over["setup_s"] > 0
    assert set(over["accounting_s"]) == {"freezeout", "discard", "discard_aug"}
    for r in rows:
        t = r["time"]
        assert t["epochs_after"] == cfg.train.epochs - 1  # the smoke profile's first point
        fo, once = t["freezeout_epoch_s"], t["one_off_s"]
        for name in ("discard", "discard_aug"):
            # a second process at least: the one-off beyond FreezeOut's covers its start-up
            assert once[name] - once["freezeout"] > over["startup_s"]["cache"]
            saved = fo - t["epoch_s"][name]
            if saved > 0:
                expected = (once[name] - once["freezeout"]) / saved
                assert t["break_even_epochs"][name] == pytest.approx(expected)
        epochs = {"freezeout": fo, **t["epoch_s"]}
        for name, total in t["method_s"].items():
            assert total == pytest.approx(once[name] + t["epochs_after"] * epochs[name])
