"""Memory/compute knobs (issue 5): checkpointing, micro-batching, fp16 loss scaling, bf16,
clipping, and the measured trade-off table."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import load_profile, needs_fashion
from freezecache.accounting.memory import accounted_memory
from freezecache.config import Train, parse_config
from freezecache.core.yamlio import dump_yaml
from freezecache.models import BlockModel, create_model
from freezecache.planning.tradeoffs import measure_tradeoffs, render_markdown, write
from freezecache.steps.prepare import prepare
from freezecache.tooling import render
from freezecache.training.train import Trainer

F32 = 4  # bytes per float32
CPU = torch.device("cpu")


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _activation_mb(model: nn.Module, x: torch.Tensor) -> float:
    mem = accounted_memory(model, x)
    return mem["saved_activations_mb"] + mem["recompute_peak_mb"]


# -- gradient checkpointing ------------------------------------------------------------------
def test_checkpointing_keeps_gradients_and_lowers_activation_memory():
    torch.manual_seed(0)
    plain = create_model("resnet20", num_classes=10, in_chans=1, img_size=16)
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True, every=1)
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    for model in (plain, ckpt):
        F.cross_entropy(model(x), y).backward()
    g_plain, g_ckpt = _grads(plain), _grads(ckpt)
    assert g_plain.keys() == g_ckpt.keys() and len(g_plain) > 0
    for name in g_plain:
        torch.testing.assert_close(g_ckpt[name], g_plain[name], rtol=1e-4, atol=1e-6)
    assert _activation_mb(ckpt, x) < 0.6 * _activation_mb(plain, x)


def _linear_blocks(width: int = 16, layers_per_block: int = 2) -> BlockModel:
    """Four blocks of (Linear, ReLU) x layers_per_block; identity stem and head."""

    def block() -> nn.Module:
        return nn.Sequential(
            *[m for _ in range(layers_per_block) for m in (nn.Linear(width, width), nn.ReLU())]
        )

    return BlockModel(
        nn.Identity(),
        [block() for _ in range(4)],
        nn.Identity(),
        kind="cnn",
        in_chans=width,
        img_size=1,
        num_classes=width,
    )


def test_checkpointed_memory_is_counted_by_hand():
    torch.manual_seed(0)
    model, x = _linear_blocks(), torch.randn(5, 16)
    unit = 5 * 16 * F32  # one (5, 16) activation
    off = accounted_memory(model, x)
    # Off: every ReLU output (2 per block) is kept; each Linear's input is the ReLU before it.
    assert off["saved_activations"] == 8 * unit and off["recompute_peak"] == 0
    model.set_grad_checkpointing(True, every=1)
    on = accounted_memory(model, x)
    # On: the checkpoints keep the inputs of blocks 1-3 (block 0's is the batch, counted apart);
    # backward rebuilds one block at a time: its two ReLU outputs.
    assert on["saved_activations"] == 3 * unit
    assert on["recompute_peak"] == 2 * unit
    assert on["total"] < off["total"]


def test_one_segment_over_all_blocks_accounts_what_no_checkpointing_does():
    # Recomputing everything in one segment rebuilds exactly what plain training keeps: an
    # honest count saves nothing (the kept input moves to the recompute peak).
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_chans=1, img_size=16)
    x = torch.randn(4, 1, 16, 16)
    off = accounted_memory(model, x)
    model.set_grad_checkpointing(True, every=model.num_blocks)
    on = accounted_memory(model, x)
    assert on["saved_activations"] < 0.2 * off["saved_activations"] and on["recompute_peak"] > 0
    assert on["total"] == off["total"]


# -- the training step's knobs, through Trainer.step ----------------------------------------
def _trainer(model: nn.Module, **train) -> tuple[Trainer, torch.optim.Optimizer]:
    trainer = Trainer(model, Train(**train), seed=0, device=CPU)
    return trainer, trainer.make_optimizer()


def test_micro_batches_give_the_full_batch_update_for_deit_tiny():
    torch.manual_seed(0)
    model = create_model("deit_tiny", num_classes=10, in_chans=1, img_size=8, patch_size=4)
    twin = copy.deepcopy(model)
    start = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    full, opt_full = _trainer(model, lr=0.1, weight_decay=5e-4)
    micro, opt_micro = _trainer(twin, lr=0.1, weight_decay=5e-4, micro_batch=4)  # 4 + 2
    for _ in range(2):  # the second step also checks the momentum the first one left
        loss_full, hits_full = full.step(opt_full, model, x, y, lr=0.1)
        loss_micro, hits_micro = micro.step(opt_micro, twin, x, y, lr=0.1)
        assert float(loss_micro) == pytest.approx(float(loss_full), rel=1e-5)
        assert int(hits_micro) == int(hits_full)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=name)
    assert not all(torch.equal(p, s) for p, s in zip(model.parameters(), start, strict=True))


def _tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _tiny_batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return 0.5 * torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_fp16_scaler_skips_an_inf_step_and_recovers():
    model = _tiny_net()
    trainer, opt = _trainer(model, precision="fp16", lr=0.1)
    assert trainer.scaler.is_enabled()
    x, y = _tiny_batch()
    poison = {"on": True}

    def forward(inp: torch.Tensor) -> torch.Tensor:
        logits = model(inp)
        if poison["on"]:  # an overflow in backward: the loss stays finite, a gradient does not
            logits.register_hook(lambda g: g * math.inf)
        return logits

    before = [p.detach().clone() for p in model.parameters()]
    scale = trainer.scaler.get_scale()
    trainer.step(opt, forward, x, y, lr=0.1)
    assert trainer.scaler.get_scale() < scale
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    poison["on"] = False
    scale = trainer.scaler.get_scale()
    trainer.step(opt, forward, x, y, lr=0.1)
    assert trainer.scaler.get_scale() == scale  # a finite step keeps the scale
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_bf16_trains_on_cpu():
    model = _tiny_net()
    trainer, opt = _trainer(model, precision="bf16", lr=0.2, weight_decay=0.0)
    x, y = _tiny_batch()
    losses = [trainer.step(opt, model, x, y, lr=0.2)[0] / len(y) for _ in range(30)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0]


def _grad_norm(model: nn.Module) -> float:
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_clip_grad_norm_bounds_the_update_norm(precision):
    x, y = _tiny_batch()
    free = _tiny_net()
    trainer, opt = _trainer(free, precision=precision)
    trainer.step(opt, free, x, y, lr=0.0)
    assert _grad_norm(free) > 0.05  # without clipping the norm is above the bound below
    clipped = _tiny_net()
    trainer, opt = _trainer(clipped, precision=precision, clip_grad_norm=0.05)
    trainer.step(opt, clipped, x, y, lr=0.0)
    # The grads left after the step are the unscaled, clipped ones the update used.
    assert _grad_norm(clipped) == pytest.approx(0.05, rel=1e-3)


# -- the trade-off table ---------------------------------------------------------------------
KEYS = {
    "precision",
    "grad_checkpointing",
    "part",
    "accounted_memory_mb",
    "cuda_peak_mb",
    "step_time_s",
    "step_flops",
    "recompute_flops_frac",
}


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory):
    """The smoke profile shrunk to 64 images of 16x16, prepared under a tmp folder."""
    root = tmp_path_factory.mktemp("tradeoffs")
    raw = load_profile("smoke")
    raw["paths"] = {k: str(root / v) for k, v in raw["paths"].items()}
    raw["data"].update(train_size=64, test_size=32, img_size=16)
    raw["train"]["batch_size"] = 16
    cfg = parse_config(raw)
    prepare(cfg)
    (root / "params.yaml").write_text(dump_yaml(raw))
    return cfg


@needs_fashion
def test_measure_tradeoffs_rows_on_a_tiny_config(tiny_cfg, tmp_path):
    rows = measure_tradeoffs(tiny_cfg, steps=1, warmup=1)
    assert len(rows) == 8 and all(KEYS <= set(r) for r in rows)
    combos = {(r["precision"], r["grad_checkpointing"], r["part"]) for r in rows}
    assert combos == {
        (p, c, part) for p in ("fp32", "bf16") for c in (False, True) for part in ("full", "suffix")
    }
    by = {(r["precision"], r["grad_checkpointing"], r["part"]): r for r in rows}
    for (precision, ckpt, part), r in by.items():
        assert r["step_time_s"] > 0 and r["cuda_peak_mb"] is None
        if not ckpt:
            assert r["recompute_flops_frac"] == 0.0
            continue
        off = by[(precision, False, part)]
        assert r["step_flops"] > off["step_flops"]
        assert r["accounted_memory_mb"] < off["accounted_memory_mb"]
        assert 0.1 < r["recompute_flops_frac"] < 0.5
    # The suffix is the cheaper part; bf16 halves the activations (plus its bf16 weight copies).
    assert by[("fp32", False, "suffix")]["step_flops"] < by[("fp32", False, "full")]["step_flops"]
    bf16, fp32 = (by[(p, False, "full")]["activation_memory_mb"] for p in ("bf16", "fp32"))
    assert 0.5 * fp32 < bf16 < 0.7 * fp32

    json_path, md_path = tmp_path / "t.json", tmp_path / "t.md"
    write(rows, json_path, md_path)
    assert json.loads(json_path.read_text()) == rows
    table = [line for line in md_path.read_text().splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 8 and md_path.read_text() == render_markdown(rows)


def test_measure_tradeoffs_rejects_zero_steps(tiny_cfg):
    from freezecache.core.errors import FreezecacheError

    with pytest.raises(FreezecacheError, match="steps=0"):
        measure_tradeoffs(tiny_cfg, steps=0)


def test_pipeline_has_the_tradeoffs_stage_before_the_report():
    from freezecache.config import Train

    stages = render.render()["stages"]
    stage = stages["tradeoffs"]
    assert stage["cmd"] == "python stages/tradeoffs.py"
    assert "${paths.runs}/s${seeds[0]}/prefix/state.pt" in stage["deps"]
    # every train key but the suffix's own (bn_recalibrate): tradeoffs times image training;
    # of the freeze section only the last point, through the view check writes for it
    assert stage["params"] == [
        "model",
        *(f"train.{k}" for k in Train.model_fields if k != "bn_recalibrate"),
        "runtime",
    ]
    assert "${paths.runs}/schedule_views/tradeoffs.json" in stage["deps"]
    outs = [o if isinstance(o, str) else next(iter(o)) for o in stage["outs"]]
    assert outs == ["${paths.results}/tradeoffs.json", "${paths.results}/tradeoffs.md"]
    assert "${paths.results}/tradeoffs.json" in stages["report"]["deps"]
