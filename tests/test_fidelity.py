import time

import pytest
import torch

from bench.metrics import features, prc
from bench.metrics.features import EXTRACTOR_NAME, domain_extractor
from bench.metrics.fid import frechet_distance
from bench.metrics.fidelity import domain_fidelity
from bench.metrics.prc import prc_reference_index

pytestmark = pytest.mark.usefixtures("one_thread")
ALL = {"fd_domain", "kid_domain", "precision_domain", "recall_domain"}


@pytest.fixture(scope="module")
def extractor(train):
    return domain_extractor(train, epochs=2)


def noise(n):
    return torch.randint(0, 256, (n, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def seen(monkeypatch):
    """Counts the images that go through the domain extractor."""
    count = [0]
    forward = features.DomainFeatureExtractor.forward

    def counting(self, x):
        count[0] += len(x)
        return forward(self, x)

    monkeypatch.setattr(features.DomainFeatureExtractor, "forward", counting)
    return count


def test_real_close_noise_far_and_cache_reused(train, test_split, extractor, seen):
    t0 = time.perf_counter()
    real = domain_fidelity(test_split.images, train, extractor=extractor)
    first = time.perf_counter() - t0
    assert set(real) == ALL
    for rec in real.values():
        assert rec["extractor"] == EXTRACTOR_NAME and rec["extractor_key"] == extractor.key
        assert (rec["reference"], rec["n_gen"], rec["n_ref"]) == ("train", 500, 2000)
    assert seen[0] == 500 + 2000

    seen[0] = 0
    t0 = time.perf_counter()
    fake = domain_fidelity(noise(500), train, extractor=extractor)
    second = time.perf_counter() - t0
    assert seen[0] == 500, "the reference features were recomputed"
    print(f"domain fidelity first {first:.2f}s, cached {second:.2f}s")

    assert real["kid_domain"]["kid_subset_size"] == 500 and real["kid_domain"]["kid_std"] >= 0
    assert abs(real["kid_domain"]["value"]) < fake["kid_domain"]["value"] / 50
    assert real["precision_domain"]["value"] > 0.8 and real["recall_domain"]["value"] > 0.8
    assert fake["precision_domain"]["value"] < 0.1
    assert real["precision_domain"]["k"] == 3 and real["precision_domain"]["n_ref_prc"] == 2000
    assert real["precision_domain"]["note"] == ""
    # the FD is the one frechet_distance computes, from the same cached statistics
    assert real["fd_domain"]["value"] == pytest.approx(frechet_distance(test_split.images, train, extractor=extractor))


def test_fd_kid_do_not_depend_on_batch_size(train, extractor):
    fake = train.images[1000:1300]
    small = domain_fidelity(fake, train, extractor=extractor, metrics=("fd", "kid"), batch_size=7)
    large = domain_fidelity(fake, train, extractor=extractor, metrics=("fd", "kid"), batch_size=1000)
    assert set(small) == {"fd_domain", "kid_domain"}
    for name in small:
        assert small[name]["value"] == pytest.approx(large[name]["value"], rel=1e-4, abs=1e-7)


def test_prc_uses_seeded_subset_of_large_reference(train, test_split, extractor, monkeypatch, seen):
    monkeypatch.setattr(prc, "PRC_MAX_REF", 300)
    index = prc_reference_index(len(train))
    assert len(index) == 300 and (index == prc_reference_index(len(train))).all()
    out = domain_fidelity(test_split.images[:100], train, extractor=extractor, metrics=("prc", "kid"))
    assert set(out) == {"kid_domain", "precision_domain", "recall_domain"}
    rec = out["precision_domain"]
    assert rec["n_ref_prc"] == 300 and rec["n_ref"] == 2000
    assert rec["note"] == "precision/recall against a fixed seeded subset of 300 of the 2000 reference images"
    assert 0.5 < rec["value"] <= 1.0
    assert out["kid_domain"]["kid_subset_size"] == 100


def test_too_few_samples_and_bad_input(train, extractor):
    out = domain_fidelity(train.images[:3], train, extractor=extractor, metrics=("prc",))
    assert out["precision_domain"]["value"] is None and "at least 4 samples" in out["precision_domain"]["note"]
    with pytest.raises(ValueError, match="unknown domain metrics"):
        domain_fidelity(train.images[:10], train, extractor=extractor, metrics=("fid",))
    with pytest.raises(ValueError, match="shape"):
        domain_fidelity(torch.zeros(10, 1, 28, 28, dtype=torch.uint8), train, extractor=extractor)
