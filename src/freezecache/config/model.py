"""The params' model: ``model`` built for the prepared data's classes, channels and size, the one
place that does it (the stages through :mod:`freezecache.steps.model`, the trade-offs
measurement, ``freezecache check``)."""

from __future__ import annotations

from freezecache.config import Model
from freezecache.config.checks import model_kwargs_problems
from freezecache.core.errors import FreezecacheError, ModelOptionError
from freezecache.models import BlockModel, create_model


def build_model(model: Model, meta: dict) -> BlockModel:
    """The params' model for data with ``meta`` (classes, channels, image size): ``model.kwargs``
    meet the arguments freezecache derives here only, and a refusal is one line per problem
    that names its key (``model.kwargs.patch_size: ...``), in a stage as in ``check``."""
    # parse_config refuses these already; this covers a Model built in code (tradeoffs, tests)
    problems = model_kwargs_problems(model.kwargs)
    if problems:
        raise FreezecacheError("\n".join(problems))
    try:
        return create_model(
            model.name,
            num_classes=meta["num_classes"],
            in_chans=meta["channels"],
            img_size=meta["img_size"],
            **model.kwargs,
        )
    except ModelOptionError as err:
        raise FreezecacheError(f"model.{err.key}: {err}") from None
