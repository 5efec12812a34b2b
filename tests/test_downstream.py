import json

import pytest
import torch

from bench.errors import BenchError
from bench.metrics import downstream
from bench.metrics.downstream import DATALENS_NOTE, downstream_accuracy, real_reference

ALL = ("logreg", "mlp", "cnn", "cnn_datalens")
DPDM = ("logreg", "mlp", "cnn")
E = 7  # epochs
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small(train):
    """1,500 real training records: enough to learn the bars in a few epochs, fast to train on."""
    return train.subset(torch.arange(1500))


@pytest.fixture(scope="module")
def trained(small, test_split):
    return downstream_accuracy(small.images, small.labels, test_split, seed=0, epochs=E)


def without_time(records):
    return {k: {f: v for f, v in r.items() if f != "seconds"} for k, r in records.items()}


def test_real_training_data_gives_high_accuracy(trained, small, test_split):
    assert list(trained) == [f"acc_{n}" for n in ALL]
    for name, r in trained.items():
        assert r["value"] > 80, (name, r["value"], r["curve"])
        assert r["classifier_seed"] == 0 and r["n_test"] == len(test_split) and r["epochs"] == E
        assert 1 <= r["selected_epoch"] <= E and len(r["curve"]) == E
    for n in DPDM:
        r = trained[f"acc_{n}"]
        assert r["protocol"] == "dpdm" and r["test_selected"] is False and r["note"] == ""
        assert (r["n_train"], r["n_val"]) == (1350, 150)
    r = trained["acc_cnn_datalens"]
    assert r["protocol"] == "datalens" and r["test_selected"] is True and r["note"] == DATALENS_NOTE
    assert (r["n_train"], r["n_val"]) == (1500, 0)
    json.dumps(trained)  # records are plain JSON


def test_shuffled_labels_give_chance_accuracy(small, test_split):
    labels = small.labels[torch.randperm(len(small), generator=torch.Generator().manual_seed(1))]
    records = downstream_accuracy(small.images, labels, test_split, seed=0, epochs=3)
    for name, r in records.items():
        assert r["value"] < 30, (name, r["value"])


def test_same_seed_same_records_other_seed_other_values(trained, small, test_split):
    rng_state = torch.get_rng_state()
    again = downstream_accuracy(small.images, small.labels, test_split, seed=0, epochs=E)
    assert without_time(again) == without_time(trained)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the global RNG is left untouched
    # a classifier's record does not depend on which others are requested
    alone = downstream_accuracy(small.images, small.labels, test_split, seed=0, epochs=E, classifiers=["mlp"])
    assert without_time(alone) == {"acc_mlp": without_time(trained)["acc_mlp"]}
    other = downstream_accuracy(small.images, small.labels, test_split, seed=1, epochs=E)
    for key in trained:
        assert other[key]["classifier_seed"] == 1
        assert other[key]["curve"] != trained[key]["curve"] or other[key]["per_class"] != trained[key]["per_class"]


def test_dpdm_selects_without_the_test_split_datalens_on_it(trained, small, test_split, monkeypatch):
    # scoring against corrupted test labels changes no dpdm selection...
    perm = torch.randperm(len(test_split), generator=torch.Generator().manual_seed(2))
    corrupt = type(test_split)(test_split.images, test_split.labels[perm], test_split.num_classes)
    calls = []
    predict = downstream._predict
    monkeypatch.setattr(
        downstream, "_predict", lambda model, images: calls.append(images is corrupt.images) or predict(model, images)
    )
    records = downstream_accuracy(small.images, small.labels, corrupt, seed=0, epochs=E, classifiers=DPDM)
    for key, r in records.items():
        assert r["selected_epoch"] == trained[key]["selected_epoch"] and r["curve"] == trained[key]["curve"]
        assert r["value"] < 30  # ... only the reported accuracy, which is now near chance
    # ... and each dpdm classifier looked at the test images once, after selection (E epochs of validation)
    assert calls == ([False] * E + [True]) * len(DPDM)
    # datalens: the value is the best test accuracy over the epochs, at the first epoch reaching it
    r = trained["acc_cnn_datalens"]
    assert r["value"] == max(r["curve"]) and r["curve"].index(r["value"]) + 1 == r["selected_epoch"]


def test_per_class_weighted_mean_is_the_accuracy(trained, test_split):
    counts = torch.bincount(test_split.labels, minlength=test_split.num_classes).tolist()
    for r in trained.values():
        assert len(r["per_class"]) == test_split.num_classes
        weighted = sum(a * c for a, c in zip(r["per_class"], counts, strict=True)) / sum(counts)
        assert weighted == pytest.approx(r["value"])


def test_real_reference_is_cached(small, test_split, monkeypatch, tmp_path):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path))
    kwargs = dict(dataset="synthetic", seed=0, classifiers=("logreg", "mlp"), epochs=2)
    first = real_reference(small, test_split, **kwargs)
    assert list(first) == ["acc_logreg", "acc_mlp"] and first["acc_mlp"]["reference"] == "real train"
    assert len(list((tmp_path / "downstream").glob("*.json"))) == 2
    assert not list((tmp_path / "downstream").glob("*.tmp*"))

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although cached")

    monkeypatch.setattr(downstream, "_fit_one", no_training)
    assert real_reference(small, test_split, **kwargs) == first
    with pytest.raises(AssertionError, match="retrained"):  # another seed is another reference
        real_reference(small, test_split, **{**kwargs, "seed": 1})


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(classifiers=["logreg", "resnet"]), "unknown downstream classifier.*'resnet'.*valid: logreg, mlp, cnn"),
        (dict(labels=torch.full((20,), 10)), r"labels must be in 0\.\.9, got 10\.\.10"),
        (dict(labels=torch.full((20,), -1)), r"labels must be in 0\.\.9"),
        (dict(labels=torch.zeros(20, dtype=torch.int32)), "labels must be an int64 tensor, got torch.int32"),
        (dict(labels=torch.zeros(19, dtype=torch.int64)), r"labels must be \[N\] = \[20\]"),
        (dict(images=torch.zeros(20, 1, 16, 16)), "images must be uint8"),
        (dict(images=torch.zeros(20, 1, 8, 8, dtype=torch.uint8)), "test split is"),
        (dict(epochs=0), "epochs"),
    ],
)
def test_bad_input_is_a_one_line_bench_error(test_split, change, match):
    args = dict(images=test_split.images[:20], labels=test_split.labels[:20], classifiers=ALL, epochs=1)
    args.update(change)
    with pytest.raises(BenchError, match=match) as e:
        downstream_accuracy(args.pop("images"), args.pop("labels"), test_split, seed=0, **args)
    assert "\n" not in str(e.value)


def test_images_too_small_for_the_datalens_cnn(test_split):
    tiny = type(test_split)(test_split.images[:20, :, :6, :6].contiguous(), test_split.labels[:20], 10)
    with pytest.raises(BenchError, match="at least 8×8, got 6×6"):
        downstream_accuracy(tiny.images, tiny.labels, tiny, seed=0, epochs=1, classifiers=["cnn_datalens"])
    assert downstream_accuracy(tiny.images, tiny.labels, tiny, seed=0, epochs=1, classifiers=["mlp"])
