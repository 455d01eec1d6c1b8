"""Names users choose from in params whose implementations live in later layers, declared here
once so that params validation reads them without importing those layers: an import is a
promise about what reruns, and no training stage should rerun when a codec changes.

:mod:`freezecache.codecs` re-exports them and its registry builds exactly these.
"""

CODECS = ("quant", "zfp", "none")  # cache.codec
CODINGS = ("zstd", "rans")  # cache.coding: quant's lossless stage
