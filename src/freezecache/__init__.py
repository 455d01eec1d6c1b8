"""freezecache: train to a freeze point, cache the frozen prefix's activations, train the rest."""

__version__ = "0.1.0"
