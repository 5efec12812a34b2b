"""CIFAR-10, CelebA and image-folder datasets, on tiny fake copies written in the exact on-disk formats: shapes,
labels, class sets, splits, the decode cache and its invalidation, and the error messages."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench import data, grid
from bench.data import imagedata
from bench.errors import BenchError

# ------------------------------------------------------------------------------------------- CIFAR-10


def write_cifar(root: Path, per_batch: int = 4, test: int = 3) -> Path:
    """torchvision's cifar-10-batches-py/: five training batches and a test batch, pickled dicts with bytes keys;
    record i of every batch has red = 10·i, green = 100, blue = 200 (CHW order in the 3072 bytes)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def batch(n: int, offset: int) -> dict:
        pixels = np.zeros((n, 3, 32, 32), dtype=np.uint8)
        pixels[:, 0] = (10 * np.arange(n))[:, None, None]
        pixels[:, 1], pixels[:, 2] = 100, 200
        return {b"batch_label": b"x", b"labels": [(offset + i) % 10 for i in range(n)],
                b"data": pixels.reshape(n, 3072), b"filenames": [b"f"] * n}  # fmt: skip

    for k in range(1, 6):
        (folder / f"data_batch_{k}").write_bytes(pickle.dumps(batch(per_batch, k), protocol=2))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(test, 0), protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [c.encode() for c in imagedata.CIFAR_CLASSES]}))
    return folder


