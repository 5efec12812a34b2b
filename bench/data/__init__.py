"""The datasets: where to find them, how to read them, what shape they have (uint8 tensors in memory).

    datasets.py    DATASETS (name -> loader), MNIST/Fashion-MNIST IDX files, the synthetic sets, spec/load/version
    imagedata.py   the colour sets from their standard layouts: CIFAR-10, CelebA, a user's image folder

The names the harness uses are importable from `bench.data` itself.
"""

from __future__ import annotations

from bench.cache import cache_root
from bench.contract import DataSpec, ImageDataset
from bench.data.datasets import (
    DATASETS,
    FOLDER,
    DatasetLoader,
    IdxDataset,
    Split,
    SyntheticDataset,
    class_names,
    file_stem,
    load,
    read_idx,
    spec,
    spec_without_files,
    version,
)
from bench.data.imagedata import CelebADataset, Cifar10Dataset, FolderDataset, search_roots

__all__ = [
    "DATASETS",
    "FOLDER",
    "DataSpec",
    "ImageDataset",
    "CelebADataset",
    "Cifar10Dataset",
    "DatasetLoader",
    "FolderDataset",
    "IdxDataset",
    "Split",
    "SyntheticDataset",
    "cache_root",
    "class_names",
    "file_stem",
    "load",
    "read_idx",
    "search_roots",
    "spec",
    "spec_without_files",
    "version",
]
