"""Figures for the notebooks and reports.

Every function returns a Matplotlib ``Figure`` and draws nothing it was not
given, so notebooks stay one line per figure; :func:`save_figure` writes a
PNG into the run's ``figures/`` folder when the notebook runs inside
``make reports``.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from medlab.data import SPLITS, Dataset, Split


def save_figure(figure, run_dir: str | Path | None, name: str) -> Path | None:
    """Save ``figure`` as ``<run_dir>/figures/<name>.png``; do nothing when run_dir is empty."""
    if not run_dir:
        return None
    path = Path(run_dir) / "figures" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _show(axis, image: np.ndarray, title: str | None = None) -> None:
    if image.shape[-1] == 1:
        axis.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255)
    else:
        axis.imshow(image.astype(np.uint8))
    axis.set_xticks([])
    axis.set_yticks([])
    if title:
        axis.set_title(title, fontsize=8)


def synthetic_banner(figure, dataset: Dataset) -> None:
    """Stamp 'SYNTHETIC DATA' on figures made from generated images."""
    if dataset.info.synthetic:
        figure.text(0.99, 0.005, "SYNTHETIC DATA (generated phantoms)", ha="right", va="bottom",
                    fontsize=8, color="crimson", weight="bold")


def plot_class_counts(dataset: Dataset):
    """Grouped bars: images per class in each split, with counts on the bars."""
    counts = dataset.counts().drop(columns="total")
    long = counts.reset_index(names="split").melt(id_vars="split", var_name="class", value_name="images")
    figure, axis = plt.subplots(figsize=(7, 3.5))
    sns.barplot(data=long, x="split", y="images", hue="class", ax=axis)
    for container in axis.containers:
        axis.bar_label(container, fontsize=8)
    axis.set_title(f"Images per class and split: {dataset.info.name}", fontsize=10)
    synthetic_banner(figure, dataset)
    figure.tight_layout()
    return figure


def plot_sample_grid(dataset: Dataset, split: str = "train", per_class: int = 6, seed: int = 0,
                     show_masks: bool = False):
    """One row per class of randomly chosen images; lesion outlines in red when asked."""
    part: Split = dataset.splits[split]
    rng = np.random.default_rng(seed)
    names = dataset.info.class_names
    figure, axes = plt.subplots(len(names), per_class, figsize=(1.6 * per_class, 1.7 * len(names)),
                                squeeze=False)
    for row, name in enumerate(names):
        candidates = np.nonzero(part.labels == row)[0]
        chosen = rng.choice(candidates, size=min(per_class, len(candidates)), replace=False)
        for column in range(per_class):
            axis = axes[row, column]
            if column >= len(chosen):
                axis.axis("off")
                continue
            index = chosen[column]
            _show(axis, part.images[index], name if column == 0 else None)
            if show_masks and part.masks is not None and part.masks[index].any():
                axis.contour(part.masks[index], levels=[0.5], colors="red", linewidths=0.8)
    figure.suptitle(f"{split} samples" + (" (red: lesion mask)" if show_masks and part.masks is not None else ""),
                    fontsize=10)
    synthetic_banner(figure, dataset)
    figure.tight_layout()
    return figure


def plot_intensity_histograms(dataset: Dataset, split: str = "train", max_images: int = 500, seed: int = 0):
    """Pixel-intensity distributions per class (left) and per-image mean brightness (right)."""
    part = dataset.splits[split]
    rng = np.random.default_rng(seed)
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    rows = []
    for label, name in enumerate(dataset.info.class_names):
        indices = np.nonzero(part.labels == label)[0]
        indices = rng.choice(indices, size=min(max_images, len(indices)), replace=False)
        pixels = part.images[indices].reshape(-1)
        left.hist(pixels, bins=64, range=(0, 255), density=True, histtype="step", label=name, linewidth=1.3)
        rows += [{"class": name, "mean intensity": float(value)}
                 for value in part.images[indices].reshape(len(indices), -1).mean(axis=1)]
    left.set_xlabel("pixel value")
    left.set_ylabel("density")
    left.set_title("Pixel intensities", fontsize=10)
    left.legend(fontsize=8)
    sns.boxplot(data=pd.DataFrame(rows), x="class", y="mean intensity", ax=right)
    right.set_title("Mean brightness per image", fontsize=10)
    synthetic_banner(figure, dataset)
    figure.tight_layout()
    return figure


def plot_mean_images(dataset: Dataset, split: str = "train"):
    """The average image of each class, and each class's difference from the first class."""
    part = dataset.splits[split]
    names = dataset.info.class_names
    means = [part.images[part.labels == label].astype(np.float64).mean(axis=(0, 3)) for label in range(len(names))]
    figure, axes = plt.subplots(2, len(names), figsize=(2.4 * len(names), 5), squeeze=False)
    limit = max(np.abs(mean - means[0]).max() for mean in means) or 1.0
    for column, (name, mean) in enumerate(zip(names, means)):
        axes[0, column].imshow(mean, cmap="gray", vmin=0, vmax=255)
        axes[0, column].set_title(f"mean {name}", fontsize=9)
        image = axes[1, column].imshow(mean - means[0], cmap="coolwarm", vmin=-limit, vmax=limit)
        axes[1, column].set_title(f"{name} - {names[0]}", fontsize=9)
    for axis in axes.ravel():
        axis.set_xticks([])
        axis.set_yticks([])
    figure.colorbar(image, ax=axes[1, :].tolist(), shrink=0.8, label="difference in pixel value")
    synthetic_banner(figure, dataset)
    return figure


