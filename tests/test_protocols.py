"""Downstream protocols (bench.metrics.protocols) and the downstream layer that runs them (bench.metrics.downstream).

Parameter counts are derived here from the reference scripts' layer definitions (their arithmetic, not our
modules); every protocol learns from a small real subset; records say how they were obtained."""

import json

import pytest
import torch

from bench.errors import BenchError
from bench.metrics import downstream, features, protocols
from bench.metrics.downstream import downstream_accuracy, real_reference
from bench.metrics.protocols import PROTOCOLS, base
from bench.metrics.protocols import datalens_protocol as datalens
from bench.metrics.protocols import dpdm_protocol as dpdm
from bench.metrics.protocols import sklearn_protocol as sklearn_merf

pytestmark = pytest.mark.usefixtures("one_thread")
E = 6  # epochs
SHORT = {
    "dpdm": dpdm.Settings(epochs=E),
    "datalens": datalens.Settings(epochs=E, batch_size=32, lr=0.05),  # its reference SGD needs ~600 epochs
    "sklearn": sklearn_merf.Settings(classifiers=("logistic_reg", "gaussian_nb", "lda", "mlp", "xgboost")),
}
ALL = (
    "acc_logreg",
    "acc_mlp",
    "acc_cnn",
    "acc_cnn_datalens",
    "acc_logreg_sklearn",
    "acc_mlp_sklearn",
    "acc_mean_sklearn",
)
DPDM = ("acc_logreg", "acc_mlp", "acc_cnn")


def keras_params(layers: list[tuple[str, int, int, int]]) -> int:
    """Keras's count: Conv2D(k×k, c_in → c_out) = k·k·c_in·c_out + c_out; Dense(n_in → n_out) = n_in·n_out + n_out."""
    return sum(k * k * cin * cout + cout if kind == "conv" else cin * cout + cout for kind, k, cin, cout in layers)


def dpdm_cnn(channels: int, flat: int, classes: int) -> int:
    """DPDM's CNN: Conv(C→32), Conv(32→64), Conv(64→128), all 3×3, then Dense(flat→128), Dense(128→classes)."""
    convs = [("conv", 3, channels, 32), ("conv", 3, 32, 64), ("conv", 3, 64, 128)]
    return keras_params([*convs, ("dense", 0, flat, 128), ("dense", 0, 128, classes)])


def datalens_cnn(channels: int, flat: int, classes: int) -> int:
    """DataLens' Keras CNN: Conv(C→32), Conv(32→64), both 3×3, then Dense(flat→64), Dense(64→classes)."""
    return keras_params([("conv", 3, channels, 32), ("conv", 3, 32, 64), ("dense", 0, flat, 64),
                         ("dense", 0, 64, classes)])  # fmt: skip


@pytest.mark.parametrize(
    "name, classifier, shape, classes, expected",
    [
        # nv-tlabs/DPDM train_downstream_classifiers.py: Linear(784, 10); Linear(784, 100), Linear(100, 10)
        ("dpdm", "logreg", (1, 28, 28), 10, 784 * 10 + 10),
        ("dpdm", "mlp", (1, 28, 28), 10, 784 * 100 + 100 + 100 * 10 + 10),
        # Conv2d(1,32,3), Conv2d(32,64,3), Conv2d(64,128,3), Linear(1152,128), Linear(128,10): 241,546
        ("dpdm", "cnn", (1, 28, 28), 10, dpdm_cnn(1, 1152, 10)),
        # colour shapes (derived: the reference has MNIST/FMNIST only and DPDM's cifar10/celeba configs train no
        # classifier): the same layers on C·H·W inputs. 3×32×32: 32 → 30 → 15 → 13 → 6 → 4: 128·4·4 = 2048
        ("dpdm", "logreg", (3, 32, 32), 10, 3072 * 10 + 10),
        ("dpdm", "mlp", (3, 64, 64), 2, 12288 * 100 + 100 + 100 * 2 + 2),
        ("dpdm", "cnn", (3, 32, 32), 10, dpdm_cnn(3, 2048, 10)),
        # 3×64×64: 64 → 62 → 31 → 29 → 14 → 12: 128·12·12 = 18,432
        ("dpdm", "cnn", (3, 64, 64), 2, dpdm_cnn(3, 18432, 2)),
        # AI-secure/DataLens train-classifier-fmnist.py: 28×28 → conv 26 → pool 13 → conv 11: 11·11·64 = 7744
        ("datalens", "cnn", (1, 28, 28), 10, datalens_cnn(1, 7744, 10)),
        # train-classifier-celebA.py (gender): 64×64×3 → 62 → 31 → 29: 29·29·64 = 53,824; 2 classes
        ("datalens", "cnn", (3, 64, 64), 2, datalens_cnn(3, 53824, 2)),
        # 32×32×3 (derived: the celebA script's model with Keras's shape inference): 32 → 30 → 15 → 13: 13·13·64
        ("datalens", "cnn", (3, 32, 32), 2, datalens_cnn(3, 10816, 2)),
    ],
)
def test_parameter_counts_are_the_references(name, classifier, shape, classes, expected):
    assert PROTOCOLS[name].parameters(classifier, shape, classes) == expected
    if (name, classifier, shape) == ("dpdm", "cnn", (1, 28, 28)):
        assert expected == 241_546  # the count docs/evaluation.md quotes
    if (name, shape) == ("datalens", (1, 28, 28)):
        assert expected == 515_146


