"""Stage pretrain: the starting weights every seed fine-tunes from.

With a `pretrain` section the model is trained from scratch on the source data (for Split
Fashion-MNIST, the other class split); with `model.checkpoint`, a local weights file is read;
otherwise the state is empty and each seed starts from its own random init. The weights are
saved without the classifier, which the target classes replace.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from freezecache.accounting.costs import method_costs, require_counter
from freezecache.config import Config
from freezecache.core.records import Costs
from freezecache.steps.context import Context
from freezecache.steps.prepare import prepare_data
from freezecache.steps.run import Run, image_spec
from freezecache.training.schedule import Phase
from freezecache.training.train import RunState


def _body(model) -> dict:
    """The weights without the classifier."""
    state = model.state_dict()
    return {k: v.detach().cpu().clone() for k, v in state.items() if not k.startswith("head.")}


def pretrain(cfg: Config) -> None:
    p = cfg.pretrain
    seed = cfg.seeds[0]  # one pre-trained model, shared by every seed (as the paper does)
    if p is not None:
        require_counter()  # the run counts its FLOPs at the end: say now if it cannot
    if p is None:
        ctx = Context(cfg, seed, "pretrain")
        model = ctx.new_model()
        weights = {}
        if cfg.model.checkpoint:
            from freezecache.models import load_checkpoint

            load_checkpoint(model, cfg.model.checkpoint)  # head replaced if classes differ
            weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        run = Run(ctx, model, RunState(model={}))
        run.state.model = weights
        run.finish(Costs(source="checkpoint" if weights else "random init"))
        return
    with tempfile.TemporaryDirectory(prefix="freezecache-pretrain-") as tmp:
        source = Path(tmp) / "data"
        prepare_data(p.data, source, cfg)  # deterministic: a resumed run sees the same bytes
        pcfg = cfg.model_copy(
            update={"train": cfg.train.model_copy(update={"epochs": p.epochs, "lr": p.lr})}
        )
        ctx = Context(pcfg, seed, "pretrain", prepared=source, params=cfg)
        model = ctx.new_model()
        run = Run(ctx, model, None)
        run.fit(image_spec(ctx, model, Phase("full", 0, 0, p.epochs)))
        schedule = [("full", 0, p.epochs)]
        history = run.state.history
        costs = method_costs(ctx, model, "normal", history, schedule=schedule) if ctx.main else {}
        if ctx.main:
            costs.source = f"pre-trained on {p.data.name} classes {p.data.classes or 'all'}"
        run.state.model = _body(model)
        # test accuracy on the source task: says how good the pre-trained features are
        run.finish(costs, final=True)
