"""The dpimagebench protocol (bench.metrics.protocols.dpimagebench_protocol): DPImageBench's evaluator.py.

Parameter counts are derived here from the reference's layer lists (2019ChenGong/DPImageBench@565f8d7:
evaluation/classifier/{resnet,wrn,resnext}.py), not from our modules. The selection rules are checked on
scripted per-epoch results (the classifiers' training replaced), the training itself on one short real run."""

import json
import math

import numpy as np
import pytest
import torch
from torch.utils.data import random_split

from bench.contract import ImageDataset
from bench.errors import BenchError
from bench.metrics import ON_REQUEST, EvalSettings, evaluate, select_metrics
from bench.metrics.downstream import downstream_accuracy, over_seeds
from bench.metrics.protocols import PROTOCOLS, parse_settings
from bench.metrics.protocols import dpimagebench_protocol as dib
from bench.report.frame import NON_PRIVATE_SELECTION_MARK, metric_label_of

pytestmark = pytest.mark.usefixtures("one_thread")
P = PROTOCOLS["dpimagebench"]
PER = ("acc_resnet_dpimagebench", "acc_wrn_dpimagebench", "acc_resnext_dpimagebench")
ALL = (*PER, "acc_max_dpimagebench", "acc_mean_dpimagebench")


# --------------------------------------------------------------------------------------------------
# Parameter counts from the reference's layer lists


