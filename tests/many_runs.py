"""A results folder of many finished runs written straight to disk (no training), for the report's scale tests
and benchmark: run folders in the layout bench.grid.store documents, then `Store.rebuild` indexes them.

The values are drawn at random (seeded); what is checked with them is the report's rendering and speed, never
the numbers themselves.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from bench.grid.store import Store, write_json

METRIC = {"extractor": "bench-domain-cnn", "n_gen": 1000, "note": ""}


def write_runs(
    root: Path,
    *,
    methods: list[str],
    epsilons: list[float],
    seeds: list[int],
    dataset: str = "synthetic",
    samples_for_seed: int | None = 0,
) -> Store:
    """One finished run per (method, ε, seed) on `dataset` (1×16×16, 10 classes) with a privacy card of one DP-SGD
    stage, fd_domain and acc_logreg (two classifier seeds), a cost record and, for seed `samples_for_seed`, a
    samples.npz and samples.png; returns the indexed Store."""
    store = Store(root)
    rng = np.random.default_rng(0)
    for method, eps, seed in itertools.product(methods, epsilons, seeds):
        key = f"{method}-{dataset}-e{eps:g}-s{seed}"
        folder = store.run_dir(key)
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / "config.json", {"method": method, "dataset": dataset, "epsilon": eps, "delta": 1e-5,
                                            "accountant": "rdp", "seed": seed, "profile": "tiny"})  # fmt: skip
        sigma = float(rng.uniform(0.5, 3.0))
        write_json(folder / "privacy.json", {
            "target_epsilon": eps, "delta": 1e-5, "accountant": "rdp", "epsilon": eps * float(rng.uniform(0.9, 1.0)),
            "guarantee": "end-to-end", "non_private": [], "claimed_epsilon": None, "status": "ok",
            "stages": [{"name": "generator", "mechanism": "poisson_gaussian", "sampling_rate": 0.01,
                        "noise_multiplier": sigma, "steps": 100, "max_grad_norm": 1.0, "expected_batch_size": 20.0}],
        })  # fmt: skip
        per_seed = [float(v) for v in rng.uniform(0.1, 0.9, size=2)]
        write_json(folder / "metrics.json", {
            "key": key,
            "metrics": {"fd_domain": {**METRIC, "value": float(rng.uniform(1, 100))},
                        "acc_logreg": {"value": sum(per_seed) / 2, "per_seed": per_seed, "protocol": "dpdm"}},
            "cost": {"fit_s": float(rng.uniform(1, 100)), "sample_s": 1.0, "score_s": 0.5, "peak_rss_mib": 900.0,
                     "device": "cpu", "released_parameters": 1000},
        })  # fmt: skip
        (folder / "log.txt").write_text(f"{key}: written by tests/many_runs.py\n")
        if seed == samples_for_seed:
            labels = np.repeat(np.arange(10), 8)
            images = rng.integers(0, 256, size=(80, 1, 16, 16), dtype=np.uint8)
            np.savez(folder / "samples.npz", images=images, labels=labels)
    store.rebuild()
    return store
