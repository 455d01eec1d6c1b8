"""Adaptive freezing (freeze.points: auto): each criterion on runs whose answer is known, the
decision's resume, and the stage graph it shares with a fixed schedule."""

import io
import json
import math

import pytest
import torch
from torch import nn

from conftest import load_profile, needs_fashion, run, smoke_copy
from freezecache.config import Criterion, FreezePoint, parse_config
from freezecache.core.yamlio import dump_yaml, load_yaml
from freezecache.tooling import render
from freezecache.training.decide import Monitor, allowed_from, replay, resolve

STEPS = 20  # per epoch
STOPS = (2, 2, 3, 5)  # block b's weights (and gradient norms) stop changing at epoch STOPS[b]


class Chain(nn.Module):
    """stem + 4 linear blocks: the shape freezecache's models have (model.stem, model.blocks)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Identity()
        self.blocks = nn.Sequential(*(nn.Linear(8, 8) for _ in STOPS))


def _train(monitor: Monitor, model: Chain, epochs: range, point, allowed=lambda b, e: True):
    """A run whose blocks move until their STOPS epoch, then stand still; decides at epoch ends
    like the stage does. Returns the decision (or None) and the epoch it came at."""
    for epoch in epochs:
        for step in range(STEPS):
            gen = torch.Generator().manual_seed(epoch * STEPS + step)  # a resume draws the same
            for b, block in enumerate(model.blocks):
                moving = epoch < STOPS[b]
                for p in block.parameters():
                    noise = torch.randn(p.shape, generator=gen)
                    if moving:
                        with torch.no_grad():
                            p.add_(0.3 * p.norm() / math.sqrt(p.numel()) * noise)
                    # the gradient norm grows while the block learns, then settles
                    scale = 2.0 ** ((epoch * STEPS + step) / 5) if moving else 1.0
                    p.grad = torch.full_like(p, scale)
            monitor.after_backward()
        monitor.epoch = epoch
        decision = monitor.decide(point, epoch, allowed)
        if decision is not None:
            return decision
    return None


def _crit(rule: str, **changes) -> Criterion:
    values = {"rule": rule, "threshold": 1e-4, "interval": 5, "patience": 2, "epoch_max": 9}
    return Criterion(**{**values, **changes})


def _monitor(rule: str, **changes) -> tuple[Monitor, Chain]:
    model = Chain()
    probe = torch.randn(16, 8, generator=torch.Generator().manual_seed(2))
    return Monitor(model, _crit(rule, **changes), probe), model


AUTO = FreezePoint(block="auto", epoch="auto")
RULES = ("grad_change", "weight_change", "output_change")


@pytest.mark.parametrize("rule", RULES)
def test_each_criterion_freezes_the_blocks_that_stopped_when_they_stopped(rule):
    """Blocks 1-2 stop at epoch 2, block 3 at 3: the run freezes 2 blocks at epoch 2 (the first
    epoch end at which a front of ready blocks exists), not earlier, not deeper."""
    monitor, model = _monitor(rule)
    decision = _train(monitor, model, range(1, 10), AUTO)
    assert (decision["block"], decision["epoch"]) == (2, 2), decision
    assert decision["why"] == "the criterion fired" and decision["rule"] == rule
    assert decision["ready_depth"] == 2
    # the statistic of a standing block is below the threshold, of a moving one far above
    assert all(v < 1e-4 for v in decision["last"][:2]) and decision["last"][3] > 1e-2


@pytest.mark.parametrize("rule", RULES)
def test_a_fixed_block_waits_until_it_and_those_before_it_are_ready(rule):
    monitor, model = _monitor(rule)
    decision = _train(monitor, model, range(1, 10), FreezePoint(block=3, epoch="auto"))
    assert (decision["block"], decision["epoch"]) == (3, 3)


def test_a_fixed_epoch_freezes_the_deepest_ready_block_then():
    monitor, model = _monitor("weight_change")
    decision = _train(monitor, model, range(1, 10), FreezePoint(block="auto", epoch=4))
    assert (decision["block"], decision["epoch"]) == (3, 4)


def test_the_plan_s_refusal_and_the_cap_bound_the_decision():
    # block 2 refused by the plan: the deepest allowed ready block is 1
    monitor, model = _monitor("weight_change")
    decision = _train(monitor, model, range(1, 10), AUTO, allowed=lambda b, e: b != 2)
    assert (decision["block"], decision["epoch"]) == (1, 2)
    # nothing ready by epoch_max: the shallowest allowed block, at the cap
    monitor, model = _monitor("weight_change", epoch_max=1, min_block=2)
    decision = _train(monitor, model, range(1, 10), AUTO)
    assert (decision["block"], decision["epoch"]) == (2, 1)
    assert decision["why"].startswith("epoch_max reached")


@pytest.mark.parametrize("rule", RULES)
def test_a_monitor_resumed_from_its_state_decides_the_same(rule):
    whole, model = _monitor(rule)
    want = _train(whole, model, range(1, 10), AUTO)

    first, model = _monitor(rule)
    assert _train(first, model, range(1, 2), AUTO) is None  # killed after epoch 1
    saved = io.BytesIO()
    torch.save({"monitor": first.state(), "model": model.state_dict()}, saved)
    saved.seek(0)
    loaded = torch.load(saved, weights_only=False)
    second, model = _monitor(rule)
    model.load_state_dict(loaded["model"])
    second.load(loaded["monitor"])
    assert _train(second, model, range(2, 10), AUTO) == want
    assert json.dumps(second.rows) == json.dumps(whole.rows)  # NaN where nothing to compare


@pytest.mark.parametrize("rule", RULES)
def test_a_replay_of_the_measurements_decides_what_the_run_decided(rule):
    """One run measured to the end answers for every threshold: the replay of its record under
    threshold t decides what a run under t decided."""
    full, model = _monitor(rule)
    _train(full, model, range(1, 10), FreezePoint(block="auto", epoch=9))  # measures to the end
    rows = json.loads(json.dumps(full.record()))  # as decision.json holds them
    for threshold in (1e-4, 1e3):  # (2, 2) as above; everything ready: (3, 1)
        live, model = _monitor(rule, threshold=threshold)
        want = _train(live, model, range(1, 10), AUTO)
        got = replay(rows, _crit(rule, threshold=threshold), AUTO, lambda b, e: True)
        assert (got["block"], got["epoch"], got["step"]) == (want["block"], want["epoch"],
                                                             want["step"])  # fmt: skip


def test_allowed_blocks_need_the_disk_and_the_break_even():
    plan = {
        "blocks": {
            "1": {"fits": True, "flops_break_even_epochs": {"discard": 1.5, "discard_aug": 2.5}},
            "2": {"fits": False, "flops_break_even_epochs": {"discard": 1.0}},
            "3": {"fits": True, "flops_break_even_epochs": {"discard": 4.0}},
        }
    }
    allowed = allowed_from(plan, epochs=6)
    assert allowed(1, 3) and not allowed(1, 4)  # 2.5 epochs must remain after the freeze
    assert not allowed(2, 1)  # its caches do not fit
    assert allowed(3, 2) and not allowed(3, 3)
    assert not allowed(4, 1)  # not a candidate the plan measured


def test_auto_renders_the_stage_graph_of_one_fixed_point(tmp_path):
    """`auto` is one point: the same stages, items and names as [{block, epoch}]."""
    for name, points in (("auto", "auto"), ("fixed", [{"block": 3, "epoch": 1}])):
        folder = tmp_path / name
        folder.mkdir()
        raw = load_profile("default")
        raw["freeze"]["points"] = points
        (folder / "params.yaml").write_text(dump_yaml(raw))
    counts = [render.points_of(tmp_path / name / "params.yaml") for name in ("auto", "fixed")]
    assert counts == [1, 1]
    auto = render.render(points=counts[0])
    assert auto["stages"]["cache"]["matrix"]["p"] == [{"i": 0, "name": "p0", "prev": "../prefix"}]


def test_resolve_reads_the_seed_s_decision(tmp_path):
    from freezecache.core.errors import FreezecacheError

    raw = load_profile("smoke")
    raw["paths"] = {k: str(tmp_path / k) for k in raw["paths"]}
    raw["freeze"]["points"] = "auto"
    cfg = parse_config(raw)
    with pytest.raises(FreezecacheError, match="decision.json: missing"):
        resolve(cfg, 0)
    folder = tmp_path / "runs/s0/prefix"
    folder.mkdir(parents=True)
    (folder / "decision.json").write_text(json.dumps({"block": 4, "epoch": 2, "why": "x"}))
    got = resolve(cfg, 0)
    assert not got.auto and (got.points[0].block, got.points[0].epoch) == (4, 2)
    assert got.points[0].name == "p0" and got.point_epochs(0) == (2, cfg.train.epochs)


# -- the stages --------------------------------------------------------------------------------
def _stage_cfg(tmp_path, **criterion):
    raw = load_profile("smoke")
    raw["paths"] = {k: str(tmp_path / k) for k in raw["paths"]}
    raw["data"].update(train_size=96, val_size=32, test_size=48)
    raw["pretrain"] = None
    raw["rank"]["samples"] = 32
    raw["train"].update(batch_size=16, epochs=4)  # 6 steps an epoch
    crit = {"interval": 2, "patience": 1, **criterion}
    raw["freeze"] = {"points": "auto", "criterion": crit}
    return parse_config(raw)


def _prefix_chain(cfg):
    from freezecache.steps.baselines import train_prefix
    from freezecache.steps.plan import plan
    from freezecache.steps.prepare import prepare
    from freezecache.steps.pretrain import pretrain

    prepare(cfg)
    pretrain(cfg)
    plan(cfg)
    train_prefix(cfg, 0)


@pytest.mark.slow
@needs_fashion
def test_an_auto_run_decides_the_deepest_allowed_block_and_the_chain_follows(tmp_path):
    """Every block ready at the first measurement (a huge threshold): the run stops after epoch
    1 at the deepest block the plan allows; the cache, suffix and FreezeOut follow it."""
    from freezecache.steps.baselines import baseline
    from freezecache.steps.cache import cache_point
    from freezecache.steps.suffix import train_suffix
    from freezecache.training.train import RunState

    cfg = _stage_cfg(tmp_path, threshold=1e6, epoch_max=3)
    _prefix_chain(cfg)
    decision = json.loads((tmp_path / "runs/s0/prefix/decision.json").read_text())
    plan = json.loads((tmp_path / "runs/allowed_blocks.json").read_text())
    left = cfg.train.epochs - 1
    allowed = [int(b) for b, r in plan["blocks"].items() if r["fits"]
               and all(e <= left for e in r["flops_break_even_epochs"].values())]  # fmt: skip
    assert allowed, plan
    assert (decision["block"], decision["epoch"]) == (max(allowed), 1), decision
    prefix = RunState.load(tmp_path / "runs/s0/prefix/state.pt")
    assert prefix.epoch == 1 and "monitor" not in prefix.extra
    curves = tmp_path / "runs/s0/prefix/criterion/plots/metrics"
    assert {p.stem for p in curves.glob("*.tsv")} >= {"block1", "threshold"}

    cache_point(cfg, 0, "discard", 0)
    train_suffix(cfg, 0, "discard", 0)
    baseline(cfg, 0, "freezeout")
    suffix = RunState.load(tmp_path / "runs/s0/discard/p0/state.pt")
    assert [r["state"] for r in suffix.history] == ["full"] + ["discard"] * left
    freezeout = RunState.load(tmp_path / "runs/s0/freezeout/state.pt")
    assert [r["state"] for r in freezeout.history] == ["full"] + ["freeze"] * left


@pytest.mark.slow
@needs_fashion
@pytest.mark.extended  # the resume of a training stage: test_faults.py (CI)
def test_a_killed_decision_resumes_and_decides_the_same(tmp_path, monkeypatch):
    """Nothing ready (a threshold no change is below): the decision comes at epoch_max = 3; the
    run killed during epoch 2 resumes from its checkpoint and measures and decides the same."""
    from freezecache.training import decide

    whole = _stage_cfg(tmp_path / "whole", threshold=1e-12, epoch_max=3)
    _prefix_chain(whole)

    end_epoch = decide.Watch.end_epoch

    def killed(self, epoch, state):
        if epoch == 2:
            raise KeyboardInterrupt  # a SIGKILL after epoch 1's checkpoint
        return end_epoch(self, epoch, state)

    cut = _stage_cfg(tmp_path / "cut", threshold=1e-12, epoch_max=3)
    monkeypatch.setattr(decide.Watch, "end_epoch", killed)
    with pytest.raises(KeyboardInterrupt):
        _prefix_chain(cut)
    monkeypatch.setattr(decide.Watch, "end_epoch", end_epoch)
    from freezecache.steps.baselines import train_prefix

    train_prefix(cut, 0)

    a, b = (json.loads((d / "runs/s0/prefix/decision.json").read_text())
            for d in (tmp_path / "whole", tmp_path / "cut"))  # fmt: skip
    assert (a["block"], a["epoch"], a["step"]) == (b["block"], b["epoch"], b["step"])
    assert a["epoch"] == 3 and a["why"].startswith("epoch_max")
    assert a["last"] == pytest.approx(b["last"], rel=1e-5)


@pytest.mark.slow
@needs_fashion
@pytest.mark.extended  # a pipeline of its own; CI runs the auto chain once, above
def test_dvc_exp_run_with_auto_points_runs_the_same_stages(smoke_run, tmp_path):
    repo = smoke_copy(smoke_run, tmp_path / "repo")  # prepare and pretrain are reused
    params = load_yaml(repo / "params.yaml")
    params["freeze"]["points"] = [{"block": 2, "epoch": 1}]
    (repo / "params.yaml").write_text(dump_yaml(params))
    run(["freezecache", "pipeline"], repo)
    run("git add -A && git commit -qm one-point", repo)
    fixed = run(["dvc", "stage", "list", "--name-only"], repo).stdout.split()

    done = run(["dvc", "exp", "run", "-S", "freeze.points=auto"], repo)
    assert "Traceback" not in done.stdout + done.stderr
    assert run(["dvc", "stage", "list", "--name-only"], repo).stdout.split() == fixed
    decision = json.loads((repo / "runs/s0/prefix/decision.json").read_text())
    assert decision["block"] >= 1 and 1 <= decision["epoch"] <= 3
    report = json.loads((repo / "results/report.json").read_text())
    assert set(report["methods"]) == {"normal", "freezeout", "discard", "discard_aug"}
