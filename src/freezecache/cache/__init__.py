"""The activation cache: a frozen prefix's outputs for a whole data set, in one HDF5 file.

Built by one function, :func:`freezecache.cache.build.write_cache` (the cache stage, and the
public ``freezecache.build_cache`` of :mod:`.from_data`), read for training by one class,
:class:`freezecache.cache.features.CachedFeatures` (train_suffix's batches, and any user's
``DataLoader``). Underneath::

    spec = CacheSpec.at(cfg, model, block, index, ranked)   # the recipe (spec.py)
    with CacheWriter(path, spec.new_codec(), spec.layout_for(n), prefix_hash=h) as w:
        w.add(x, y, extra)                                  # writer.py
    info = open_cache(path)                                 # format.py: checked, described
    loader = make_loader(path, info, batch_size=..., seed=...)   # loader.py

One file per job: ``build`` (the build), ``from_data`` (a build from any Dataset), ``features``
(the reader for training), ``format`` (layout, digests, opening), ``writer`` (chunking,
threads, the resumable spool), ``encode`` (the writer's thread tasks), ``spool`` (durable build
progress), ``assemble`` (the file from spools), ``reader`` (items and batches), ``loader``
(samplers and the memory policy), ``feed`` and ``fused`` (decoding and augmenting batches),
``size`` (the size estimate) and ``spec`` (the recipe). The codecs are :mod:`freezecache.codecs`.
These modules are imported one by one, so a stage depends only on those it uses.
"""

from freezecache.cache.format import CacheInfo, Layout, open_cache
from freezecache.cache.loader import empty_tail, held_in_memory, make_loader, set_epoch
from freezecache.cache.reader import finish_batch, iter_cache
from freezecache.cache.spec import CacheSpec
from freezecache.cache.writer import Build, CacheWriter

__all__ = [
    "Build",
    "CacheInfo",
    "CacheSpec",
    "CacheWriter",
    "Layout",
    "empty_tail",
    "finish_batch",
    "held_in_memory",
    "iter_cache",
    "make_loader",
    "open_cache",
    "set_epoch",
]
