import dataclasses
import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import data
from bench.contract import DataSpec
from bench.errors import BenchError

SYSTEM_FMNIST = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> Path:
    """Write uint8 `array` as an IDX file (gzipped when the name ends in .gz)."""
    magic = magic if magic is not None else {3: 2051, 1: 2049}[array.ndim]
    raw = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape) + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def write_split(folder: Path, n: int, split: str = "train", gz: bool = True, seed: int = 0) -> np.ndarray:
    """Write n random 28×28 images and labels in IDX format; returns the labels."""
    rng = np.random.default_rng(seed)
    prefix = "train" if split == "train" else "t10k"
    ext = ".gz" if gz else ""
    write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
    labels = rng.integers(0, 10, n).astype(np.uint8)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", labels)
    return labels


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """fmnist with its system folder, BENCH_DATA and the cache all under tmp_path (initially empty)."""
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("BENCH_DATA", raising=False)
    fmnist = dataclasses.replace(data.DATASETS["fmnist"], system_dir=tmp_path / "system")
    monkeypatch.setitem(data.DATASETS, "fmnist", fmnist)
    return tmp_path


@pytest.mark.parametrize("gz", [True, False])
def test_load_idx_files(isolated, gz):
    labels = write_split(isolated / "root", 7, "test", gz=gz)
    ds = data.load("fmnist", "test", root=isolated / "root")
    assert ds.images.shape == (7, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == labels.tolist()
    assert ds.num_classes == 10 and ds.name == "fmnist"


@pytest.mark.parametrize("sub", ["fmnist", "FashionMNIST/raw"])
def test_load_from_subfolder_layouts(isolated, sub):
    write_split(isolated / "root" / sub, 3)
    assert len(data.load("fmnist", "train", root=str(isolated / "root"))) == 3


def test_search_order(isolated, monkeypatch):
    write_split(isolated / "root", 2)
    write_split(isolated / "env", 3)
    write_split(isolated / "system", 4)
    write_split(isolated / "cache" / "data" / "FashionMNIST" / "raw", 5)
    monkeypatch.setenv("BENCH_DATA", str(isolated / "env"))
    assert len(data.load("fmnist", "train", root=isolated / "root")) == 2
    assert len(data.load("fmnist", "train")) == 3
    monkeypatch.delenv("BENCH_DATA")
    assert len(data.load("fmnist", "train")) == 4
    monkeypatch.setitem(
        data.DATASETS, "fmnist", dataclasses.replace(data.DATASETS["fmnist"], system_dir=isolated / "x")
    )
    assert len(data.load("fmnist", "train")) == 5


def test_missing_dataset_message(isolated, monkeypatch):
    monkeypatch.setenv("BENCH_DATA", str(isolated / "env"))
    with pytest.raises(BenchError) as e:
        data.load("fmnist", "train", root=isolated / "root")
    msg = str(e.value)
    assert "\n" not in msg
    for folder in ("root", "env", "system", "cache/data"):
        assert str(isolated / folder) in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "--data-root" in msg and "--download" in msg


def test_download_goes_to_cache(isolated, monkeypatch):
    calls = []

    class FakeFashionMNIST:  # stands in for torchvision's downloader: writes its raw/ layout
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            write_split(Path(root) / "FashionMNIST" / "raw", 6)

    monkeypatch.setattr("torchvision.datasets.FashionMNIST", FakeFashionMNIST)
    with pytest.raises(BenchError):
        data.load("fmnist", "train")  # no download unless asked
    assert calls == []
    assert len(data.load("fmnist", "train", download=True)) == 6
    assert calls == [(str(isolated / "cache" / "data"), True, True)]


def test_download_failure_is_a_bench_error(isolated, monkeypatch):
    def offline(root, train, download):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nno network")

    monkeypatch.setattr("torchvision.datasets.FashionMNIST", offline)
    with pytest.raises(BenchError, match="downloading fmnist failed") as e:
        data.load("fmnist", "train", download=True)
    assert "\n" not in str(e.value)


def test_corrupt_files(isolated):
    root = isolated / "root"
    write_split(root, 4)
    images = root / "train-images-idx3-ubyte.gz"
    labels = root / "train-labels-idx1-ubyte.gz"

    write_idx(images, np.zeros((4, 28, 28), np.uint8), magic=1234)
    with pytest.raises(BenchError, match="train-images-idx3-ubyte.gz.*magic"):
        data.load("fmnist", "train", root=root)

    write_idx(images, np.zeros((4, 28, 28), np.uint8))
    images.write_bytes(gzip.compress(gzip.decompress(images.read_bytes())[:-10]))  # 10 pixels short
    with pytest.raises(BenchError, match="train-images-idx3-ubyte.gz is truncated"):
        data.load("fmnist", "train", root=root)

    images.write_bytes(b"not gzip at all")
    with pytest.raises(BenchError, match="cannot read .*train-images-idx3-ubyte.gz"):
        data.load("fmnist", "train", root=root)

    write_idx(images, np.zeros((5, 28, 28), np.uint8))
    with pytest.raises(BenchError, match="5 images .*4 labels"):
        data.load("fmnist", "train", root=root)

    write_idx(images, np.zeros((4, 28, 28), np.uint8))
    write_idx(labels, np.array([0, 1, 2, 10], np.uint8))
    with pytest.raises(BenchError, match="train-labels-idx1-ubyte.gz has label 10"):
        data.load("fmnist", "train", root=root)


def test_unknown_names():
    with pytest.raises(BenchError, match="unknown dataset 'nope'.*mnist, fmnist, synthetic"):
        data.load("nope", "train")
    with pytest.raises(BenchError, match="unknown split"):
        data.load("synthetic", "val")  # type: ignore[arg-type]


def test_specs_need_no_data(isolated):
    expected = DataSpec(channels=1, height=28, width=28, num_classes=10, num_train=60_000)
    assert data.spec("fmnist") == expected and data.spec("mnist") == expected
    assert data.spec("synthetic") == data.load("synthetic", "train").spec
    assert data.class_names("fmnist")[0] == "T-shirt/top"


def test_synthetic_is_deterministic_tiny_and_balanced():
    train, test = data.load("synthetic", "train"), data.load("synthetic", "test")
    again = data.load("synthetic", "train")
    assert torch.equal(train.images, again.images) and torch.equal(train.labels, again.labels)
    assert train.images.shape == (2000, 1, 16, 16) and test.images.shape == (500, 1, 16, 16)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert train.labels.bincount().tolist() == [200] * 10
    assert not torch.equal(train.images[:500], test.images)
    # classes differ in where the bright pixels are
    means = torch.stack([train.images[train.labels == k].float().mean(0) for k in range(10)]).flatten(1)
    assert torch.cdist(means, means).add(torch.eye(10) * 1e9).min() > 100


@pytest.mark.skipif(not SYSTEM_FMNIST.is_dir(), reason="Fashion-MNIST system package not installed")
def test_real_fmnist(monkeypatch, tmp_path):
    monkeypatch.delenv("BENCH_DATA", raising=False)
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path))
    train, test = data.load("fmnist", "train"), data.load("fmnist", "test")
    assert len(train) == 60_000 and len(test) == 10_000
    assert train.images.shape[1:] == (1, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels.bincount().tolist() == [6000] * 10
    assert train.spec == data.spec("fmnist")