@pytest.fixture(scope="module")
def small(train):
    """1,500 real training records: enough to learn the bars in a few epochs, fast to train on."""
    return train.subset(torch.arange(1500))


@pytest.fixture(scope="module")
def trained(small, test_split):
    return downstream_accuracy(small.images, small.labels, test_split, dataset="synthetic", seed=0, metrics=ALL,
                               settings=SHORT)  # fmt: skip


def without_time(records):
    return {k: {f: v for f, v in r.items() if f != "seconds"} for k, r in records.items()}


def test_every_protocol_learns_from_real_data(trained, test_split):
    assert list(trained) == list(ALL)
    for name, r in trained.items():
        assert r["value"] > 80, (name, r["value"], r.get("curve"))  # 10 classes: chance is 10%
    json.dumps(trained)  # records are plain JSON


def test_records_say_how_they_were_obtained(trained, test_split):
    for name, r in trained.items():
        p = PROTOCOLS[r["protocol"]]
        assert protocols.METRIC_PROTOCOL[name][0] == p.name and r["protocol_version"] == p.version
        assert r["reference_code"] == p.reference and "@" in r["reference_code"]
        assert r["test_selected"] is p.test_selected and r["selection"] == p.selection
        assert r["deviations"][: len(p.deviations)] == list(p.deviations)
        assert any("synthetic" in d for d in r["deviations"])  # a dataset the reference scripts never ran on
        assert r["classifier_seed"] == 0 and r["n_test"] == len(test_split)
    for name in DPDM:
        r = trained[name]
        assert (r["n_train"], r["n_eval"]) == (1286, 214)  # 60,000 : 10,000 of the 1,500 samples
        assert r["shortened"] == {"epochs": [50, E], "n_train": [60000, 1286], "n_eval": [10000, 214]}
        assert r["optimizer"] == "Adam(lr=0.0003)" and r["batch_size"] == 128 and len(r["curve"]) == E
        assert 1 <= r["selected_epoch"] <= E
    r = trained["acc_cnn_datalens"]
    assert (r["n_train"], r["n_eval"]) == (1500, 0) and r["optimizer"] == "SGD(lr=0.05, momentum=0)"
    assert r["shortened"] == {
        "epochs": [600, E],
        "batch_size": [512, 32],
        "lr": [0.002, 0.05],
        "n_train": [100000, 1500],
    }
    mean = trained["acc_mean_sklearn"]
    assert list(mean["per_classifier"]) == list(SHORT["sklearn"].classifiers)
    assert mean["value"] == pytest.approx(sum(mean["per_classifier"].values()) / 5)
    assert mean["shortened"]["classifiers"][0] == list(sklearn_merf.CLASSIFIERS)
    # the classifier list changes only the mean: LogReg's record is not shortened by it
    assert trained["acc_logreg_sklearn"]["shortened"] == {"n_train": [60000, 1500]}
    assert trained["acc_logreg_sklearn"]["value"] == mean["per_classifier"]["logistic_reg"]