def conv(k: int, c_in: int, c_out: int, groups: int = 1) -> int:
    return k * k * (c_in // groups) * c_out  # every convolution of the three files has bias=False


def bn(c: int) -> int:
    return 2 * c  # BatchNorm2d: weight and bias


def resnet(depth: int, c: int, classes: int) -> int:
    """resnet.py, BasicBlock: conv3×3(C→16), BN; 3 stages of n = (depth − 2)/6 blocks [conv3×3, BN, conv3×3,
    BN] at 16, 32, 64 channels, the first block of stages 2 and 3 with a 1×1 conv + BN shortcut; fc(64)."""
    n = (depth - 2) // 6
    total = conv(3, c, 16) + bn(16)
    c_in = 16
    for width in (16, 32, 64):
        for i in range(n):
            total += conv(3, c_in if i == 0 else width, width) + bn(width) + conv(3, width, width) + bn(width)
            if i == 0 and c_in != width:
                total += conv(1, c_in, width) + bn(width)
        c_in = width
    return total + 64 * classes + classes


def wrn(depth: int, k: int, c: int, classes: int) -> int:
    """wrn.py: conv3×3(C→16); 3 groups of n = (depth − 4)/6 pre-activation blocks [BN(in), conv3×3(in→out),
    BN(out), conv3×3(out→out)] at 16k, 32k, 64k channels, a 1×1 conv shortcut where in ≠ out; BN, fc(64k)."""
    n = (depth - 4) // 6
    total, c_in = conv(3, c, 16), 16
    for width in (16 * k, 32 * k, 64 * k):
        for i in range(n):
            first_in = c_in if i == 0 else width
            total += bn(first_in) + conv(3, first_in, width) + bn(width) + conv(3, width, width)
            if first_in != width:
                total += conv(1, first_in, width)
        c_in = width
    return total + bn(64 * k) + 64 * k * classes + classes


def resnext(depth: int, cardinality: int, w: int, c: int, classes: int) -> int:
    """resnext.py: conv3×3(C→64), BN; 3 stages of (depth − 2)/9 bottlenecks with out = 64w, 128w, 256w and
    D = cardinality·out/w: [conv1×1(in→D), BN, grouped conv3×3(D→D, cardinality groups), BN, conv1×1(D→out),
    BN], a 1×1 conv + BN shortcut where in ≠ out; fc(256w)."""
    blocks = (depth - 2) // 9
    total, c_in = conv(3, c, 64) + bn(64), 64
    for out in (64 * w, 128 * w, 256 * w):
        d = cardinality * out // w
        for i in range(blocks):
            first_in = c_in if i == 0 else out
            total += conv(1, first_in, d) + bn(d) + conv(3, d, d, cardinality) + bn(d) + conv(1, d, out) + bn(out)
            if first_in != out:
                total += conv(1, first_in, out) + bn(out)
        c_in = out
    return total + 256 * w * classes + classes


@pytest.mark.parametrize(
    "name, shape, classes, expected",
    [
        # evaluator.py:294-298 (every dataset but CIFAR): ResNet(depth 110), WRN(40, 4), ResNeXt(29, 8, w 4)
        ("resnet", (1, 28, 28), 10, resnet(110, 1, 10)),
        ("wrn", (1, 28, 28), 10, wrn(40, 4, 1, 10)),
        ("resnext", (1, 28, 28), 10, resnext(29, 8, 4, 1, 10)),
        ("resnet", (3, 32, 32), 10, resnet(110, 3, 10)),
        ("wrn", (3, 32, 32), 10, wrn(40, 4, 3, 10)),
        ("resnext", (3, 32, 32), 10, resnext(29, 8, 4, 3, 10)),
        ("resnet", (3, 64, 64), 2, resnet(110, 3, 2)),  # global pooling: the side does not change the count
    ],
)
def test_parameter_counts_are_the_references(name, shape, classes, expected):
    assert P.parameters(name, shape, classes) == expected
    if shape == (1, 28, 28):  # the counts the module's docstring quotes
        assert expected == {"resnet": 1_730_426, "wrn": 8_948_922, "resnext": 34_425_546}[name]


@pytest.mark.parametrize(
    "name, expected",
    [  # evaluator.py:276-280 ("cifar" datasets): ResNet-164, WRN-28-10, ResNeXt(depth 28, cardinality 8, w 10)
        ("resnet", resnet(164, 3, 10)),
        ("wrn", wrn(28, 10, 3, 10)),
        ("resnext", resnext(28, 8, 10, 3, 10)),
    ],
)
def test_cifar_architectures_are_the_references(name, expected):
    assert sum(p.numel() for p in dib.build(name, "cifar", (3, 32, 32), 10).parameters()) == expected
    assert P.reference_settings("cifar10", (3, 32, 32), 10)["architecture"] == "cifar"


def test_reference_settings_per_dataset_and_resolution():
    mnist = P.reference_settings("mnist", (1, 28, 28), 10)
    assert mnist == {"mode": "val", "report": "noise_free", "classifiers": ("resnet", "wrn", "resnext"),
                     "architecture": "default", "optimizer": "adam", "lr": 0.01, "lr_step": 20, "epochs": 50,
                     "batch_size": 256, "micro_batches": 1, "n_train": 55_000, "n_eval": 5_000,
                     "real_train_size": 55_000, "laplace_epsilon": None}  # fmt: skip
    cifar = P.reference_settings("cifar10", (3, 32, 32), 10)
    assert (cifar["optimizer"], cifar["lr"], cifar["lr_step"], cifar["epochs"], cifar["batch_size"]) == (
        "sgd", 0.1, 60, 200, 126)  # fmt: skip
    assert cifar["real_train_size"] == 45_000
    celeba64 = P.reference_settings("celeba64-gender", (3, 64, 64), 2)
    assert celeba64["classifiers"] == ("resnet", "wrn")  # evaluator.py:68-70: no ResNeXt above 32 px
    assert celeba64["micro_batches"] == 16 and celeba64["real_train_size"] == 145_064
    assert P.reference_settings("celeba64-hair", (3, 64, 64), 3)["real_train_size"] is None
    assert P.dataset_deviations("fmnist", (1, 28, 28), 10) == []


# --------------------------------------------------------------------------------------------------
# Selection on scripted per-epoch results


def fake_test(n: int = 100, classes: int = 10, side: int = 16, channels: int = 1) -> ImageDataset:
    labels = torch.arange(n) % classes
    return ImageDataset(torch.zeros(n, channels, side, side, dtype=torch.uint8), labels, classes)


def predictions(test: ImageDataset, accuracy: float) -> torch.Tensor:
    """Predictions of `test` with round(accuracy · n / 100) correct (the first ones)."""
    pred = test.labels.clone()
    wrong = len(test) - round(accuracy * len(test) / 100)
    pred[len(test) - wrong :] = (pred[len(test) - wrong :] + 1) % test.num_classes
    return pred


def scripted(monkeypatch, script: dict[str, tuple[list[int], int, list[float]]], noise: list[float] | None = None):
    """Replace the training by `script` {classifier: (val_correct per epoch, val_total, test_acc per epoch)} and
    the Laplace draws by `noise` (in draw order); returns the list of (scale) of every draw."""
    draws: list[float] = []
    noise_iter = iter(noise or [])

    def train(name, fit, val, test, *, settings, seed, device):
        correct, total, accs = script[name]
        assert len(correct) == settings["epochs"] and total == len(val)
        return dib.Trace(list(correct), total, [predictions(test, a) for a in accs], parameters=1)

    def draw(rng, scale):
        draws.append(scale)
        return next(noise_iter, 0.0)

    monkeypatch.setattr(dib, "train_classifier", train)
    monkeypatch.setattr(dib, "laplace", draw)
    return draws


def run(metrics, *, test=None, real=None, epsilon=2.0, **settings):
    test = test or fake_test()
    samples = fake_test(60, test.num_classes, test.images.shape[-1], test.images.shape[1])
    real = real if real is not None else fake_test(120, test.num_classes, test.images.shape[-1], test.images.shape[1])
    return downstream_accuracy(samples.images, samples.labels, test, dataset="synthetic", seed=0, metrics=metrics,
                               settings={"dpimagebench": dib.Settings(**settings)}, real_train=real,
                               epsilon=epsilon)  # fmt: skip


def test_last_best_is_the_references_greater_or_equal():
    assert dib.last_best([1.0, 3.0, 3.0, 2.0]) == 2  # `>=`: the later of tied epochs
    assert dib.last_best([-1.0, -0.5]) is None  # the reference's best starts at 0: nothing reaches it
    assert dib.last_best([-1.0, 0.0, -2.0]) == 1


def test_noisy_selection_and_the_references_number_pick_different_epochs(monkeypatch):
    # 10 real validation records (1/12 of 120); the noise-free best is epoch 3, the noisy best epoch 2
    correct, tests = [5, 6, 8, 7], [50.0, 60.0, 70.0, 65.0]
    draws = scripted(monkeypatch, {"resnet": (correct, 10, tests)}, noise=[0.0, 4.0, -1.0, 0.5])
    ref = run(["acc_resnet_dpimagebench"], epochs=4, classifiers=("resnet",))["acc_resnet_dpimagebench"]
    assert draws == [0.5] * 4  # one draw per epoch, scale 1/ε with the run's ε = 2
    assert (ref["epoch_noise_free_val"], ref["test_acc_noise_free_val"]) == (3, 70.0)
    assert (ref["epoch_noisy_val"], ref["test_acc_noisy_val"]) == (2, 60.0)  # 6 + 4 = 10 beats 8 − 1 = 7
    assert ref["noisy_val_counts"] == [5.0, 10.0, 7.0, 7.5] and ref["noisy_val_acc_best"] == 100.0
    assert ref["value"] == 70.0 and ref["selected_epoch"] == 3  # default: what DPImageBench reports
    assert ref["non_private_selection"] is True and "WITHOUT noise" in ref["selection"]
    assert ref["test_acc_best_test"] == 70.0 and ref["epoch_best_test"] == 3
    assert ref["curve"] == [50.0, 60.0, 80.0, 70.0] and ref["test_curve"] == tests
    label = metric_label_of("acc_resnet_dpimagebench", ref)
    assert NON_PRIVATE_SELECTION_MARK in label and label.endswith("[dpimagebench]")

    scripted(monkeypatch, {"resnet": (correct, 10, tests)}, noise=[0.0, 4.0, -1.0, 0.5])
    noisy = run(["acc_resnet_dpimagebench"], epochs=4, classifiers=("resnet",), report="noisy")
    r = noisy["acc_resnet_dpimagebench"]
    assert r["value"] == 60.0 and r["selected_epoch"] == 2 and r["non_private_selection"] is False
    assert NON_PRIVATE_SELECTION_MARK not in metric_label_of("acc_resnet_dpimagebench", r)
    assert r["shortened"]["report"] == ["noise_free", "noisy"]  # not the reference's reported number


def test_selection_privacy_is_recorded_and_not_in_the_privacy_card(monkeypatch):
    script = {c: ([5, 6, 7], 10, [50.0, 60.0, 70.0]) for c in dib.CLASSIFIERS}
    draws = scripted(monkeypatch, script)
    out = run(ALL, epochs=3, epsilon=4.0)
    assert draws == [0.25] * 9  # 3 classifiers × 3 epochs, each of scale 1/4
    for name in ALL:
        sp = out[name]["selection_privacy"]
        assert sp["epsilon_per_epoch"] == 4.0 and sp["releases_per_classifier"] == 3 and sp["classifiers"] == 3
        assert sp["epsilon_per_classifier_basic_composition"] == 12.0
        assert sp["epsilon_all_classifiers_basic_composition"] == 36.0
        assert sp["in_privacy_card"] is False and "NOT in this run's privacy card" in sp["note"]
        assert any("generator was trained on the whole real training split" in d for d in out[name]["deviations"])
    json.dumps(out)  # plain JSON
    # ε = ∞ (a non-private run, the real-data row): no noise, said so
    scripted(monkeypatch, script)
    sp = run(["acc_wrn_dpimagebench"], epochs=3, epsilon=math.inf)["acc_wrn_dpimagebench"]["selection_privacy"]
    assert sp["epsilon_per_epoch"] is None and "non-private run" in sp["note"]
    # eval.dpimagebench.laplace_epsilon overrides the run's ε
    draws = scripted(monkeypatch, script)
    run(["acc_wrn_dpimagebench"], epochs=3, epsilon=4.0, laplace_epsilon=0.5)
    assert draws == [2.0] * 3


def test_laplace_draws_have_scale_one_over_epsilon():
    rng = np.random.default_rng(7)
    scale = 1 / 0.8
    x = np.array([dib.laplace(rng, scale) for _ in range(20_000)])
    # Laplace(0, b): E|X| = b, Var X = 2b², median 0; 20,000 draws: E|X| within ~2% (5 standard errors)
    assert abs(np.abs(x).mean() - scale) < 0.05 * scale
    assert abs(x.var() - 2 * scale**2) < 0.1 * 2 * scale**2
    assert abs(np.median(x)) < 0.05 * scale
    assert dib.laplace(rng, 0.0) == 0.0  # ε = ∞


def test_max_and_mean_over_the_classifiers_and_no_resnext_above_32px(monkeypatch):
    script = {"resnet": ([5, 6], 10, [50.0, 61.0]), "wrn": ([7, 6], 10, [72.0, 80.0]),
              "resnext": ([1, 9], 10, [30.0, 40.0])}  # fmt: skip
    scripted(monkeypatch, script)
    out = run(ALL, epochs=2)
    assert [out[m]["value"] for m in PER] == [61.0, 72.0, 40.0]  # noise-free selections: epochs 2, 1, 2
    assert out["acc_max_dpimagebench"]["value"] == 72.0  # the README table's statistic
    mean = out["acc_mean_dpimagebench"]
    assert mean["value"] == pytest.approx(173.0 / 3) and mean["std"] == pytest.approx(float(np.std([61, 72, 40])))
    assert mean["per_classifier"] == {"resnet": 61.0, "wrn": 72.0, "resnext": 40.0}
    # 3×64×64: DPImageBench runs ResNet and WRN only; ResNeXt's record says so, the statistics leave it out
    scripted(monkeypatch, script)
    big = run(ALL, epochs=2, test=fake_test(40, 2, side=64, channels=3))
    assert big["acc_resnext_dpimagebench"]["value"] is None
    assert "n/a" in big["acc_resnext_dpimagebench"]["note"]
    assert list(big["acc_mean_dpimagebench"]["per_classifier"]) == ["resnet", "wrn"]
    pooled = over_seeds([big, big])
    assert pooled["acc_resnext_dpimagebench"]["value"] is None and pooled["acc_resnet_dpimagebench"]["value"] > 0


def test_real_validation_records_are_random_splits_after_manual_seed_0():
    real = fake_test(600)
    val, described = dib.real_validation(real, 550)
    torch.manual_seed(0)
    _, ref = random_split(range(600), [550, 50])  # dataset_loader.py:55-57
    assert torch.equal(val.labels, real.labels[torch.tensor(ref.indices)]) and "50 real records" in described
    assert len(dib.real_validation(real, None)[0]) == 50  # no train_size for the dataset: 1/12


def test_evaluate_gives_the_protocol_the_real_split_and_the_runs_epsilon(monkeypatch, train, test_split):
    seen = []
    real_validation = dib.real_validation
    monkeypatch.setattr(dib, "real_validation", lambda real, size: seen.append(real) or real_validation(real, size))
    draws = scripted(monkeypatch, {"resnet": ([5, 6], 167, [50.0, 60.0])})
    ev = EvalSettings(protocols={"dpimagebench": dib.Settings(epochs=2, classifiers=("resnet",))})
    out = evaluate(test_split.images[:50], test_split.labels[:50], dataset="synthetic", train=train, test=test_split,
                   seed=0, settings=ev, metrics=["acc_resnet_dpimagebench"], epsilon=5.0)  # fmt: skip
    assert seen == [train] and draws == [0.2, 0.2]
    assert out["acc_resnet_dpimagebench"]["n_val"] == 167  # 1/12 of the 2,000 records
    # the protocol is on request only: not among "all" metrics
    assert set(ALL) <= ON_REQUEST and not set(ALL) & set(select_metrics(None))
    assert select_metrics(["acc_max_dpimagebench"]) == ("acc_max_dpimagebench",)


# --------------------------------------------------------------------------------------------------
# Real training, briefly


class Untouchable:
    """A stand-in for the real training split that fails on any use."""

    def __getattr__(self, name):
        raise AssertionError(f"mode syn touched the real training split ({name})")

    def __len__(self):
        raise AssertionError("mode syn touched the real training split (len)")


def test_syn_mode_never_touches_real_training_data_and_learns(train, test_split):
    samples, test = train.subset(torch.arange(1000, 1400)), test_split.subset(torch.arange(200))
    settings = dib.Settings(mode="syn", epochs=3, batch_size=32, n_train=360, n_eval=40, classifiers=("resnet",))
    r = downstream_accuracy(samples.images, samples.labels, test, dataset="synthetic", seed=0,
                            metrics=["acc_resnet_dpimagebench"], settings={"dpimagebench": settings},
                            real_train=Untouchable(), epsilon=1.0)["acc_resnet_dpimagebench"]  # fmt: skip
    assert r["value"] > 30, r["test_curve"]  # 10 classes: chance is 10%
    assert r["validation"].startswith("40 held-out synthetic samples") and r["n_val"] == 40
    assert r["noisy_val_counts"] is None and r["test_acc_noisy_val"] is None and r["selection_privacy"] is None
    assert r["non_private_selection"] is False and r["parameters"] == resnet(110, 1, 10)
    assert r["value"] == r["test_curve"][r["selected_epoch"] - 1] == r["test_acc_noise_free_val"]
    assert r["optimizer"] == "Adam(lr=0.01), StepLR(20, 0.2)" and r["ema_decay"] == 0.9999
    assert r["shortened"] == {"mode": ["val", "syn"], "epochs": [50, 3], "batch_size": [256, 32],
                              "n_train": [55000, 360], "n_eval": [5000, 40]}  # fmt: skip
    assert r["per_class"] and len(r["per_class"]) == 10


def test_val_mode_trains_and_records_how(train, test_split):
    samples, test = train.subset(torch.arange(200)), test_split.subset(torch.arange(100))
    settings = dib.Settings(epochs=2, batch_size=64, classifiers=("resnet",), real_train_size=1900)
    r = downstream_accuracy(samples.images, samples.labels, test, dataset="synthetic", seed=0,
                            metrics=["acc_resnet_dpimagebench"], settings={"dpimagebench": settings},
                            real_train=train, epsilon=1.0)["acc_resnet_dpimagebench"]  # fmt: skip
    assert r["n_val"] == 100 and "N − 1900" in r["validation"] and len(r["noisy_val_counts"]) == 2
    assert r["selection_privacy"]["epsilon_all_classifiers_basic_composition"] == 2.0  # 1 classifier × 2 epochs
    assert r["value"] == r["test_acc_noise_free_val"] and 1 <= r["selected_epoch"] <= 2
    assert r["reference_code"].startswith("2019ChenGong/DPImageBench@565f8d7e2e0d2faaec43108971db3269519579af:")


def test_a_classifier_whose_step_does_not_fit_in_memory_is_refused_before_training(monkeypatch, train, test_split):
    """On a 24 GiB CPU, ResNeXt-29's step at the reference's batch 256 (about 24 GiB) got the process killed by the
    kernel; the protocol now refuses it with one line (here: any step, the free memory read as 1 MiB)."""
    from bench import memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 1 << 20)
    samples, test = train.subset(torch.arange(100)), test_split.subset(torch.arange(20))
    settings = dib.Settings(mode="syn", epochs=1, batch_size=32, n_train=90, n_eval=10, classifiers=("resnet",))
    with pytest.raises(BenchError, match=r"protocol dpimagebench, resnet: a training step at batch 32 needs about "
                                         r".* eval\.dpimagebench\.micro_batches=K") as e:  # fmt: skip
        downstream_accuracy(samples.images, samples.labels, test, dataset="synthetic", seed=0,
                            metrics=["acc_resnet_dpimagebench"], settings={"dpimagebench": settings},
                            epsilon=1.0)  # fmt: skip
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------------
# Bad settings and inputs


