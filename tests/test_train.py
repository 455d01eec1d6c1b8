"""The training loop: resume after a kill gives the same metrics; FreezeOut really freezes."""

import json
import signal
import subprocess
import time

import pytest
import torch

from conftest import ROOT, env_with_venv, load_profile, needs_fashion, run
from freezecache.config import Train
from freezecache.core.yamlio import dump_yaml
from freezecache.models import create_model
from freezecache.training.schedule import Phase
from freezecache.training.train import RunState, Trainer, TrainSpec, cosine_lr, set_frozen


def test_cosine_lr_schedule():
    assert cosine_lr(0.1, 0, 10) == pytest.approx(0.1)
    assert cosine_lr(0.1, 5, 10) == pytest.approx(0.05)
    assert cosine_lr(0.1, 10, 10) == pytest.approx(0.0)


def test_set_frozen_freezes_stem_and_first_blocks():
    model = create_model("resnet20", num_classes=10, in_chans=1, img_size=28)
    set_frozen(model, 3)
    assert not any(p.requires_grad for p in model.stem.parameters())
    assert not any(p.requires_grad for b in model.blocks[:3] for p in b.parameters())
    assert all(p.requires_grad for b in model.blocks[3:] for p in b.parameters())


def _toy_batches(epoch):
    g = torch.Generator().manual_seed(epoch)
    for _ in range(3):
        yield torch.randn(8, 1, 12, 12, generator=g), torch.randint(0, 10, (8,), generator=g)


def test_freeze_state_leaves_prefix_untouched_and_keeps_momentum_by_name():
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_chans=1, img_size=12)
    trainer = Trainer(model, Train(epochs=2, batch_size=8), seed=0, device=torch.device("cpu"))
    before = {k: v.clone() for k, v in model.stem.state_dict().items()}
    trainer.fit(
        TrainSpec(
            phase=Phase("freeze", 2, 0, 1),
            forward=model,
            batches=_toy_batches,
            steps_per_epoch=3,
            evaluate=lambda: {"test_acc": 0.0},
        )
    )
    after = model.stem.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN stats too: frozen = eval
    names = set(trainer.state.momentum)
    assert names and not any(n.startswith(("stem.", "blocks.0.", "blocks.1.")) for n in names)
    assert any(n.startswith("blocks.2.") for n in names)
    assert trainer.state.epoch == 1 and len(trainer.state.history) == 1


def test_runstate_roundtrip(tmp_path):
    s = RunState(
        model={"w": torch.ones(2)}, momentum={"w": torch.zeros(2)}, epoch=3, history=[{"epoch": 3}]
    )
    s.save(tmp_path / "s.pt")
    back = RunState.load(tmp_path / "s.pt")
    assert back.epoch == 3 and torch.equal(back.model["w"], torch.ones(2))


def _resume_project(tmp_path, name):
    d = tmp_path / name
    d.mkdir()
    raw = load_profile("smoke")
    raw["pretrain"] = None
    raw["train"]["epochs"] = 5
    raw["freeze"]["points"] = [{"block": 2, "epoch": 4}]
    raw["methods"] = {"baselines": ["normal"], "discard": []}
    (d / "params.yaml").write_text(dump_yaml(raw))
    for script in ("prepare", "pretrain"):
        run(["python", str(ROOT / f"stages/{script}.py")], d)
    return d


def _tsv(path) -> list[tuple[str, str]]:
    """DVCLive's rows without the timestamp column (step and value)."""
    rows = [line.split("\t") for line in path.read_text().splitlines()]
    keep = [i for i, name in enumerate(rows[0]) if name != "timestamp"]
    return [tuple(r[i] for i in keep) for r in rows]


@pytest.mark.slow
@needs_fashion
@pytest.mark.extended  # the stages' resume: test_faults.py (CI)
def test_resume_after_kill_gives_identical_metrics(tmp_path):
    cmd = ["python", str(ROOT / "stages/train_prefix.py"), "--seed", "0"]
    whole = _resume_project(tmp_path, "whole")
    run(cmd, whole)

    killed = _resume_project(tmp_path, "killed")
    proc = subprocess.Popen(
        cmd, cwd=killed, env=env_with_venv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckpt_dir = killed / ".ckpt" / "train_prefix@0"
    deadline = time.time() + 300
    while not list(ckpt_dir.glob("*.pt")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = RunState.load(next(ckpt_dir.glob("*.pt")))
    assert 1 <= partial.epoch < 4, "the kill must land mid-run"
    assert not (killed / "runs/s0/prefix/state.pt").exists()
    run(cmd, killed)

    a = RunState.load(whole / "runs/s0/prefix/state.pt")
    b = RunState.load(killed / "runs/s0/prefix/state.pt")
    assert b.epoch == a.epoch == 4
    for ra, rb in zip(a.history, b.history, strict=True):
        assert ra["val_acc"] == rb["val_acc"]
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-6)
    for k in a.model:
        assert torch.allclose(a.model[k].float(), b.model[k].float(), atol=1e-6), k
    assert not list(ckpt_dir.glob("*.pt")), "a finished stage removes its checkpoint"
    # DVCLive's curves and metrics: the resumed stage replays its history, so they match
    curves = sorted((whole / "runs/s0/prefix/live/plots/metrics").glob("*.tsv"))
    assert [c.name for c in curves] == sorted(
        c.name for c in (killed / "runs/s0/prefix/live/plots/metrics").glob("*.tsv")
    )
    for c in curves:
        if c.stem != "epoch_time_s":
            assert _tsv(c) == _tsv(killed / "runs/s0/prefix/live/plots/metrics" / c.name), c.name
    ma, mb = (
        json.loads((d / "runs/s0/prefix/live/metrics.json").read_text()) for d in (whole, killed)
    )
    for key in ("val_acc", "val_loss", "train_loss", "step", "epochs"):
        assert ma[key] == pytest.approx(mb[key], rel=1e-6), key


def test_raw_image_crops_pad_with_the_background_not_the_mean():
    """A crop's border is a black pixel (0), which normalises to -mean/std, not 0."""
    from freezecache.training.train import Images

    images = torch.full((4, 1, 6, 6), 200, dtype=torch.uint8)
    mean, std = torch.tensor([0.3]), torch.tensor([0.2])
    split = Images(images, torch.zeros(4, dtype=torch.long), mean, std)
    g = torch.Generator().manual_seed(1)
    x, _ = next(split.batches(4, g=g, train_aug=Train(crop_pad=2, flip_p=0.0)))
    background = (0.0 - 0.3) / 0.2
    inside = (200 / 255 - 0.3) / 0.2
    values = set(torch.round(x * 1e4).unique().tolist())
    assert values <= {round(background * 1e4), round(inside * 1e4)}
    assert round(background * 1e4) in values  # some crop shifted the image: its pad shows
