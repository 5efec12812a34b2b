"""Colour images at CIFAR-10's and CelebA-64's shapes (3×32×32, 3×64×64), beside the contract suite (which fits
every method on 3×32×32).

A full fit at 64×64 of every method is too slow for the suite: each method is fitted through the registry with
the tiny profile's synthetic-rgb64 settings, which keep every phase to one step, and every optimiser step of
that fit is checked to update finite parameters. The built-in profiles' networks are built for every colour
dataset, and the metrics' networks (the domain extractor, every downstream protocol) and the colour sample grid
run on both shapes. No per-method branches.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from bench import config, data
from bench.contract import ImageDataset, NullProgress
from bench.errors import BenchError
from bench.grid import registry
from bench.metrics import features
from bench.metrics.downstream import downstream_accuracy
from bench.metrics.protocols import METRIC_PROTOCOL, ON_REQUEST
from bench.metrics.protocols import datalens_protocol as datalens
from bench.metrics.protocols import dpdm_protocol as dpdm
from bench.metrics.protocols import sklearn_protocol as sklearn_merf
from bench.metrics.sample_grid import PAD, grid_scale, save_sample_grid
from bench.privacy import Budget, epsilon
from tests.conftest import TINY_PROFILE

pytestmark = pytest.mark.usefixtures("one_thread")
METHODS = sorted(registry.methods())
SHAPES = {"synthetic-rgb32": (3, 32, 32), "synthetic-rgb64": (3, 64, 64)}
CPU = torch.device("cpu")
EPS = 10.0
# the real colour datasets (shapes known without their files) and, in the smoke profile, the synthetic ones
REAL_COLOUR = ("cifar10", "celeba32-gender", "celeba32-hair", "celeba64-gender", "celeba64-hair")
PROFILE_DATASETS = {
    "smoke": (*REAL_COLOUR, *SHAPES),
    "demo": REAL_COLOUR,
    "cpu": REAL_COLOUR,
    "paper": REAL_COLOUR,
    "gpu-short": REAL_COLOUR,
}


@pytest.fixture(scope="module")
def rgb() -> dict[str, ImageDataset]:
    return {name: data.load(name, "train") for name in SHAPES}


@pytest.fixture(scope="module")
def rgb_test() -> dict[str, ImageDataset]:
    return {name: data.load(name, "test") for name in SHAPES}


class StepSpy:
    """Every optimiser step taken inside `installed()`: whether each parameter with a gradient had a finite one
    of its shape, and whether the step changed any parameter (torch's global optimiser hooks, so it sees every
    network of every method without a line of per-method code)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, bool]] = []
        self._before: list[torch.Tensor] = []

    def _params(self, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        return [p for group in optimizer.param_groups for p in group["params"]]

    def _pre(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        self._before = [p.detach().clone() for p in self._params(optimizer)]

    def _post(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        params = self._params(optimizer)
        grads = [p.grad for p in params if p.grad is not None]
        self.steps.append({
            "grads": bool(grads),
            "finite": all(g.shape == p.shape and torch.isfinite(g).all() for p in params if (g := p.grad) is not None),
            "params_finite": all(torch.isfinite(p).all() for p in params),
            "changed": any(not torch.equal(b, p.detach()) for b, p in zip(self._before, params, strict=True)),
        })  # fmt: skip

    @contextlib.contextmanager
    def installed(self) -> Iterator[StepSpy]:
        pre, post = register_optimizer_step_pre_hook(self._pre), register_optimizer_step_post_hook(self._post)
        try:
            yield self
        finally:
            pre.remove()
            post.remove()


def build(name: str, dataset: str, spec, profile: dict):
    cls = registry.get(name)
    cfg, _ = config.resolve(cls.Config, profile=profile, method=name, dataset=dataset, epsilon=EPS, sets={})
    return cls(cfg, spec=spec, device=CPU)


@pytest.mark.parametrize("name", METHODS)
def test_every_method_takes_a_step_on_3x64x64_and_samples_that_shape(name: str, rgb) -> None:
    train = rgb["synthetic-rgb64"]
    method = build(name, train.name, train.spec, config.load_profile(TINY_PROFILE))
    budget = Budget.for_records(EPS, len(train))
    with StepSpy().installed() as spy:
        ledger = method.fit(train, budget=budget, generator=torch.Generator().manual_seed(0), progress=NullProgress())
    assert spy.steps, f"{name}: no optimiser step on 3×64×64"
    assert all(s["grads"] and s["finite"] and s["params_finite"] for s in spy.steps), f"{name}: a bad step"
    assert all(s["changed"] for s in spy.steps), f"{name}: an optimiser step left every parameter as it was"
    if method.guarantee != "none":
        assert 0 < epsilon(ledger, budget.delta, budget.accountant) <= EPS * (1 + 1e-6)
    n = 2 * train.num_classes
    labels = torch.arange(n) % train.num_classes if method.conditional else None
    x = method.sample(n, labels=labels, generator=torch.Generator().manual_seed(1))
    assert x.dtype == torch.uint8 and tuple(x.shape) == (n, 3, 64, 64)
    assert x.float().std() > 0, f"{name}: constant samples"


@pytest.mark.parametrize("profile", sorted(PROFILE_DATASETS))
def test_builtin_profiles_networks_fit_every_colour_dataset(profile: str) -> None:
    """Every method's networks, as the built-in profile sets them for a colour dataset, build for its shape
    (DPDM's 28×28 attention at 7×7 has no level on 32×32 or 64×64: the profiles set the references' shapes)."""
    prof = config.load_profile(profile)
    for dataset in PROFILE_DATASETS[profile]:
        spec = data.spec_without_files(dataset)
        assert spec.channels == 3 and spec.height in (32, 64)
        for name in METHODS:
            build(name, dataset, spec, prof)  # raises BenchError naming the method when a network does not fit


def test_a_network_that_does_not_fit_the_shape_is_a_one_line_error_naming_the_fix(rgb) -> None:
    spec = rgb["synthetic-rgb32"].spec
    profile = {"dpdm": {"channel_mults": [1, 2], "attention_resolutions": [8]}}  # levels 32, 16: no 8×8
    with pytest.raises(BenchError, match=r"^dpdm: .*no level has side 8.*on 3×32×32 images.*\[dpdm\.<dataset>\]") as e:
        build("dpdm", "synthetic-rgb32", spec, profile)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("dataset", sorted(SHAPES))
def test_domain_extractor_trains_and_extracts_features_of_colour_images(dataset: str, rgb) -> None:
    train = rgb[dataset].subset(torch.arange(200))
    extractor = features.domain_extractor(train, dataset=dataset, epochs=1)
    f = features.extract_features(extractor, train.images[:20])
    assert f.shape == (20, 128) and torch.isfinite(f).all()
    assert not torch.equal(f[0], f[5]), "features do not depend on the image"
    net = features.new_classifier(3, train.num_classes, seed=0)
    assert net(features.to_input(train.images[:2])).shape == (2, train.num_classes)


@pytest.mark.parametrize("dataset", sorted(SHAPES))
def test_every_downstream_protocol_trains_and_predicts_on_colour_images(dataset: str, rgb, rgb_test) -> None:
    """One epoch of every protocol's classifiers on 100 samples of the shape: each fits, predicts the test split
    and reports an accuracy in [0, 100]."""
    train, test = rgb[dataset].subset(torch.arange(100)), rgb_test[dataset].subset(torch.arange(100))
    # sklearn's MLP: slow and not special; DPImageBench's ResNet-110/WRN-40-4/ResNeXt-29 run only on request, and
    # their colour shapes are tested in tests/test_dpimagebench_protocol.py (parameter counts on 3×32×32 and 3×64×64)
    metrics = sorted(m for m in METRIC_PROTOCOL if m != "acc_mlp_sklearn" and m not in ON_REQUEST)
    settings = {
        "dpdm": dpdm.Settings(epochs=1),
        "datalens": datalens.Settings(epochs=1),
        "sklearn": sklearn_merf.Settings(classifiers=("logistic_reg", "gaussian_nb")),
    }
    out = downstream_accuracy(train.images, train.labels, test, dataset=dataset, seed=0, metrics=metrics,
                              settings=settings)  # fmt: skip
    assert sorted(out) == metrics
    for metric, record in out.items():
        assert 0.0 <= record["value"] <= 100.0 and math.isfinite(record["value"]), metric
    assert {METRIC_PROTOCOL[m][0] for m in metrics} == {"dpdm", "datalens", "sklearn"}


@pytest.mark.parametrize("shape", sorted(SHAPES.values()))
def test_protocol_classifiers_take_colour_input(shape: tuple[int, int, int]) -> None:
    """One forward of every torch classifier of the protocols on uint8 [2, 3, S, S], prepared as each protocol does."""
    x = torch.randint(0, 256, (2, *shape), dtype=torch.uint8)
    for name, arch in dpdm.ARCHITECTURES.items():
        assert arch(shape, 10)(dpdm.PREPARE[name](x)).shape == (2, 10), name
    assert datalens.DataLensCNN(shape, 2)(datalens.prepare(x)).shape == (2, 2)


def test_colour_sample_grid_is_an_rgb_png_with_each_samples_colours(tmp_path) -> None:
    """A 3-channel grid keeps each sample's colours (a 1-channel one is grey): class k's samples are one pure
    colour, and the PNG's cell of each class has that colour."""
    colours = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=torch.uint8)  # class 0, 1, 2
    labels = torch.arange(6) % 3
    images = colours[labels][:, :, None, None].expand(6, 3, 32, 32).contiguous()
    path = save_sample_grid(images, labels, tmp_path / "rgb.png", class_names=["r", "g", "b"], per_class=2)
    png = Image.open(path)
    assert png.mode in ("RGB", "RGBA")
    pixels = np.asarray(png.convert("RGB"))
    s = grid_scale(32, 32)
    left = pixels.shape[1] - (2 * (32 + PAD) + PAD) * s  # the class-name column
    for k in range(3):
        y, x = (PAD + k * (32 + PAD) + 16) * s, left + (PAD + 16) * s  # the centre of class k's first cell
        assert pixels[y, x].tolist() == colours[k].tolist(), k
    grey = save_sample_grid(images[:, :1], labels, tmp_path / "grey.png", class_names=["r", "g", "b"], per_class=2)
    g = np.asarray(Image.open(grey).convert("RGB")).astype(int)
    assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
