"""Downstream CNN accuracy, DPDM protocol (Dockhorn et al., "Differentially Private Diffusion Models", 2023).

Train a small CNN on synthetic labelled images, pick the epoch with the best accuracy on a held-out
part of the *synthetic* data, report that epoch's accuracy on the real test split. No private data is
used for selection.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from bench.contract import ImageDataset
from bench.metrics.features import accuracy, new_classifier, train_epoch

PROTOCOL = "dpdm"


def cnn_accuracy(
    images: Tensor,
    labels: Tensor,
    test: ImageDataset,
    *,
    seed: int,
    epochs: int = 50,
    batch_size: int = 128,
    val_fraction: float = 0.1,
    lr: float = 3e-4,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Train on uint8 `images` [N, C, H, W] with int64 `labels` [N]; score on the real `test` split.

    Returns accuracy (% on `test`, at the selected epoch), selected_epoch (1-based), val_accuracy (% on the
    held-out synthetic part), protocol, and the counts. Deterministic given `seed` on a given device.
    """
    n = len(images)
    n_val = max(1, round(n * val_fraction))
    if labels.shape != (n,) or n - n_val < 1:
        raise ValueError(f"need labels [N] and at least 2 samples, got {n} images, labels {tuple(labels.shape)}")
    if int(labels.min()) < 0 or int(labels.max()) >= test.num_classes:
        raise ValueError(f"labels must be in 0..{test.num_classes - 1}, got {int(labels.min())}..{int(labels.max())}")
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=generator)
    val, fit = perm[:n_val], perm[n_val:]

    model = new_classifier(images.shape[1], test.num_classes, seed).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    best_val, best_epoch, best_state = -1.0, 0, None
    for epoch in range(1, epochs + 1):
        train_epoch(model, images[fit], labels[fit], optimizer, batch_size=batch_size, generator=generator)
        val_acc = accuracy(model, images[val], labels[val])
        if val_acc > best_val:
            best_val, best_epoch, best_state = val_acc, epoch, copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    return {
        "accuracy": 100.0 * accuracy(model, test.images, test.labels),
        "selected_epoch": best_epoch,
        "val_accuracy": 100.0 * best_val,
        "protocol": PROTOCOL,
        "epochs": epochs,
        "n_train": len(fit),
        "n_val": n_val,
        "n_test": len(test),
    }
