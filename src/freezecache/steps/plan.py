"""Stage plan: per candidate block, the cache's size and the savings, before any training; a
schedule whose caches would not fit on the disk stops the pipeline here."""

from __future__ import annotations

from freezecache.config import Config
from freezecache.core.io import atomic_write_json, atomic_write_text
from freezecache.planning.plan import make_plan, render_markdown
from freezecache.steps.context import Context


def plan(cfg: Config, write: bool = True) -> str:
    """Measures the plan on the prepared data with the starting weights; returns its table."""
    ctx = Context(cfg, cfg.seeds[0], "plan")
    model = ctx.new_model().eval()
    result = make_plan(ctx, model)
    text = render_markdown(result)
    if write:
        atomic_write_json(ctx.out("json"), result)
        atomic_write_text(ctx.out("md"), text)
        atomic_write_json(ctx.out("allowed"), result["allowed"])  # what a decision may take
    return text
