"""Colour image datasets read from their standard on-disk layouts: CIFAR-10, CelebA (gender, hair; 32 and 64 px)
and a user's own image folder; decoded once and cached.

Where the files are found: `--data-root DIR` (or `BENCH_DATA`), then the download cache ($BENCH_CACHE/data),
each as DIR itself and DIR/<torchvision's folder name>; CIFAR-10 also through torchvision's downloader with
`--download`. CelebA's official site needs a manual download (torchvision's Google-Drive fetch is rate-limited).

- **CIFAR-10**: torchvision's `cifar-10-batches-py/` pickles (data_batch_1..5, test_batch; keys b"data"
  uint8 [10000, 3072] in CHW order and b"labels"), read as they are: 3×32×32, 50,000 train, 10,000 test.
  Unpickling takes about a second, so CIFAR-10 is not cached.
- **CelebA**: `celeba/img_align_celeba/*.jpg` (178×218) with `list_attr_celeba.txt` and
  `list_eval_partition.txt` (torchvision's layout). Splits: the official partition, train = 0 (162,770
  records), test = 2 (19,962); the validation partition is not used, as torchvision's split="train"/"test".
  Preprocessing: the centre square crop of the shorter side (178×178) resized with Lanczos to 32 or 64, as
  nv-tlabs/DPDM@29bb94d92bb5440a664dbaa915c06a7397ea9ff3:dataset_tool.py (make_transform, "center-crop") and
  2019ChenGong/DPImageBench@565f8d7e2e0d2faaec43108971db3269519579af:data/preprocess_dataset.py prepare it.
  Deviation: DataLens (whose CelebA-Gender/Hair accuracies DP-SAD's table reports) loads pre-made pickles that
  are not in its repository (AI-secure/DataLens@72d0f2f evaluation/train-classifier-celebA.py); its utils.py
  has DCGAN-tensorflow's 108×108 centre crop resized bilinearly, which we do not use.
  Labels: gender = the `Male` attribute (0 female, 1 male); hair = black, blonde, brown (`Black_Hair`,
  `Blond_Hair`, `Brown_Hair`) over the records with exactly one of the three, as the DataLens/DP-SAD papers.
- **folder:PATH**: torchvision's ImageFolder layout, one sub-folder per class (PATH/<class>/*.png|jpg|...);
  a PATH/test/<class>/ folder (with PATH/train/<class>/ or the class folders beside it) is the test split,
  else a seeded 10% of each class is held out. Options after `?`: `size` (default 32), `channels` (1 or 3,
  default 3), `test` (held-out fraction, default 0.1), `seed` (default 0), e.g. `folder:/data/xray?size=64&
  channels=1`. Every image is converted to the channels, centre-cropped to a square and resized (Lanczos),
  as CelebA. Class names and the record count come from the folder.

Decoding happens once per (source files, preprocessing): the uint8 arrays are written to
$BENCH_CACHE/datasets/<name>-<fingerprint>.npy, where the fingerprint hashes every source file's name, size
and modification time with the preprocessing; a later load reads the .npy (seconds) and a changed file
decodes again. A corrupt image is an error naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from bench.cache import cache_root
from bench.contract import DataSpec, ImageDataset
from bench.errors import BenchError

Split = Literal["train", "test"]
CACHE_VERSION = 1  # bump when decoding or preprocessing changes: the cached arrays are then rebuilt
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def search_roots(root: Path | None, *system: Path) -> list[Path]:
    """Where a dataset is looked for, in order: --data-root, $BENCH_DATA, the system's package folders (`system`),
    then the download cache."""
    roots = [root] if root is not None else []
    if os.environ.get("BENCH_DATA"):
        roots.append(Path(os.environ["BENCH_DATA"]).expanduser())
    return [*roots, *system, cache_root() / "data"]


# ---------------------------------------------------------------------------------------------------
# Decoding and the cache
# ---------------------------------------------------------------------------------------------------


def preprocess(path: Path, size: int, channels: int) -> np.ndarray:
    """One image file as uint8 [C, size, size]: converted to L or RGB, the centre square of its shorter side,
    resized with Lanczos (DPDM's dataset_tool "center-crop"). BenchError naming the file if it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            im: Image.Image = opened.convert("L" if channels == 1 else "RGB")
        w, h = im.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        im = im.crop((left, top, left + side, top + side))
        if side != size:
            im = im.resize((size, size), Image.Resampling.LANCZOS)
        array = np.asarray(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise BenchError(f"cannot decode image {path} ({type(e).__name__}: {e}); replace or delete the file") from None
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def _decode_chunk(args: tuple[list[str], int, int]) -> np.ndarray:
    paths, size, channels = args
    return (
        np.stack([preprocess(Path(p), size, channels) for p in paths])
        if paths
        else np.zeros((0, channels, size, size), np.uint8)
    )


def fingerprint(files: Sequence[Path], params: dict[str, Any]) -> str:
    """A hash of every file's name, size and modification time, and of the preprocessing parameters."""
    digest = hashlib.sha256(json.dumps({**params, "cache_version": CACHE_VERSION}, sort_keys=True).encode())
    for f in files:
        st = f.stat()
        digest.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def decode_cached(
    name: str, files: Sequence[Path], *, size: int, channels: int, workers: int | None = None, mapped: bool = False
) -> np.ndarray:
    """uint8 [N, C, size, size] of `files`, decoded in parallel with a progress bar the first time and read from
    the cache ($BENCH_CACHE/datasets/<name>-<fingerprint>.npy) afterwards: in memory (one copy), or with `mapped`
    as a read-only memory map of the cache file, for a caller that keeps a subset (its copy is then the only one)."""
    if not files:
        return np.zeros((0, channels, size, size), dtype=np.uint8)
    key = fingerprint(files, {"size": size, "channels": channels, "name": name})
    path = cache_root() / "datasets" / f"{name}-{key}.npy"
    if path.is_file():
        try:
            cached = np.load(path, mmap_mode="r" if mapped else None)
            if cached.shape == (len(files), channels, size, size) and cached.dtype == np.uint8:
                return cached
        except (OSError, ValueError):
            pass  # a damaged cache file: decode again and overwrite it
    out = np.empty((len(files), channels, size, size), dtype=np.uint8)
    chunk = 256
    jobs = [([str(f) for f in files[i : i + chunk]], size, channels) for i in range(0, len(files), chunk)]
    workers = workers or max(1, min(len(jobs), os.cpu_count() or 1))
    with _bar(f"decoding {name} ({len(files):,} images, once)", len(files)) as advance:
        if workers == 1:
            results: Iterable[np.ndarray] = map(_decode_chunk, jobs)
            for i, block in enumerate(results):
                out[i * chunk : i * chunk + len(block)] = block
                advance(len(block))
        else:
            with ProcessPoolExecutor(workers) as pool:
                for i, block in enumerate(pool.map(_decode_chunk, jobs)):
                    out[i * chunk : i * chunk + len(block)] = block
                    advance(len(block))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, out)
    os.replace(tmp, path)
    return out


class _bar:
    """A rich progress bar on stderr (a no-op without a terminal)."""

    def __init__(self, description: str, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from bench.ui import console

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), console=console, disable=not console.is_terminal)  # fmt: skip
        self.task = self.progress.add_task(description, total=total)

    def __enter__(self) -> Callable[[int], None]:
        self.progress.start()
        return lambda n: self.progress.advance(self.task, n)

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()


