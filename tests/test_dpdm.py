"""DPDM specifics: the ledger charges exactly what the training loop executed."""

from __future__ import annotations

import pytest
import torch

from bench import config
from bench.contract import NullProgress
from bench.errors import BenchError
from bench.grid import registry
from bench.privacy import Budget, calibrate_sigma, epsilon
from bench.privacy.dpsgd import DPSGD
from tests.conftest import TINY_PROFILE


def test_ledger_matches_the_executed_steps(train, monkeypatch: pytest.MonkeyPatch) -> None:
    cls = registry.get("dpdm")
    cfg, _ = config.resolve(
        cls.Config,
        profile=config.load_profile(TINY_PROFILE),
        method="dpdm",
        dataset="synthetic",
        epsilon=3.0,
        sets={"noise_multiplicity": 3},
    )
    calls: list[tuple[int, int]] = []  # (batch size, K) of every executed noisy step
    real_step = DPSGD.step

    def spy(self, *batch):
        calls.append((batch[0].shape[0], batch[2].shape[1]))
        return real_step(self, *batch)

    monkeypatch.setattr(DPSGD, "step", spy)
    budget = Budget.for_records(3.0, len(train))
    ledger = cls(cfg, spec=train.spec, device=torch.device("cpu")).fit(
        train, budget=budget, generator=torch.Generator().manual_seed(0), progress=NullProgress()
    )
    (stage,) = ledger.stages
    q = cfg.batch_size / len(train)
    assert stage.mechanism == "poisson_gaussian"
    assert stage.sampling_rate == pytest.approx(q)
    assert stage.steps == len(calls) == round(cfg.epochs / q)
    assert stage.max_grad_norm == cfg.max_grad_norm
    assert stage.noise_multiplier == calibrate_sigma(3.0, sample_rate=q, steps=stage.steps, delta=budget.delta)
    assert all(k == 3 for _, k in calls), "every example's loss is averaged over K draws"
    assert sum(b for b, _ in calls) / len(calls) == pytest.approx(cfg.batch_size, rel=0.3)  # Poisson batches
    assert len({b for b, _ in calls}) > 1, "batch sizes vary under Poisson sampling"
    assert epsilon(ledger, budget.delta, "rdp") <= 3.0


def test_batch_larger_than_dataset_is_refused(train) -> None:
    cls = registry.get("dpdm")
    cfg, _ = config.resolve(
        cls.Config,
        profile=config.load_profile(TINY_PROFILE),
        method="dpdm",
        dataset="synthetic",
        epsilon=3.0,
        sets={"batch_size": 5000},
    )
    with pytest.raises(BenchError, match="exceeds the 2000 training records"):
        cls(cfg, spec=train.spec, device=torch.device("cpu")).fit(
            train, budget=Budget.for_records(3.0, 2000), generator=torch.Generator(), progress=NullProgress()
        )


def _fit(train, sets: dict, monkeypatch: pytest.MonkeyPatch | None = None):
    cls = registry.get("dpdm")
    cfg, _ = config.resolve(cls.Config, profile=config.load_profile(TINY_PROFILE), method="dpdm",
                            dataset="synthetic", epsilon=3.0, sets=sets)  # fmt: skip
    model = cls(cfg, spec=train.spec, device=torch.device("cpu"))
    model.fit(train, budget=Budget.for_records(3.0, len(train)), generator=torch.Generator().manual_seed(0),
              progress=NullProgress())  # fmt: skip
    return model


def test_labels_are_dropped_at_the_configured_rate_for_every_draw_of_an_example(train, monkeypatch) -> None:
    seen: list[torch.Tensor] = []
    real_step = DPSGD.step

    def spy(self, *batch):
        seen.append(batch[1].clone())
        return real_step(self, *batch)

    monkeypatch.setattr(DPSGD, "step", spy)
    _fit(train, {"label_dropout": 0.5, "epochs": 0.5})
    labels = torch.cat(seen)
    dropped = (labels == train.num_classes).float().mean().item()
    n = len(labels)
    assert abs(dropped - 0.5) < 4 * (0.25 / n) ** 0.5, f"dropout rate {dropped:.3f} over {n} examples"
    seen.clear()
    _fit(train, {"label_dropout": 0.0, "epochs": 0.1})
    assert all(int(y.max()) < train.num_classes for y in seen if len(y))


def test_the_ema_warm_up_count_and_the_precision_are_kept(train) -> None:
    model = _fit(train, {"precision": "bf16", "epochs": 0.05})
    assert model.precision == "bf16" and model.ema.updates > 0
    assert model.state_dict()["ema_updates"] == model.ema.updates
    assert _fit(train, {"epochs": 0.05}).precision == "fp32"  # auto on a CPU


@pytest.mark.parametrize("sets", [{"guidance": 1.5}, {"parameterization": "v"}, {"parameterization": "eps",
                                  "sampler": "ddpm", "T": 20}, {"sampler": "edm-stochastic",
                                  "s_churn": 5.0, "sample_steps": 4}])  # fmt: skip
def test_every_parameterization_sampler_and_guidance_samples_images(train, sets: dict) -> None:
    model = _fit(train, sets | {"epochs": 0.05})
    labels = torch.arange(6) % train.num_classes
    images = model.sample(6, labels=labels, generator=torch.Generator().manual_seed(1))
    assert images.dtype == torch.uint8 and images.shape == (6, *train.images.shape[1:])
    again = model.sample(6, labels=labels, generator=torch.Generator().manual_seed(1))
    assert torch.equal(images, again)


@pytest.mark.parametrize(("dataset", "eps", "parameterization"), [("fmnist", 10.0, "edm"), ("mnist", 0.2, "v")])
def test_the_paper_profile_is_the_reference_config(dataset: str, eps: float, parameterization: str) -> None:
    """nv-tlabs/DPDM configs/{mnist,fmnist}_28/train_eps_*.yaml: its network (1,753,345 parameters, counted on
    the reference code: tests/test_ncsnpp.py), EDM (V at ε = 0.2), K = 32, B = 4096, 300 epochs, EMA 0.999."""
    from bench.contract import DataSpec
    from bench.nets.unet import count_parameters

    cls = registry.get("dpdm")
    cfg, notes = config.resolve(cls.Config, profile=config.load_profile("paper"), method="dpdm", dataset=dataset,
                                epsilon=eps, sets={})  # fmt: skip
    assert not notes and cfg.parameterization == parameterization
    assert (cfg.noise_multiplicity, cfg.batch_size, cfg.epochs, cfg.lr, cfg.ema_decay) == (32, 4096, 300.0, 3e-4, 0.999)
    assert (cfg.sampler, cfg.sample_steps, cfg.label_dropout, cfg.guidance) == ("ddim", 50, 0.1, 0.0)
    spec = DataSpec(channels=1, height=28, width=28, num_classes=10, num_train=60000)
    assert count_parameters(cls(cfg, spec=spec, device=torch.device("cpu")).net) == 1_753_345