def test_cifar10_reads_the_pickles_in_chw_order(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    train = data.load("cifar10", "train", root=tmp_path)
    test = data.load("cifar10", "test", root=tmp_path)
    assert tuple(train.images.shape) == (20, 3, 32, 32) and tuple(test.images.shape) == (3, 3, 32, 32)
    assert train.num_classes == 10 and train.labels.tolist()[:4] == [1, 2, 3, 4]
    assert int(train.images[2, 0, 5, 5]) == 20 and int(train.images[2, 1, 0, 0]) == 100
    assert int(train.images[2, 2, 31, 31]) == 200
    assert data.spec("cifar10") == data.DataSpec(channels=3, height=32, width=32, num_classes=10, num_train=50_000)
    assert data.class_names("cifar10")[0] == "airplane"


def test_cifar10_errors_name_the_file_and_where_it_looked(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("BENCH_DATA", raising=False)
    with pytest.raises(
        BenchError, match=r"cifar10 not found: looked for data_batch_1..5 and test_batch in .*--download"
    ):
        data.load("cifar10", "train", root=tmp_path / "nothing")
    folder = write_cifar(tmp_path)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(BenchError, match=r"cannot read .*data_batch_3"):
        data.load("cifar10", "train", root=tmp_path)


# --------------------------------------------------------------------------------------------- CelebA

ATTRS = ["5_o_Clock_Shadow", "Black_Hair", "Blond_Hair", "Brown_Hair", "Male", "Young"]
# (partition, male, black, blond, brown) per image 000001.jpg ...
PEOPLE = [
    (0, 1, 1, 0, 0),
    (0, 0, 0, 1, 0),
    (0, 0, 0, 0, 1),
    (0, 1, 1, 1, 0),  # two hair colours: not in the hair set
    (0, 0, 0, 0, 0),  # none: not in the hair set
    (0, 1, 0, 0, 1),
    (1, 1, 1, 0, 0),  # validation: in no split
    (2, 0, 0, 1, 0),
    (2, 1, 1, 0, 0),
]


def celeba_image(i: int) -> Image.Image:
    """178×218 like the aligned CelebA: the top and bottom 20 rows red (cropped away by the centre square), the
    rest a colour that encodes i."""
    pixels = np.zeros((218, 178, 3), dtype=np.uint8)
    pixels[:, :] = (0, 20 * i, 250 - 20 * i)
    pixels[:20], pixels[-20:] = (255, 0, 0), (255, 0, 0)
    return Image.fromarray(pixels)


def write_celeba(root: Path) -> Path:
    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    attr_lines = [str(len(PEOPLE)), " ".join(ATTRS)]
    part_lines = []
    for i, (part, male, black, blond, brown) in enumerate(PEOPLE, start=1):
        name = f"{i:06d}.jpg"
        celeba_image(i).save(folder / "img_align_celeba" / name, quality=95)
        values = {"Male": male, "Black_Hair": black, "Blond_Hair": blond, "Brown_Hair": brown}
        attr_lines.append(name + " " + " ".join("1" if values.get(a) else "-1" for a in ATTRS))
        part_lines.append(f"{name} {part}")
    (folder / "list_attr_celeba.txt").write_text("\n".join(attr_lines) + "\n")
    (folder / "list_eval_partition.txt").write_text("\n".join(part_lines) + "\n")
    return folder


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("BENCH_DATA", raising=False)
    return tmp_path / "cache"


def test_celeba_gender_and_hair_labels_splits_and_centre_crop(tmp_path: Path, cache: Path) -> None:
    write_celeba(tmp_path)
    gender = data.load("celeba64-gender", "train", root=tmp_path)
    assert tuple(gender.images.shape) == (6, 3, 64, 64) and gender.num_classes == 2
    assert gender.labels.tolist() == [1, 0, 0, 1, 0, 1]  # Male, partition 0 only
    assert data.load("celeba64-gender", "test", root=tmp_path).labels.tolist() == [0, 1]  # partition 2
    hair = data.load("celeba32-hair", "train", root=tmp_path)
    assert tuple(hair.images.shape) == (4, 3, 32, 32) and hair.num_classes == 3
    assert hair.labels.tolist() == [0, 1, 2, 2]  # black, blonde, brown, brown; images 4 and 5 left out
    # the centre 178×178 square: no red band survives; image 1's colour is (0, 20, 230)
    first = gender.images[0].float()
    assert first[0].max() < 40 and abs(first[1].mean() - 20) < 6 and abs(first[2].mean() - 230) < 6
    # hair images are the gender images of the same records (one decode per size, shared)
    both = data.load("celeba32-gender", "train", root=tmp_path)
    assert torch.equal(hair.images, both.images[[0, 1, 2, 5]])
    assert data.spec("celeba32-hair", root=tmp_path).num_train == 4
    assert data.spec("celeba64-gender").num_train == 162_770  # without the files: the official count
    assert data.class_names("celeba64-hair") == ("black", "blonde", "brown")


def test_celeba_delta_follows_the_record_count(tmp_path: Path, cache: Path) -> None:
    (spec,) = grid.plan(methods=["dpmerf"], epsilons=[1.0], datasets=["celeba64-gender"], seeds=[0], delta=None,
                          accountant="rdp", profile="smoke", sets=[])  # fmt: skip
    assert spec.delta == 1e-6  # 162,770 training records ≥ 100,000


def test_celeba_decodes_once_and_again_when_a_file_changes(tmp_path: Path, cache: Path, monkeypatch) -> None:
    folder = write_celeba(tmp_path)
    decoded: list[int] = []
    real = imagedata._decode_chunk
    monkeypatch.setattr(imagedata, "_decode_chunk", lambda job: decoded.append(len(job[0])) or real(job))
    first = data.load("celeba32-gender", "train", root=tmp_path)
    assert sum(decoded) == 6 and len(list((cache / "datasets").glob("celeba32-train-*.npy"))) == 1
    again = data.load("celeba32-gender", "train", root=tmp_path)
    assert sum(decoded) == 6 and torch.equal(first.images, again.images)  # from the cache
    celeba_image(12).save(folder / "img_align_celeba" / "000002.jpg", quality=95)  # a changed file
    changed = data.load("celeba32-gender", "train", root=tmp_path)
    assert sum(decoded) == 12 and not torch.equal(first.images[1], changed.images[1])


def test_celeba_errors(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(BenchError, match=r"celeba64-gender not found: looked for list_attr_celeba.txt.*--data-root"):
        data.load("celeba64-gender", "train", root=tmp_path / "nothing")
    folder = write_celeba(tmp_path)
    (folder / "img_align_celeba" / "000003.jpg").write_bytes(b"\xff\xd8 broken jpeg")
    with pytest.raises(BenchError, match=r"cannot decode image .*000003.jpg"):
        data.load("celeba32-gender", "train", root=tmp_path)
    (folder / "img_align_celeba" / "000003.jpg").unlink()
    with pytest.raises(BenchError, match=r"1 image\(s\) of the train split are missing, e.g. .*000003.jpg"):
        data.load("celeba32-gender", "train", root=tmp_path)
    (folder / "list_attr_celeba.txt").write_text("1\nSmiling Young\n000001.jpg 1 -1\n")
    with pytest.raises(BenchError, match=r"has no attribute 'Male'"):
        data.load("celeba32-gender", "train", root=tmp_path)


# ------------------------------------------------------------------------------------------- folders


def write_folder(root: Path, per_class: int = 10, test_dir: bool = False) -> Path:
    """An ImageFolder: cats and dogs (PNG, JPEG, different sizes), optionally with a test/ sub-folder."""
    for split in ("train", "test") if test_dir else ("",):
        for label, cls in enumerate(("cat", "dog")):
            folder = root / split / cls
            folder.mkdir(parents=True)
            n = per_class if split != "test" else 3
            for i in range(n):
                pixels = np.full((40 + i, 30, 3), (200 * label, 50 + i, 100), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
            (folder / "notes.txt").write_text("not an image")
    return root


def test_folder_classes_seeded_split_and_options(tmp_path: Path, cache: Path) -> None:
    root = write_folder(tmp_path / "pets")
    name = f"folder:{root}?size=16&channels=1"
    train, test = data.load(name, "train"), data.load(name, "test")
    assert tuple(train.images.shape) == (18, 1, 16, 16) and tuple(test.images.shape) == (2, 1, 16, 16)
    assert train.num_classes == 2 and torch.bincount(train.labels).tolist() == [9, 9]
    assert data.class_names(name) == ("cat", "dog") and data.spec(name).num_train == 18
    assert data.load(f"folder:{root}?size=16&channels=1", "test").labels.tolist() == test.labels.tolist()  # seeded
    other = data.load(f"folder:{root}?size=16&channels=1&seed=5", "test")
    assert not torch.equal(other.images, test.images)  # another seed holds out other images
    rgb = data.load(f"folder:{root}", "train")  # defaults: 3×32×32
    assert tuple(rgb.images.shape[1:]) == (3, 32, 32) and int(rgb.images[-1, 0].float().mean()) == 200


def test_folder_with_a_test_subfolder(tmp_path: Path, cache: Path) -> None:
    root = write_folder(tmp_path / "pets", test_dir=True)
    train, test = data.load(f"folder:{root}?size=8", "train"), data.load(f"folder:{root}?size=8", "test")
    assert len(train) == 20 and len(test) == 6 and test.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_folder_errors(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(BenchError, match="is not a folder"):
        data.load(f"folder:{tmp_path / 'nothing'}", "train")
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(BenchError, match=r"has no class sub-folders: expected the ImageFolder layout"):
        data.load(f"folder:{tmp_path / 'flat'}", "train")
    with pytest.raises(BenchError, match=r"unknown option 'colour'"):
        data.load(f"folder:{tmp_path}?colour=1", "train")
    with pytest.raises(BenchError, match=r"channels 1 or 3"):
        data.load(f"folder:{tmp_path}?channels=2", "train")
    root = write_folder(tmp_path / "pets")
    (root / "dog" / "005.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(BenchError, match=r"cannot decode image .*dog/005.png"):
        data.load(f"folder:{root}", "train")


def test_bench_list_shows_each_dataset_shape_and_size() -> None:
    from tests.conftest import bench

    out = bench("list").stdout
    assert "cifar10" in out and "3×32×32, 10 classes, 50,000 train records" in out
    assert "celeba64-gender" in out and "3×64×64, 2 classes, 162,770 train records" in out
    assert "folder:PATH" in out


def test_a_folder_runs_end_to_end_and_its_run_key_follows_its_images(tmp_path: Path, cache: Path) -> None:
    import json

    from tests.conftest import TINY_PROFILE, bench

    root = write_folder(tmp_path / "pets", per_class=20)
    name = f"folder:{root}?size=16&channels=1"
    args = ["run", "--methods", "dpmerf", "--eps", "10", "--dataset", name, "--profile", TINY_PROFILE, "--device",
            "cpu", "--results", str(tmp_path / "res"), "--metrics", "fd_domain,acc_logreg"]  # fmt: skip
    r = bench(*args)
    assert r.exit_code == 0, r.output
    runs = sorted(p.name for p in (tmp_path / "res" / "runs").iterdir())
    assert [p.split("-")[:3] for p in runs] == [["dpmerf", "folder", "pets"], ["real", "folder", "pets"]]
    before = json.loads(bench(*args, "--dry-run").stdout.splitlines()[0])["key"]
    assert before == runs[0]
    Image.new("RGB", (30, 30), (9, 9, 9)).save(root / "cat" / "000.jpg")  # one image replaced
    after = json.loads(bench(*args, "--dry-run").stdout.splitlines()[0])["key"]
    assert after != before  # the changed folder is a new cell, never the old result
