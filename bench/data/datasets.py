"""Datasets as uint8 tensors in memory: where to find them, how to read them, what shape they have.

`DATASETS` maps a name to a loader; adding a dataset is one entry. Every loader has `spec(root)`, which
is cheap (known constants, no data read), and `load(split, root, download)`. The real training split
is the private data; the test split is only used for evaluation.
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch

from bench.cache import cache_root
from bench.contract import DataSpec, ImageDataset
from bench.data.imagedata import CelebADataset, Cifar10Dataset, FolderDataset, search_roots
from bench.errors import BenchError

Split = Literal["train", "test"]


class DatasetLoader(Protocol):
    @property
    def class_names(self) -> tuple[str, ...] | None: ...

    def spec(self, root: Path | None) -> DataSpec: ...
    def load(self, split: Split, root: Path | None, download: bool) -> ImageDataset: ...


# ---------------------------------------------------------------------------------------------------
# IDX files (MNIST and Fashion-MNIST), http://yann.lecun.com/exdb/mnist/
# ---------------------------------------------------------------------------------------------------

_IDX_MAGIC = {3: 2051, 1: 2049}  # ndim -> magic number of unsigned-byte images (3) and labels (1)
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file (plain or .gz) with `ndim` dimensions; BenchError if it is corrupt."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise BenchError(f"cannot read {path}: {e}; delete or replace the file") from e
    header = 4 + 4 * ndim
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else -1
    if magic != _IDX_MAGIC[ndim] or len(raw) < header:
        raise BenchError(
            f"{path} is not an IDX file with {ndim} dimension(s) (magic {magic}, "
            f"expected {_IDX_MAGIC[ndim]}); delete or replace the file"
        )
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) - header != int(np.prod(dims)):
        raise BenchError(
            f"{path} is truncated or corrupt: header says {dims} ({int(np.prod(dims))} bytes), "
            f"found {len(raw) - header} bytes; delete or replace the file"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):  # plain first: faster to read
        if (folder / name).is_file():
            return folder / name
    return None


@dataclass(frozen=True)
class IdxDataset:
    """MNIST-style IDX files: 1×28×28 uint8 images, 10 classes."""

    name: str
    torchvision_class: str  # class in torchvision.datasets; also its folder name: <root>/<class>/raw/
    system_dir: Path  # where the system's dataset package puts the files
    how_to_get: str = ""  # a remedy for the error message, before --data-root and --download
    class_names: tuple[str, ...] | None = None
    num_train: int = 60_000

    def spec(self, root: Path | None = None) -> DataSpec:
        return DataSpec(channels=1, height=28, width=28, num_classes=10, num_train=self.num_train)

    def _folders(self, root: Path) -> list[Path]:
        return [root, root / self.name, root / self.torchvision_class / "raw"]

    def _find(self, split: Split, roots: list[Path]) -> tuple[Path, Path] | None:
        images_stem, labels_stem = _IDX_FILES[split]
        for root in roots:
            for folder in self._folders(root):
                images, labels = _find_file(folder, images_stem), _find_file(folder, labels_stem)
                if images is not None and labels is not None:
                    return images, labels
        return None

    def _download(self, split: Split) -> None:
        import torchvision.datasets

        cls = getattr(torchvision.datasets, self.torchvision_class)
        try:
            cls(root=str(cache_root() / "data"), train=split == "train", download=True)
        except Exception as e:  # offline, mirror down, disk full: the user can only retry or fetch by hand
            msg = " ".join(str(e).split())
            raise BenchError(f"downloading {self.name} failed ({type(e).__name__}: {msg})") from e

    def load(self, split: Split, root: Path | None = None, download: bool = False) -> ImageDataset:
        roots = search_roots(root, self.system_dir)
        found = self._find(split, roots)
        if found is None and download:
            self._download(split)
            found = self._find(split, roots)
        if found is None:
            images_stem, labels_stem = _IDX_FILES[split]
            sub = f"{{,{self.name}/,{self.torchvision_class}/raw/}}"
            remedy = f"{self.how_to_get}, or pass" if self.how_to_get else "pass"
            raise BenchError(
                f"{self.name} {split} split not found: looked for {images_stem}[.gz] and {labels_stem}[.gz] "
                f"in {', '.join(str(r) + '/' + sub for r in roots)}; to get it: {remedy} --data-root DIR "
                "with the IDX files, or --download when online"
            )
        images_path, labels_path = found
        images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
        if len(images) != len(labels):
            raise BenchError(
                f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels; "
                "replace the mismatched file"
            )
        if len(labels) and labels.max() >= 10:
            raise BenchError(f"{labels_path} has label {labels.max()}, expected 0..9; replace the file")
        return ImageDataset(
            images=torch.from_numpy(images.copy()).unsqueeze(1),  # [N, 1, 28, 28]
            labels=torch.from_numpy(labels.astype(np.int64)),
            num_classes=10,
            name=self.name,
        )


# ---------------------------------------------------------------------------------------------------
# Synthetic: procedural bars, for tests and dry runs
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticDataset:
    """C×S×S images in 10 classes: a bright bar, horizontal (classes 0-4) or vertical (5-9), at a
    class-dependent row or column, with random length, offset, brightness and a little pixel noise. With 3
    channels each class also has its own colour (so colour carries class information, as in CIFAR-10)."""

    size: int = 16
    channels: int = 1
    name: str = "synthetic"
    num_classes: int = 10
    num_train: int = 2_000
    num_test: int = 500
    seed: int = 20240601
    class_names: tuple[str, ...] | None = tuple(f"{d} bar {k}" for d in ("horizontal", "vertical") for k in range(5))

    def spec(self, root: Path | None = None) -> DataSpec:
        return DataSpec(
            channels=self.channels,
            height=self.size,
            width=self.size,
            num_classes=self.num_classes,
            num_train=self.num_train,
        )

    def load(self, split: Split, root: Path | None = None, download: bool = False) -> ImageDataset:
        n = self.num_train if split == "train" else self.num_test
        rng = np.random.default_rng([self.seed, 0 if split == "train" else 1])
        labels = rng.permutation(np.arange(n) % self.num_classes)  # balanced
        s, scale = self.size, self.size / 16  # positions and lengths of the 16×16 design, scaled
        images = np.zeros((n, s, s), dtype=np.float32)
        k = labels % 5
        pos = np.floor((3 * k + 1 + rng.integers(0, 2, n)) * scale).astype(int)  # bar row/column, jittered
        start = np.floor(rng.integers(1, 5, n) * scale).astype(int)
        length = np.floor(rng.integers(8, 12, n) * scale).astype(int)
        width = max(2, round(2 * scale))
        brightness = rng.uniform(160, 255, n)
        for i in range(n):
            bar = images[i] if labels[i] < 5 else images[i].T  # the transposed view draws a vertical bar
            bar[pos[i] : pos[i] + width, start[i] : start[i] + length[i]] = brightness[i]
        if self.channels == 3:  # class colour: a hue per class, as RGB weights in [0.25, 1]
            hue = 2 * np.pi * labels / self.num_classes
            colour = 0.625 + 0.375 * np.cos(hue[:, None] - np.array([0.0, 2.0944, 4.1888]))  # [n, 3]
            pixels = images[:, None] * colour[:, :, None, None].astype(np.float32)
        else:
            pixels = images[:, None]
        pixels += rng.normal(0.0, 12.0, pixels.shape)
        return ImageDataset(
            images=torch.from_numpy(np.clip(np.rint(pixels), 0, 255).astype(np.uint8)),  # [N, C, S, S]
            labels=torch.from_numpy(labels.astype(np.int64)),
            num_classes=self.num_classes,
            name=self.name,
        )


# ---------------------------------------------------------------------------------------------------

DATASETS: dict[str, DatasetLoader] = {
    "mnist": IdxDataset(
        name="mnist",
        torchvision_class="MNIST",
        system_dir=Path("/usr/share/datasets/mnist"),
        class_names=tuple(str(d) for d in range(10)),
    ),
    "fmnist": IdxDataset(
        name="fmnist",
        torchvision_class="FashionMNIST",
        system_dir=Path("/usr/share/datasets/fashion-mnist"),
        how_to_get="apt-get install dataset-fashion-mnist",
        class_names=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),  # fmt: skip
    ),
    "synthetic": SyntheticDataset(),
    # colour versions at the sizes of CIFAR-10/CelebA-32 and CelebA-64, for tests and dry runs of those shapes
    "synthetic-rgb32": SyntheticDataset(size=32, channels=3, name="synthetic-rgb32"),
    "synthetic-rgb64": SyntheticDataset(size=64, channels=3, name="synthetic-rgb64", num_train=1_000, num_test=200),
    "cifar10": Cifar10Dataset(),
    "celeba32-gender": CelebADataset(32, "gender", "celeba32-gender", ("female", "male")),
    "celeba64-gender": CelebADataset(64, "gender", "celeba64-gender", ("female", "male")),
    "celeba32-hair": CelebADataset(32, "hair", "celeba32-hair", ("black", "blonde", "brown"), 0),
    "celeba64-hair": CelebADataset(64, "hair", "celeba64-hair", ("black", "blonde", "brown"), 0),
}
FOLDER = "folder:"  # folder:PATH[?size=..&channels=..&test=..&seed=..], a user's ImageFolder (bench.data.imagedata)


def _loader(name: str) -> DatasetLoader:
    if name.startswith(FOLDER):
        return FolderDataset.parse(name)
    if name not in DATASETS:
        raise BenchError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}, or folder:PATH")
    return DATASETS[name]


def _path(root: str | Path | None) -> Path | None:
    """--data-root as a Path; a file there is refused (a folder is meant, and its files would never be found)."""
    if root is None:
        return None
    path = Path(root).expanduser()
    if path.exists() and not path.is_dir():
        raise BenchError(f"--data-root {root} is a file, not a folder: give the folder that holds the dataset files")
    return path


def spec(name: str, root: str | Path | None = None) -> DataSpec:
    """The dataset's shape, without reading the data (a dry run needs no data)."""
    return _loader(name).spec(_path(root))