@pytest.mark.parametrize(
    "table, match",
    [
        ({"mode": "test"}, r"eval\.dpimagebench: mode must be one of 'val', 'syn', got 'test'"),
        ({"report": "max"}, "report must be one of 'noise_free', 'noisy'"),
        ({"mode": "syn", "report": "noisy"}, "report 'noisy' needs mode 'val'"),
        ({"classifiers": ["vgg"]}, "classifiers: unknown classifier 'vgg'"),
        ({"classifiers": []}, "classifiers: no classifier"),
        ({"epochs": 0}, "epochs must be > 0, got 0"),
        ({"laplace_epsilon": -1.0}, "laplace_epsilon must be > 0"),
        ({"batch_size": 8, "micro_batches": 16}, r"micro_batches \(16\) must be <= batch_size \(8\)"),
        ({"architecture": "vit"}, "architecture must be one of"),
    ],
)
def test_bad_settings_are_one_line_bench_errors(table, match):
    with pytest.raises(BenchError, match=match) as e:
        parse_settings({"dpimagebench": table})
    assert "\n" not in str(e.value)


def test_missing_context_or_odd_shapes_are_one_line_bench_errors(monkeypatch):
    scripted(monkeypatch, {"resnet": ([1], 10, [10.0])})
    cases = [
        (dict(epsilon=None), "neither the run's ε nor eval.dpimagebench.laplace_epsilon"),
        (dict(test=fake_test(20, side=18)), "side divisible by 4, got 18×18"),
    ]
    for kwargs, match in cases:
        with pytest.raises(BenchError, match=match) as e:
            run(["acc_resnet_dpimagebench"], epochs=1, classifiers=("resnet",), **kwargs)
        assert "\n" not in str(e.value)
    samples = fake_test(30)
    with pytest.raises(BenchError, match="the real training split is needed") as e:
        downstream_accuracy(samples.images, samples.labels, fake_test(), dataset="synthetic", seed=0,
                            metrics=["acc_resnet_dpimagebench"], epsilon=1.0,
                            settings={"dpimagebench": dib.Settings(epochs=1)})  # fmt: skip
    assert "\n" not in str(e.value)