def test_same_seed_same_records_other_seed_other_values(trained, small, test_split):
    rng_state = torch.get_rng_state()
    again = downstream_accuracy(small.images, small.labels, test_split, dataset="synthetic", seed=0, metrics=DPDM,
                                settings=SHORT)  # fmt: skip
    assert without_time(again) == {k: without_time(trained)[k] for k in DPDM}
    assert torch.equal(torch.get_rng_state(), rng_state)  # the global RNG is left untouched
    # a metric's record does not depend on which others are requested
    alone = downstream_accuracy(small.images, small.labels, test_split, dataset="synthetic", seed=0,
                                metrics=["acc_mlp"], settings=SHORT)  # fmt: skip
    assert without_time(alone) == {"acc_mlp": without_time(trained)["acc_mlp"]}
    other = downstream_accuracy(small.images, small.labels, test_split, dataset="synthetic", seed=1, metrics=DPDM,
                                settings=SHORT)  # fmt: skip
    for key in DPDM:
        assert other[key]["classifier_seed"] == 1
        assert other[key]["curve"] != trained[key]["curve"] or other[key]["per_class"] != trained[key]["per_class"]


def test_dpdm_selects_on_generated_samples_never_on_the_test_split(trained, small, test_split, monkeypatch):
    # scoring against corrupted test labels changes no dpdm selection...
    perm = torch.randperm(len(test_split), generator=torch.Generator().manual_seed(2))
    corrupt = type(test_split)(test_split.images, test_split.labels[perm], test_split.num_classes)
    calls = []
    predict = base.predict
    monkeypatch.setattr(
        base, "predict", lambda m, images, prep: calls.append(images is corrupt.images) or predict(m, images, prep)
    )
    records = downstream_accuracy(small.images, small.labels, corrupt, dataset="synthetic", seed=0, metrics=DPDM,
                                  settings=SHORT)  # fmt: skip
    for key, r in records.items():
        assert r["selected_epoch"] == trained[key]["selected_epoch"] and r["curve"] == trained[key]["curve"]
        assert r["value"] < 30  # ... only the reported accuracy, which is now near chance
    # ... and each dpdm classifier looked at the test images once, after selection (E epochs of validation)
    assert calls == ([False] * E + [True]) * len(DPDM)


def test_dpdm_reads_its_samples_in_order_datalens_reshuffles(small, test_split, monkeypatch):
    """DPDM's DataLoader has no shuffle (the same order every epoch); Keras's fit(shuffle=True) reshuffles."""
    seen = []
    train_epoch = features.train_epoch
    monkeypatch.setattr(
        base,
        "train_epoch",
        lambda *a, generator, **k: seen.append(generator) or train_epoch(*a, generator=generator, **k),
    )
    downstream_accuracy(small.images, small.labels, test_split, dataset="synthetic", seed=0,
                        metrics=["acc_logreg", "acc_cnn_datalens"], settings=SHORT)  # fmt: skip
    assert seen[:E] == [None] * E and all(isinstance(g, torch.Generator) for g in seen[E:]) and len(seen) == 2 * E


def test_datalens_reports_the_best_test_accuracy_with_keras_initialisation(trained):
    r = trained["acc_cnn_datalens"]
    assert r["test_selected"] is True and r["value"] == max(r["curve"])
    assert r["curve"].index(r["value"]) + 1 == r["selected_epoch"]
    net = datalens.DataLensCNN((1, 28, 28), 10)
    for layer in (net.conv1, net.conv2, net.dense, net.output):
        fan_in = layer.weight[0].numel()
        fan_out = layer.weight.shape[0] * (layer.weight[0, 0].numel() if layer.weight.dim() == 4 else 1)
        limit = (6 / (fan_in + fan_out)) ** 0.5  # Keras glorot_uniform
        top = float(layer.weight.detach().abs().max())
        assert 0.9 * limit < top <= limit
        assert not layer.bias.any()  # Keras: zero biases


def test_protocol_references_settings_per_dataset():
    p = PROTOCOLS["datalens"]
    assert p.reference_settings("fmnist", (1, 28, 28), 10) == {
        "lr": 2e-3,
        "batch_size": 512,
        "epochs": 600,
        "n_train": 100_000,
    }
    assert p.reference_settings("celeba64-gender", (3, 64, 64), 2) == {
        "lr": 1e-4,
        "batch_size": 256,
        "epochs": 250,
        "n_train": 100_000,
    }
    assert p.dataset_deviations("celeba64-hair", (3, 64, 64), 3) == []
    d = PROTOCOLS["dpdm"]
    assert d.reference_settings("fmnist", (1, 28, 28), 10) == {
        "epochs": 50,
        "batch_size": 128,
        "lr": 3e-4,
        "n_train": 60000,
        "n_eval": 10000,
    }
    assert d.dataset_deviations("fmnist", (1, 28, 28), 10) == []


