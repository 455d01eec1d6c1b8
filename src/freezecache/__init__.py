"""freezecache: train to a freeze point, cache the frozen prefix's activations, train the rest.

From Python, in any training loop (the names are loaded on first use, so that ``import
freezecache`` stays light and the pipeline's stages never load them)::

    import freezecache as fc

    model = fc.load_model("resnet20", num_classes=10, in_chans=1, img_size=28)
    prefix, suffix = fc.split(model, 3)
    fc.build_cache(prefix, train_set, "cache.h5")
    features = fc.CachedFeatures("cache.h5", flip_p=0.5, crop_pad=1)

The pipeline (``dvc repro``) is the `freezecache` command and ``stages/``; see the README.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)

# public name -> the module of the library that defines it (see freezecache.api)
_PUBLIC = {
    "load_model": "api",
    "blocks": "api",
    "split": "api",
    "build_cache": "cache.from_data",
    "CacheSummary": "cache.from_data",
    "CachedFeatures": "cache.features",
    "FreezecacheError": "core.errors",
}
__all__ = [
    "load_model",
    "blocks",
    "split",
    "build_cache",
    "CacheSummary",
    "CachedFeatures",
    "FreezecacheError",
    "__version__",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load on first use
    from freezecache.api import blocks, load_model, split
    from freezecache.cache.features import CachedFeatures
    from freezecache.cache.from_data import CacheSummary, build_cache
    from freezecache.core.errors import FreezecacheError


def __getattr__(name: str):
    # Not an import statement: the stages' code deps are derived from imports, and a stage that
    # imports freezecache.pipeline runs this file without ever asking for these names.
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'freezecache' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
