"""Datasets: read a real dataset from local files, subset it, fit it to the model, store it.

Sources are read in their published formats, one reader module each: ``fashion_mnist`` (IDX
gzip), ``cifar`` (CIFAR-10/100 python tarballs), ``tiny_imagenet`` (the zip or its folder) and
``imagefolder`` (a train/ and test/ tree of class folders). ``classes`` keeps a subset of the
classes, ``subset`` draws seeded class-balanced subsets, ``fit`` pads/resizes and converts
channels, and ``prepared`` writes and reads the prepared folder (train/val/test .npz +
meta.json).
"""

from freezecache.data.base import Split
from freezecache.data.cifar import CIFAR10_CLASSES
from freezecache.data.fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_ROOT, read_idx
from freezecache.data.fit import LUMA, fit_images
from freezecache.data.prepared import (
    FINGERPRINT_METHOD,
    load_prepared,
    load_val,
    prepare,
    source_fingerprint,
)
from freezecache.data.sources import SOURCES, check_classes, known_num_classes, load_source
from freezecache.data.subset import stratified_subset

__all__ = [
    "CIFAR10_CLASSES",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ROOT",
    "FINGERPRINT_METHOD",
    "LUMA",
    "SOURCES",
    "Split",
    "check_classes",
    "fit_images",
    "known_num_classes",
    "load_prepared",
    "load_source",
    "load_val",
    "prepare",
    "read_idx",
    "source_fingerprint",
    "stratified_subset",
]