def test_per_class_weighted_mean_is_the_accuracy(trained, test_split):
    counts = torch.bincount(test_split.labels, minlength=test_split.num_classes).tolist()
    for r in trained.values():
        assert len(r["per_class"]) == test_split.num_classes
        weighted = sum(a * c for a, c in zip(r["per_class"], counts, strict=True)) / sum(counts)
        assert weighted == pytest.approx(r["value"])


def test_real_reference_is_cached(small, test_split, monkeypatch, tmp_path):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path))
    kwargs = dict(
        dataset="synthetic", seed=0, metrics=("acc_logreg", "acc_mlp"), settings={"dpdm": dpdm.Settings(epochs=2)}
    )
    first = real_reference(small, test_split, **kwargs)
    assert list(first) == ["acc_logreg", "acc_mlp"] and first["acc_mlp"]["reference_data"] == "real train split"
    assert len(list((tmp_path / "downstream").glob("*.json"))) == 2
    assert not list((tmp_path / "downstream").glob("*.tmp*"))

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although cached")

    monkeypatch.setattr(downstream, "downstream_accuracy", no_training)
    assert real_reference(small, test_split, **kwargs) == first
    with pytest.raises(AssertionError, match="retrained"):  # another seed is another reference
        real_reference(small, test_split, **{**kwargs, "seed": 1})
    with pytest.raises(AssertionError, match="retrained"):  # other protocol settings too
        real_reference(small, test_split, **{**kwargs, "settings": {"dpdm": dpdm.Settings(epochs=3)}})


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(metrics=["acc_logreg", "acc_resnet"]), "unknown accuracy metric.*'acc_resnet'.*valid: acc_logreg"),
        (dict(labels=torch.full((20,), 10)), r"labels must be in 0\.\.9, got 10\.\.10"),
        (dict(labels=torch.full((20,), -1)), r"labels must be in 0\.\.9"),
        (dict(labels=torch.zeros(20, dtype=torch.int32)), "labels must be an int64 tensor, got torch.int32"),
        (dict(labels=torch.zeros(19, dtype=torch.int64)), r"labels must be \[N\] = \[20\]"),
        (dict(images=torch.zeros(20, 1, 16, 16)), "images must be uint8"),
        (dict(images=torch.zeros(20, 1, 8, 8, dtype=torch.uint8)), "test split is"),
    ],
)
def test_bad_input_is_a_one_line_bench_error(test_split, change, match):
    args = dict(images=test_split.images[:20], labels=test_split.labels[:20], metrics=ALL)
    args.update(change)
    with pytest.raises(BenchError, match=match) as e:
        downstream_accuracy(args.pop("images"), args.pop("labels"), test_split, dataset="synthetic", seed=0, **args)
    assert "\n" not in str(e.value)


def test_images_too_small_for_the_datalens_cnn_small_ones_padded_for_dpdms(test_split):
    tiny = type(test_split)(test_split.images[:20, :, :6, :6].contiguous(), test_split.labels[:20], 10)
    with pytest.raises(BenchError, match="at least 8×8, got 6×6"):
        downstream_accuracy(tiny.images, tiny.labels, tiny, dataset="synthetic", seed=0, metrics=["acc_cnn_datalens"],
                            settings={"datalens": datalens.Settings(epochs=1)})  # fmt: skip
    r = downstream_accuracy(tiny.images, tiny.labels, tiny, dataset="synthetic", seed=0, metrics=["acc_cnn"],
                            settings={"dpdm": dpdm.Settings(epochs=1)})["acc_cnn"]  # fmt: skip
    assert "6×6 images padded with black to at least 22×22 for the CNN" in r["deviations"]


def test_real_reference_trains_a_shared_classifier_once(small, test_split, monkeypatch, tmp_path):
    """acc_logreg_sklearn and acc_mean_sklearn share the LogReg fit: the real-data row trains it once."""
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path))
    built = []
    make = sklearn_merf.CLASSIFIERS["logistic_reg"]
    monkeypatch.setitem(sklearn_merf.CLASSIFIERS, "logistic_reg", lambda seed, k: built.append(seed) or make(seed, k))
    settings = {"sklearn": sklearn_merf.Settings(classifiers=("logistic_reg", "gaussian_nb"))}
    out = real_reference(small, test_split, dataset="synthetic", seed=0, settings=settings,
                         metrics=("acc_logreg_sklearn", "acc_mean_sklearn"))  # fmt: skip
    assert (
        built == [0] and out["acc_mean_sklearn"]["per_classifier"]["logistic_reg"] == out["acc_logreg_sklearn"]["value"]
    )