def file_stem(name: str) -> str:
    """A dataset name as it can appear in a file or folder name: `folder:/data/x?size=64` becomes `folder-x`
    (what a cache or run folder needs beyond that is in its fingerprint or key)."""
    if name.startswith(FOLDER):
        path = name.removeprefix(FOLDER).partition("?")[0].rstrip("/")
        name = "folder-" + (Path(path).name or "root")
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


def version(name: str, root: str | Path | None = None) -> str:
    """What a run key records of a dataset's content beyond its name: a user folder's fingerprint; "" for the
    published datasets, whose content is fixed."""
    loader = _loader(name)
    return loader.version() if isinstance(loader, FolderDataset) else ""


def spec_without_files(name: str) -> DataSpec:
    """The shape and classes of a dataset whose record count needs its files (CelebA-Hair), count 0."""
    loader = _loader(name)
    if isinstance(loader, CelebADataset):
        return DataSpec(channels=3, height=loader.size, width=loader.size, num_classes=3, num_train=0)
    return loader.spec(None)


def class_names(name: str) -> tuple[str, ...] | None:
    """Human-readable class names, or None where the dataset has none."""
    return _loader(name).class_names


def load(name: str, split: Split, *, root: str | Path | None = None, download: bool = False) -> ImageDataset:
    """Load a split as uint8 [N, C, H, W] images and int64 [N] labels.

    Looks in `root`, then `$BENCH_DATA`, then the system's dataset package folder, then the download
    cache ($BENCH_CACHE/data); downloads there only when `download` is true. BenchError if not found.
    """
    if split not in ("train", "test"):
        raise BenchError(f"unknown split {split!r}; choose 'train' or 'test'")
    return _loader(name).load(split, _path(root), download)