# ---------------------------------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------------------------------

CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _unpickle(path: Path) -> dict[bytes, Any]:
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise BenchError(f"cannot read {path} ({type(e).__name__}: {e}); delete or replace the file") from None
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        raise BenchError(f"{path} is not a CIFAR-10 batch (no b'data' and b'labels'); delete or replace the file")
    return d


@dataclass(frozen=True)
class Cifar10Dataset:
    name: str = "cifar10"
    class_names: tuple[str, ...] | None = CIFAR_CLASSES

    def spec(self, root: Path | None = None) -> DataSpec:
        return DataSpec(channels=3, height=32, width=32, num_classes=10, num_train=50_000)

    def _folder(self, root: Path | None) -> Path | None:
        for base in search_roots(root):
            for folder in (base / "cifar-10-batches-py", base / "cifar10" / "cifar-10-batches-py", base):
                if (folder / "data_batch_1").is_file() and (folder / "test_batch").is_file():
                    return folder
        return None

    def load(self, split: Split, root: Path | None = None, download: bool = False) -> ImageDataset:
        folder = self._folder(root)
        if folder is None and download:
            import torchvision.datasets

            try:
                torchvision.datasets.CIFAR10(root=str(cache_root() / "data"), train=True, download=True)
            except Exception as e:  # noqa: BLE001 - offline, mirror down, disk full: say so in one line
                raise BenchError(
                    f"downloading cifar10 failed ({type(e).__name__}: {' '.join(str(e).split())})"
                ) from None
            folder = self._folder(root)
        if folder is None:
            looked = ", ".join(
                f"{b}/{{,cifar-10-batches-py/,cifar10/cifar-10-batches-py/}}" for b in search_roots(root)
            )
            raise BenchError(
                f"cifar10 not found: looked for data_batch_1..5 and test_batch in {looked}; pass --data-root DIR "
                "with torchvision's cifar-10-batches-py/ folder, or --download when online"
            )
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        images, labels = [], []
        for n in names:
            d = _unpickle(folder / n)
            data = np.asarray(d[b"data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3072 or len(d[b"labels"]) != len(data):
                raise BenchError(f"{folder / n} has data {data.shape}, expected [N, 3072] and N labels; replace it")
            images.append(data.reshape(-1, 3, 32, 32))
            labels.append(np.asarray(d[b"labels"], dtype=np.int64))
        y = np.concatenate(labels)
        if len(y) and (y.min() < 0 or y.max() > 9):
            raise BenchError(f"{folder} has labels outside 0..9; replace the files")
        return ImageDataset(torch.from_numpy(np.concatenate(images)), torch.from_numpy(y), 10, self.name)


# ---------------------------------------------------------------------------------------------------
# CelebA
# ---------------------------------------------------------------------------------------------------

HAIR = ("Black_Hair", "Blond_Hair", "Brown_Hair")
CELEBA_PARTITION = {"train": 0, "test": 2}


@dataclass(frozen=True)
class CelebADataset:
    """CelebA at `size` px with the `task`'s labels (see the module docstring)."""

    size: int
    task: Literal["gender", "hair"]
    name: str = ""
    class_names: tuple[str, ...] | None = None
    # records of the official train partition: all of them for gender; for hair, those with exactly one of the
    # three hair colours (counted from list_attr_celeba.txt when it is found; this value otherwise)
    num_train: int = 162_770

    def spec(self, root: Path | None = None) -> DataSpec:
        n = self.num_train
        if self.task == "hair":  # its record count (which sets δ) is counted from the attribute file
            if (folder := self._folder(root)) is None:
                raise BenchError(f"{self.name} (its record count is read from its files) {self._missing(root)}")
            n = int(self._records(folder, "train")[1].shape[0])
        return DataSpec(channels=3, height=self.size, width=self.size, num_classes=2 if self.task == "gender" else 3,
                        num_train=n)  # fmt: skip

    def _folder(self, root: Path | None) -> Path | None:
        for base in search_roots(root):
            for folder in (base / "celeba", base):
                if (folder / "list_attr_celeba.txt").is_file() and (folder / "list_eval_partition.txt").is_file():
                    return folder
        return None

    def _missing(self, root: Path | None) -> str:
        looked = ", ".join(f"{b}/{{celeba/,}}" for b in search_roots(root))
        return (
            f"not found: looked for list_attr_celeba.txt, list_eval_partition.txt and img_align_celeba/ in "
            f"{looked}; download CelebA (Align&Cropped images and the annotation files) from its site and pass "
            "--data-root DIR (DIR/celeba/img_align_celeba/*.jpg, as torchvision lays it out)"
        )

    def _records(self, folder: Path, split: Split) -> tuple[list[str], np.ndarray]:
        """File names and labels of the split's records (in the partition file's order)."""
        attr_path, part_path = folder / "list_attr_celeba.txt", folder / "list_eval_partition.txt"
        try:
            lines = attr_path.read_text().splitlines()
            names = lines[1].split()
            rows = {}
            for line in lines[2:]:
                parts = line.split()
                if parts:
                    rows[parts[0]] = parts[1:]
            partition = [line.split() for line in part_path.read_text().splitlines() if line.strip()]
        except (OSError, IndexError, UnicodeDecodeError) as e:
            raise BenchError(f"cannot read {attr_path} or {part_path} ({e}); replace them") from None
        wanted = ("Male",) if self.task == "gender" else HAIR
        missing = [a for a in wanted if a not in names]
        if missing:
            raise BenchError(f"{attr_path} has no attribute {missing[0]!r} (its header: {' '.join(names[:5])} ...)")
        columns = [names.index(a) for a in wanted]
        files, labels = [], []
        for entry in partition:
            if len(entry) != 2 or entry[1] not in "012":
                raise BenchError(f"{part_path}: bad line {' '.join(entry)!r}; expected '<file> <0|1|2>'")
            if int(entry[1]) != CELEBA_PARTITION[split]:
                continue
            attrs = rows.get(entry[0])
            if attrs is None or len(attrs) != len(names):
                raise BenchError(f"{attr_path}: no attributes for {entry[0]} (listed in {part_path.name})")
            on = [attrs[c] == "1" for c in columns]
            if self.task == "gender":
                label = int(on[0])
            elif sum(on) == 1:
                label = on.index(True)
            else:
                continue
            files.append(entry[0])
            labels.append(label)
        return files, np.asarray(labels, dtype=np.int64)

    def load(self, split: Split, root: Path | None = None, download: bool = False) -> ImageDataset:
        folder = self._folder(root)
        if folder is None:
            raise BenchError(f"{self.name} {self._missing(root)}")
        names, labels = self._records(folder, split)
        images_dir = folder / "img_align_celeba"
        if not images_dir.is_dir():
            raise BenchError(f"{images_dir} is not a folder: expected the aligned CelebA JPEGs there")
        files = [images_dir / n for n in names]
        if absent := [f for f in files if not f.is_file()]:
            raise BenchError(f"{len(absent)} image(s) of the {split} split are missing, e.g. {absent[0]}")
        # decode the whole partition once per size (gender and hair share it), then keep the task's records
        # the gender task keeps every record of the split: only hair parses the file a second time
        every = names if self.task == "gender" else CelebADataset(self.size, "gender")._records(folder, split)[0]
        subset = len(every) != len(names)
        all_files = [images_dir / n for n in every]
        images = decode_cached(f"celeba{self.size}-{split}", all_files, size=self.size, channels=3, mapped=subset)
        if subset:  # from the memory map: the subset is the one copy in memory
            position = {n: i for i, n in enumerate(every)}
            images = np.ascontiguousarray(images[np.asarray([position[n] for n in names], dtype=np.int64)])
        num_classes = 2 if self.task == "gender" else 3
        return ImageDataset(torch.from_numpy(images), torch.from_numpy(labels), num_classes, self.name)


# ---------------------------------------------------------------------------------------------------
# A user's image folder
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FolderDataset:
    """`folder:PATH?size=32&channels=3&test=0.1&seed=0` (see the module docstring)."""

    path: Path
    size: int = 32
    channels: int = 3
    test: float = 0.1
    seed: int = 0
    name: str = ""

    @staticmethod
    def parse(text: str) -> FolderDataset:
        spec = text.removeprefix("folder:")
        path_text, _, query = spec.partition("?")
        if not path_text:
            raise BenchError("folder: needs a path, e.g. --dataset folder:/data/my-images")
        raw = dict(urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=False)) if query else {}
        unknown = sorted(set(raw) - {"size", "channels", "test", "seed"})
        if unknown:
            raise BenchError(f"{text}: unknown option {unknown[0]!r}; options: size, channels, test, seed")
        try:
            size, channels = int(raw.get("size", 32)), int(raw.get("channels", 3))
            test, seed = float(raw.get("test", 0.1)), int(raw.get("seed", 0))
        except ValueError as e:
            raise BenchError(f"{text}: {e}") from None
        if not 4 <= size <= 1024 or channels not in (1, 3) or not 0 < test < 1 or seed < 0:
            raise BenchError(f"{text}: need 4 ≤ size ≤ 1024, channels 1 or 3, 0 < test < 1, seed ≥ 0")
        return FolderDataset(Path(path_text).expanduser(), size, channels, test, seed, name=text)

    @property
    def class_names(self) -> tuple[str, ...] | None:
        return tuple(self._classes())

    def _train_dir(self) -> Path:
        return self.path / "train" if (self.path / "train").is_dir() else self.path

    def _classes(self) -> list[str]:
        if not self.path.is_dir():
            raise BenchError(f"{self.path} is not a folder (dataset {self.name})")
        base = self._train_dir()
        classes = sorted(p.name for p in base.iterdir() if p.is_dir() and p.name not in ("test", "train"))
        if not classes:
            raise BenchError(
                f"{base} has no class sub-folders: expected the ImageFolder layout {base}/<class>/<image> "
                f"(and optionally {self.path}/test/<class>/<image>)"
            )
        return classes

    def _images(self, folder: Path) -> list[Path]:
        return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    def _split_files(self, split: Split) -> tuple[list[Path], np.ndarray]:
        classes = self._classes()
        test_dir = self.path / "test"
        files: list[Path] = []
        labels: list[int] = []
        for label, cls in enumerate(classes):
            found = self._images(self._train_dir() / cls)
            if test_dir.is_dir():
                chosen = found if split == "train" else self._images(test_dir / cls)
            else:  # a seeded share of each class held out
                rng = np.random.default_rng([self.seed, label])
                held = set(rng.permutation(len(found))[: max(1, round(self.test * len(found)))].tolist())
                held = held if len(found) > 1 else set()
                chosen = [f for i, f in enumerate(found) if (i in held) == (split == "test")]
            files += chosen
            labels += [label] * len(chosen)
        if not files:
            raise BenchError(f"{self.name}: no images in the {split} split (looked for {', '.join(IMAGE_SUFFIXES)})")
        return files, np.asarray(labels, dtype=np.int64)

    def version(self) -> str:
        """A fingerprint of the folder's images (names, sizes, times) and options: part of every run key on this
        dataset, so that changed images are never reused as the old ones."""
        files = [*self._split_files("train")[0], *self._split_files("test")[0]]
        return fingerprint(files, {"size": self.size, "channels": self.channels, "test": self.test, "seed": self.seed})

    def spec(self, root: Path | None = None) -> DataSpec:
        files, _ = self._split_files("train")
        return DataSpec(channels=self.channels, height=self.size, width=self.size, num_classes=len(self._classes()),
                        num_train=len(files))  # fmt: skip

    def load(self, split: Split, root: Path | None = None, download: bool = False) -> ImageDataset:
        files, labels = self._split_files(split)
        tag = hashlib.sha256(str(self.path.resolve()).encode()).hexdigest()[:8]
        images = decode_cached(f"folder-{tag}-{split}", files, size=self.size, channels=self.channels)
        return ImageDataset(torch.from_numpy(images), torch.from_numpy(labels), len(self._classes()), self.name)