def plot_augmentation_grid(images: np.ndarray, augmentations: dict, draws: int = 1):
    """Rows: images; columns: the original, then each augmentation applied ``draws`` times."""
    import tensorflow as tf

    columns = 1 + len(augmentations) * draws
    figure, axes = plt.subplots(len(images), columns, figsize=(1.6 * columns, 1.7 * len(images)),
                                squeeze=False)
    batch = tf.convert_to_tensor(images.astype(np.float32))
    for row in range(len(images)):
        _show(axes[row, 0], images[row], "original" if row == 0 else None)
    column = 1
    for name, layer in augmentations.items():
        for draw in range(draws):
            augmented = np.clip(layer(batch, training=True).numpy(), 0, 255)
            for row in range(len(images)):
                _show(axes[row, column], augmented[row], name if row == 0 and draw == 0 else None)
            column += 1
    figure.tight_layout()
    return figure


def plot_image_batch(images: np.ndarray, labels: np.ndarray, class_names: list[str], columns: int = 8):
    """A batch as the model sees it (float pixels in [0, 255]), titled with each image's class."""
    rows = int(np.ceil(len(images) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.8 * rows), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for axis, image, label in zip(axes.ravel(), np.clip(images, 0, 255), labels):
        _show(axis, image, class_names[int(label)])
    figure.tight_layout()
    return figure


def plot_history(history: pd.DataFrame, title: str = "training history"):
    """Loss, accuracy, recall and ROC-AUC per epoch, training vs validation."""
    metrics = [m for m in ("loss", "accuracy", "recall", "auc") if m in history and f"val_{m}" in history]
    figure, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        axis.plot(history.index, history[metric], marker=".", label="train")
        axis.plot(history.index, history[f"val_{metric}"], marker=".", label="validation")
        axis.set_title(metric, fontsize=10)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


def plot_image_size_scatter(dataset: Dataset):
    """Source image sizes (folder data): a note on how much resizing the pipeline does."""
    sizes = dataset.info.source_image_sizes
    if not sizes:
        return None
    figure, axis = plt.subplots(figsize=(5, 3))
    table = pd.DataFrame({k: sizes[k] for k in ("width", "height")}).T
    table.plot.bar(ax=axis)
    axis.set_ylabel("pixels")
    axis.set_title(f"Source image sizes ({sizes['count']} files)", fontsize=10)
    figure.tight_layout()
    return figure


__all__ = [
    "SPLITS", "save_figure", "synthetic_banner", "plot_class_counts", "plot_sample_grid",
    "plot_intensity_histograms", "plot_mean_images", "plot_augmentation_grid", "plot_image_batch",
    "plot_history", "plot_image_size_scatter",
]
