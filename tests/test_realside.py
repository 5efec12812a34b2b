"""Our cached-real-side estimators (bench.metrics.kid, .prc, .fid) against torch-fidelity's on identical features."""

import numpy as np
import pytest
import torch
from torch_fidelity.metric_kid import kernel_poly, kid_features_to_metric, mmd2
from torch_fidelity.metric_prc import calculate_precision_recall_full

from bench.metrics import kid, prc, realside
from bench.metrics.kid import kid_subsets
from bench.metrics.prc import knn_radii, precision_recall
from bench.metrics.realside import RealSide, RealSideCache

pytestmark = pytest.mark.usefixtures("one_thread")


def feats(n, shift=0.0, seed=0, d=16):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) + shift


def side(real, prc_index=None):
    return RealSide(features=real, stats={}, prc_index=prc_index)


def test_kid_equals_torch_fidelity_on_whole_sets():
    # one subset holding every sample: the unbiased MMD² does not depend on the order of the draw
    fake, real = feats(300, 0.3, seed=1), feats(300)
    ours, std, changed = kid.kid(fake, side(real), subset_size=300, subsets=1)
    theirs = kid_features_to_metric(fake, real, kid_subsets=1, kid_subset_size=300, verbose=False, rng_seed=0,
                                    kid_kernel="poly", kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None,
                                    kid_kernel_poly_coef0=1)  # fmt: skip
    assert ours == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-5)
    assert (std, changed) == (0.0, True)


def test_kid_subsets_match_torch_fidelity_mmd_and_real_side_is_cached():
    fake, real = feats(400, 0.5, seed=1), feats(700)
    ref = side(real)
    mean, std, changed = kid.kid(fake, ref, subset_size=50, subsets=20)
    assert changed and set(ref.kid) == {50}
    fi, ri = kid_subsets(400, 50, 20, kid.KID_SEED + 1), ref.kid[50][0]
    kw = dict(kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1)
    expected = [
        mmd2(kernel_poly(x, x, **kw), kernel_poly(x, y, **kw), kernel_poly(y, y, **kw))
        for x, y in ((fake[f].double().numpy(), real[r].double().numpy()) for f, r in zip(fi, ri, strict=True))
    ]
    assert mean == pytest.approx(np.mean(expected), rel=1e-5)
    assert std == pytest.approx(np.std(expected), rel=1e-4)
    # the real subsets do not depend on the fake set, so the second scoring reuses their kernel sums
    again = kid.kid(feats(200, 0.5, seed=2), ref, subset_size=50, subsets=20)
    assert again[2] is False and (ref.kid[50][0] == ri).all()


def test_precision_recall_equals_torch_fidelity():
    fake, real = feats(500, 0.7, seed=3), feats(600)
    p, r, changed = precision_recall(fake, side(real), k=3)
    tp, tr = calculate_precision_recall_full(fake, real, neighborhood=3, batch_size=10000)
    assert (p, r) == pytest.approx((tp, tr), abs=1e-9)
    assert changed and 0 < p < 1 and 0 < r < 1


def test_precision_recall_reuses_real_radii_and_chunks(monkeypatch):
    fake, real = feats(300, 0.2, seed=4), feats(400)
    ref = side(real)
    whole = precision_recall(fake, ref, k=3)
    calls = []
    monkeypatch.setattr(prc, "knn_radii", lambda f, k: calls.append(len(f)) or knn_radii(f, k))
    monkeypatch.setattr(realside, "CHUNK", 64)  # many chunks: same answer
    chunked = precision_recall(fake, ref, k=3)
    assert chunked[:2] == whole[:2] and chunked[2] is False
    assert calls == [300], "the real radii were recomputed"


def test_knn_radii_excludes_the_point_itself():
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    assert knn_radii(x, 1).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert knn_radii(x, 2).tolist() == [3.0, 2.0, 3.0, 6.0]


def test_cache_round_trip():
    ref = side(feats(50), prc_index=torch.arange(0, 50, 2))
    precision_recall(feats(20, seed=5), ref, k=3)
    cache = RealSideCache("unit-test-reference")
    assert cache.load() is None
    cache.save(ref)
    back = cache.load()
    assert torch.equal(back.features, ref.features) and torch.equal(back.prc_radii, ref.prc_radii)
    assert torch.equal(back.prc_features, ref.features[::2])
