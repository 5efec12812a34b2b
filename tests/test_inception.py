import time

import pytest
import torch
from torch import nn

from bench import data
from bench.errors import BenchError
from bench.metrics import inception
from bench.metrics.inception import (
    ENV_WEIGHTS,
    EXTRACTOR,
    UNAVAILABLE,
    check_inception_weights,
    hub_weights_path,
    inception_metrics,
    inception_skeleton,
    resolve_inception_weights,
)

ALL = {"fid_inception", "kid_inception", "is_inception", "precision_inception", "recall_inception"}


@pytest.fixture(autouse=True)
def env(tmp_path_factory, monkeypatch):
    """Nothing outside tmp: torch hub (torch-fidelity's weights cache) and the bench cache; one thread."""
    base = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("TORCH_HOME", str(base / "torch-home"))
    monkeypatch.setenv("BENCH_CACHE", str(base / "bench-cache"))
    monkeypatch.delenv(ENV_WEIGHTS, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """torch-fidelity's Inception-v3 with random weights, saved as the state dict it loads. He-initialised
    convolutions keep the activations alive through the 94 layers (PyTorch's default init lets them die)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = inception_skeleton("cpu")
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "weights-inception-random.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def real():
    return data.load("synthetic", "train").subset(torch.arange(10))


def noise(n):
    return torch.randint(0, 256, (n, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def test_metrics_with_weights_then_cached_via_env(weights, real, monkeypatch):
    t0 = time.perf_counter()
    same = inception_metrics(real.images, real, weights=str(weights), cache_name="synthetic-train")
    first = time.perf_counter() - t0
    assert set(same) == ALL
    sha = check_inception_weights(weights)
    for rec in same.values():
        assert rec["extractor"] == EXTRACTOR and rec["weights_sha"] == sha and rec["reference"] == "train"
        assert (rec["n_gen"], rec["n_ref"]) == (10, 10)
        assert isinstance(rec["value"], float) and torch.isfinite(torch.tensor(rec["value"]))
    cached = sorted((data.cache_root() / "fidelity").glob(f"synthetic-train-*-{EXTRACTOR}-{sha}-*"))
    assert cached, "reference features/statistics were not cached"
    mtimes = [p.stat().st_mtime_ns for p in cached]

    monkeypatch.setenv(ENV_WEIGHTS, str(weights))
    t0 = time.perf_counter()
    fake = inception_metrics(noise(8), real, weights=None, cache_name="synthetic-train", metrics=("fid", "kid"))
    second = time.perf_counter() - t0
    assert set(fake) == {"fid_inception", "kid_inception"} and fake["fid_inception"]["weights_sha"] == sha
    # the real set's features were read from the cache, not recomputed (the files are untouched; the time is only a
    # second sign: on an oversubscribed CPU the cached call was once measured slower, 40 s against 35 s)
    assert [p.stat().st_mtime_ns for p in cached] == mtimes and second < 2 * first
    assert fake["fid_inception"]["value"] > 0 and fake["kid_inception"]["value"] > 0
    assert abs(same["fid_inception"]["value"]) < 1e-6 * fake["fid_inception"]["value"]
    assert same["precision_inception"]["value"] == same["recall_inception"]["value"] == 1.0


def test_no_weights_reports_unavailable(real):
    assert resolve_inception_weights(None) is None
    out = inception_metrics(real.images, real, weights=None, cache_name="synthetic-train")
    assert set(out) == ALL
    for rec in out.values():
        assert (
            rec["value"] is None
            and rec["note"] == UNAVAILABLE == "unavailable: no Inception weights (pass --inception-weights)"
        )


def test_torch_fidelity_download_cache_is_found(tmp_path):
    path = hub_weights_path()
    assert "torch-home" in str(path)  # under $TORCH_HOME, as torch.hub puts it
    assert path.name == "weights-inception-2015-12-05-6726825d.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    try:
        assert resolve_inception_weights(None) == path
        with pytest.raises(BenchError, match="is not an Inception-v3 weights file for torch-fidelity"):
            check_inception_weights(path)
    finally:
        path.unlink()


def test_explicit_path_wins_over_env(weights, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_WEIGHTS, str(tmp_path / "other.pth"))
    assert resolve_inception_weights(str(weights)) == weights
    with pytest.raises(BenchError, match=f"{ENV_WEIGHTS} .*other.pth does not exist"):
        resolve_inception_weights(None)


def test_missing_file_is_a_bench_error(tmp_path, real):
    with pytest.raises(BenchError, match="does not exist"):
        inception_metrics(real.images, real, weights=str(tmp_path / "nope.pth"), cache_name="x")
    with pytest.raises(BenchError, match="does not exist"):
        check_inception_weights(tmp_path / "nope.pth")


@pytest.mark.parametrize(
    "content, reason",
    [
        ({"foo": torch.zeros(3)}, "566 missing keys .*1 unexpected keys"),
        ([1, 2, 3], "not a state dict of tensors but a list"),
        (None, "cannot load it"),
    ],
)
def test_not_inception_is_a_one_line_bench_error(tmp_path, real, content, reason):
    path = tmp_path / "w.pth"
    if content is None:
        path.write_text("not a torch file\n")
    else:
        torch.save(content, path)
    with pytest.raises(BenchError, match=f"is not an Inception-v3 weights file for torch-fidelity: {reason}") as e:
        inception_metrics(real.images, real, weights=str(path), cache_name="x")
    assert "\n" not in str(e.value)


def test_wrong_shape_is_named(weights, tmp_path):
    state = torch.load(weights, weights_only=True)
    state["fc.weight"] = torch.zeros(10, 2048)
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(BenchError, match=r"fc.weight has shape \(10, 2048\), expected \(1008, 2048\)"):
        check_inception_weights(tmp_path / "w.pth")


def test_unknown_metric_rejected(real):
    with pytest.raises(ValueError, match="unknown Inception metrics"):
        inception_metrics(real.images, real, weights=None, metrics=("fd",), cache_name="x")


def test_grayscale_is_repeated_to_rgb():
    from bench.metrics.features import UInt8Images

    x = noise(2)
    item = UInt8Images(x, rgb=True)[1]
    assert item.shape == (3, 16, 16) and (item == x[1]).all()
    assert UInt8Images(x)[1].shape == (1, 16, 16)


def test_skeleton_matches_expected_shapes():
    assert len(inception.expected_state_shapes()) == 566
