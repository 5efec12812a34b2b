import matplotlib.image
import numpy as np
import pytest
import scipy.linalg
import torch
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from bench import data
from bench.errors import BenchError
from bench.metrics import METRICS, ON_REQUEST, EvalSettings, evaluate, features
from bench.metrics.features import (
    EXTRACTOR_NAME,
    DomainFeatureExtractor,
    domain_extractor,
    extract_features,
    reference_cache_name,
)
from bench.metrics.fid import frechet_distance
from bench.metrics.sample_grid import LABEL_WIDTH, PAD, grid_scale, save_sample_grid

pytestmark = pytest.mark.usefixtures("one_thread")
EXTRACTOR_EPOCHS = 2
SETTINGS = EvalSettings(
    extractor_epochs=EXTRACTOR_EPOCHS,
    feature_batch_size=128,
    protocols={"dpdm": {"epochs": 2}, "datalens": {"epochs": 2}, "sklearn": {"classifiers": ["gaussian_nb"]}},
)


@pytest.fixture(scope="module")
def extractor(train):
    return domain_extractor(train, epochs=EXTRACTOR_EPOCHS)


def noise(n, generator_seed=0):
    return torch.randint(
        0, 256, (n, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(generator_seed)
    )


def test_extractor_is_trained_once_then_loaded(train, extractor, monkeypatch):
    assert extractor.weights_path.is_file() and extractor.key.startswith("synthetic-")
    mtime = extractor.weights_path.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although cached")

    monkeypatch.setattr(features, "_train", no_training)
    again = domain_extractor(train, epochs=EXTRACTOR_EPOCHS)
    assert again == extractor and again.weights_path.stat().st_mtime_ns == mtime
    # another training set (here: a subset) is another extractor
    with pytest.raises(AssertionError, match="retrained"):
        domain_extractor(train.subset(torch.arange(100)), epochs=EXTRACTOR_EPOCHS)


def test_extractor_is_registered_and_classifies(extractor, test_split):
    assert FEATURE_EXTRACTORS_REGISTRY[EXTRACTOR_NAME] is DomainFeatureExtractor
    assert "fid" not in EXTRACTOR_NAME and "inception" not in EXTRACTOR_NAME
    fe = DomainFeatureExtractor(EXTRACTOR_NAME, ["logits", "128"], str(extractor.weights_path))
    logits, feats = fe(test_split.images[:200])
    assert feats.shape == (200, 128)
    assert (logits.argmax(1) == test_split.labels[:200]).float().mean() > 0.9


def test_fd_small_for_real_large_for_noise(train, test_split, extractor):
    fd_real = frechet_distance(test_split.images, train, extractor=extractor)
    fd_noise = frechet_distance(noise(500), train, extractor=extractor)
    assert 0 <= fd_real < fd_noise / 20
    # the reference statistics went to torch-fidelity's cache, named after the extractor's weights
    cached = list((features.cache_root() / "fidelity").glob(f"{reference_cache_name(train, extractor)}-*stat-fid*"))
    assert len(cached) == 1


def frechet_scipy(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # dead ReLU units: zero-variance features
def test_fd_matches_direct_scipy_computation(train, extractor):
    fake = torch.cat([train.images[:300], noise(100)])
    expected = frechet_scipy(
        extract_features(extractor, fake).double().numpy(),
        extract_features(extractor, train.images).double().numpy(),
    )
    assert frechet_distance(fake, train, extractor=extractor, cache=False) == pytest.approx(expected, rel=1e-3)


def test_fd_does_not_depend_on_batch_size(train, extractor):
    fake = train.images[1000:1400]
    small = frechet_distance(fake, train, extractor=extractor, cache=False, batch_size=7)
    large = frechet_distance(fake, train, extractor=extractor, cache=False, batch_size=1000)
    assert small == pytest.approx(large, rel=1e-5)


def test_fd_rejects_wrong_shape(train, extractor):
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(torch.zeros(10, 1, 28, 28, dtype=torch.uint8), train, extractor=extractor)


def test_evaluate_records(train, test_split):
    fake = test_split.images[:300]
    out = evaluate(
        fake,
        test_split.labels[:300],
        dataset="synthetic",
        train=train,
        test=test_split,
        seed=0,
        settings=SETTINGS,
    )
    assert list(out) == [m for m in METRICS if m not in ON_REQUEST]  # all but the on-request (dpimagebench) ones
    for name in ("fid_inception", "kid_inception", "is_inception", "precision_inception", "recall_inception"):
        assert out[name]["value"] is None and out[name]["note"].startswith("unavailable: no Inception weights")
    assert 0 <= out["precision_domain"]["value"] <= 1 and out["kid_domain"]["extractor"] == EXTRACTOR_NAME
    fd, acc = out["fd_domain"], out["acc_cnn"]
    assert fd["extractor"] == EXTRACTOR_NAME and fd["reference"] == "train" and fd["n_gen"] == 300
    assert fd["value"] >= 0 and fd["n_ref"] == 2000
    assert acc["protocol"] == "dpdm" and acc["n_gen"] == 300 and 0 <= acc["value"] <= 100

    uncond = evaluate(
        fake,
        None,
        dataset="synthetic",
        train=train,
        test=test_split,
        seed=0,
        settings=SETTINGS,
        metrics=["fd_domain", "acc_cnn"],
    )
    assert list(uncond) == ["fd_domain", "acc_cnn"]
    assert uncond["acc_cnn"]["value"] is None and uncond["acc_cnn"]["note"] == "n/a: unconditional method"
    assert uncond["fd_domain"]["value"] == pytest.approx(fd["value"])


def test_eval_settings_validate():
    with pytest.raises(ValueError, match="classifier_seeds must be >= 1, got 0"):
        EvalSettings(classifier_seeds=0)
    with pytest.raises(ValueError, match="fidelity_samples must be >= 1"):
        EvalSettings(fidelity_samples=0)
    with pytest.raises(BenchError, match=r"eval\.dpdm: epochs must be > 0, got 0"):
        EvalSettings(protocols={"dpdm": {"epochs": 0}})
    with pytest.raises(BenchError, match="unknown protocol 'keras'; protocols: dpdm, datalens, sklearn, dpimagebench"):
        EvalSettings(protocols={"keras": {}})
    with pytest.raises(BenchError, match=r"eval\.sklearn: classifiers: unknown classifier 'svm'"):
        EvalSettings(protocols={"sklearn": {"classifiers": ["svm"]}})


def test_sample_grid(tmp_path, train):
    s = grid_scale(16, 16)
    path = save_sample_grid(train.images[:300], train.labels[:300], tmp_path / "g" / "samples.png",
                            class_names=data.class_names("synthetic"), per_class=8)  # fmt: skip
    png = matplotlib.image.imread(path)
    assert png.shape[:2] == ((10 * (16 + PAD) + PAD) * s, LABEL_WIDTH + (8 * (16 + PAD) + PAD) * s)

    path = save_sample_grid(train.images[:25], None, tmp_path / "u.png", per_class=10)  # 3 unlabelled rows
    assert matplotlib.image.imread(path).shape[0] == (3 * (16 + PAD) + PAD) * s
