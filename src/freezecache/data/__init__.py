"""Datasets: read a real dataset from local files, subset it, fit it to the model, store it.

Sources are read in their published formats, one reader module each: ``fashion_mnist`` (IDX
gzip), ``cifar`` (CIFAR-10/100 python tarballs), ``tiny_imagenet`` (the zip or its folder) and
``imagefolder`` (your own class folders, scanned once by ``scan``: every bad file at once).
``images`` decodes a file as Pillow and timm do and fits it to the model's input, ``classes``
keeps a subset of the classes (ids or names), ``subset`` draws seeded class-balanced subsets,
``fit`` pads/resizes arrays, and ``prepared`` plans the splits and writes and reads the prepared
folder (train/val/test .npz + meta.json).
"""

from freezecache.data.base import Split
from freezecache.data.cifar import CIFAR10_CLASSES
from freezecache.data.fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_ROOT, read_idx
from freezecache.data.fit import LUMA, fit_images
from freezecache.data.images import Fit, decode_image
from freezecache.data.prepared import (
    FINGERPRINT_METHOD,
    load_labels,
    load_prepared,
    load_val,
    prepare,
    read_meta,
    source_fingerprint,
)
from freezecache.data.scan import Scan, bad_file_lines, files_fingerprint, scan_folder
from freezecache.data.sources import (
    SOURCES,
    check_classes,
    known_num_classes,
    load_source,
    source_files,
)
from freezecache.data.splits import SplitPlan, plan_splits
from freezecache.data.subset import stratified_subset

__all__ = [
    "CIFAR10_CLASSES",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ROOT",
    "FINGERPRINT_METHOD",
    "LUMA",
    "SOURCES",
    "Fit",
    "Scan",
    "Split",
    "SplitPlan",
    "bad_file_lines",
    "check_classes",
    "decode_image",
    "files_fingerprint",
    "fit_images",
    "known_num_classes",
    "load_labels",
    "load_prepared",
    "load_source",
    "load_val",
    "plan_splits",
    "prepare",
    "read_idx",
    "read_meta",
    "scan_folder",
    "source_files",
    "source_fingerprint",
    "stratified_subset",
]
