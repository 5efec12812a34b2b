"""A labelled grid of samples as a PNG: one row per class, the class name on the left.

Our own figure (no paper's code is reproduced here, so none is cited)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

PAD = 2  # image pixels between cells
DPI = 100
LABEL_WIDTH = 130  # PNG pixels left of the grid for class names


def grid_scale(height: int, width: int) -> int:
    """Integer upscaling so that a cell is about 56 PNG pixels."""
    return max(1, round(56 / max(height, width)))


def save_sample_grid(
    images: Tensor,
    labels: Tensor | None,
    path: str | Path,
    class_names: Sequence[str] | None = None,
    per_class: int = 10,
) -> Path:
    """Write uint8 `images` [N, C, H, W] (C = 1 or 3) as a PNG grid, `per_class` images a row.

    With int64 `labels` [N]: one row per class (0..K-1, K = len(class_names) or max label + 1), labelled
    with the class name, blank cells where a class has fewer samples. Without labels: the first
    10·per_class images, unlabelled. The PNG is (rows·(H+2)+2)·s by 130 + (per_class·(W+2)+2)·s pixels,
    s = grid_scale(H, W).
    """
    n, c, h, w = images.shape
    if c not in (1, 3):
        raise ValueError(f"grid needs 1 or 3 channels, got {c}")
    if labels is None:
        rows = [list(range(i, min(i + per_class, n))) for i in range(0, min(n, 10 * per_class), per_class)]
        names: list[str] = [""] * len(rows)
    else:
        k = len(class_names) if class_names is not None else int(labels.max()) + 1 if n else 0
        rows = [(labels == j).nonzero().flatten()[:per_class].tolist() for j in range(k)]
        names = list(class_names) if class_names is not None else [str(j) for j in range(k)]

    pixels = images.permute(0, 2, 3, 1).numpy()  # [N, H, W, C]
    mosaic = np.full((len(rows) * (h + PAD) + PAD, per_class * (w + PAD) + PAD, c), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for col, i in enumerate(row):
            y, x = PAD + r * (h + PAD), PAD + col * (w + PAD)
            mosaic[y : y + h, x : x + w] = pixels[i]
    s = grid_scale(h, w)
    mosaic = mosaic.repeat(s, axis=0).repeat(s, axis=1)

    height, width = mosaic.shape[0], LABEL_WIDTH + mosaic.shape[1]
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((LABEL_WIDTH / width, 0.0, 1.0 - LABEL_WIDTH / width, 1.0))
    ax.imshow(mosaic if c == 3 else mosaic[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_aspect("auto")
    ax.axis("off")
    for r, name in enumerate(names):
        y_center = (PAD + r * (h + PAD) + h / 2) * s
        fig.text((LABEL_WIDTH - 6) / width, 1.0 - y_center / height, name, ha="right", va="center", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path
