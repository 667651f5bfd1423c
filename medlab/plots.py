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
from medlab.runs import RunFolder


def save_figure(figure, run_dir: str | Path | None, name: str) -> Path | None:
    """Save ``figure`` as ``<run_dir>/figures/<name>.png``; do nothing when run_dir is empty."""
    if not run_dir:
        return None
    path = RunFolder(run_dir).figure(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return path


def describe_figure(figure, max_panels: int = 6) -> str:
    """Alternative text for ``figure`` (what a screen reader says in the HTML reports): its titles, labels, legends.

    The figure's title, then each panel that has text ("title (x: label, y:
    label; legend: entries)"; a run of identical panels, as in an image
    gallery, is said once with its count), the first ``max_panels`` of them
    and how many more; then how many panels show images, and banner texts.
    """
    title = figure.get_suptitle()
    panels: list[list] = []  # [text, count]
    for axis in figure.axes:
        details = [f"{name}: {text}" for name, text in (("x", axis.get_xlabel()), ("y", axis.get_ylabel())) if text]
        legend = axis.get_legend()
        if legend is not None and legend.get_texts():
            details.append("legend: " + ", ".join(text.get_text() for text in legend.get_texts()))
        text = (axis.get_title() + (f" ({'; '.join(details)})" if details else "")).strip()
        if text and panels and panels[-1][0] == text:
            panels[-1][1] += 1
        elif text:
            panels.append([text, 1])
    parts = [f"Figure: {title}." if title else "Figure."]
    if panels:
        said = [text if count == 1 else f"{text} (x{count})" for text, count in panels[:max_panels]]
        more = len(panels) - max_panels
        parts.append("Panels: " + "; ".join(said) + (f"; and {more} more." if more > 0 else "."))
    images = sum(bool(axis.get_images()) for axis in figure.axes)
    if images:
        parts.append(f"{images} image panel(s).")
    notes = [text.get_text() for text in figure.texts if text.get_text() not in ("", title)]  # banners
    return " ".join(parts + notes)


def show_alt_text() -> bool:
    """In a Jupyter kernel, give every Matplotlib figure's PNG output its :func:`describe_figure` text.

    IPython's PNG formatter may return ``(data, metadata)``; the ``alt``
    entry of that metadata travels with the output into the executed
    notebook, and :func:`medlab.execution.render_html` puts it on the image.
    The inline backend registers its own PNG printer when it loads, so this
    loads it first (one empty figure) and wraps that printer. Returns whether
    it did (False outside a kernel: scripts and tests are untouched).
    """
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython comes with Jupyter
        return False
    shell = get_ipython()
    if shell is None or not hasattr(shell, "display_formatter"):
        return False
    plt.close(plt.figure())  # loads the backend, which registers its PNG printer
    return _wrap_png_printer(shell.display_formatter.formatters["image/png"])


def _wrap_png_printer(formatter) -> bool:
    from matplotlib.figure import Figure

    printer = formatter.type_printers.get(Figure)  # where the inline backend registers its printer
    if printer is None or getattr(printer, "medlab_alt_text", False):
        return printer is not None

    def png_with_alt_text(figure):
        data = printer(figure)
        if not data:
            return data
        data, metadata = data if isinstance(data, tuple) else (data, {})  # "retina" PNGs come with their size
        return data, {**metadata, "alt": describe_figure(figure)}

    png_with_alt_text.medlab_alt_text = True
    formatter.for_type(Figure, png_with_alt_text)
    return True


def _show(axis, image: np.ndarray, title: str | None = None) -> None:
    if image.shape[-1] == 1:
        axis.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255)
    else:
        axis.imshow(image.astype(np.uint8))
    axis.set_xticks([])
    axis.set_yticks([])
    if title:
        axis.set_title(title, fontsize=8)


def _image_grid(count: int, columns: int):
    """A figure with ``count`` small image panels, ``columns`` per row, axes switched off; axes come flat."""
    rows = max(1, int(np.ceil(count / columns)))
    figure, axes = plt.subplots(rows, columns, figsize=(1.7 * columns, 1.9 * rows), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    return figure, axes.ravel()


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


def plot_near_duplicate_pairs(dataset: Dataset, pairs: pd.DataFrame, count: int = 8):
    """The first ``count`` near-duplicate pairs (from :func:`medlab.audit.find_near_duplicates`), side by side."""
    images = {image_id: image for split in SPLITS for image_id, image in
              zip(dataset.splits[split].ids, dataset.splits[split].images)}
    shown = pairs.head(count)
    figure, axes = plt.subplots(2, max(len(shown), 1), figsize=(2.2 * max(len(shown), 1), 4.8), squeeze=False)
    for column, row in enumerate(shown.itertuples()):
        first_label, second_label = row.labels.split(", ")
        _show(axes[0, column], images[row.first], f"{row.first[-28:]}\n{first_label}")
        _show(axes[1, column], images[row.second], f"{row.second[-28:]}\n{second_label}, {row.distance} bits")
    if shown.empty:
        axes[0, 0].axis("off")
        axes[1, 0].axis("off")
    figure.suptitle(f"near duplicates: {len(pairs)} pair(s), the first {len(shown)} shown (top and bottom: one pair)",
                    fontsize=10)
    figure.tight_layout()
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
    figure, axes = _image_grid(len(images), columns)
    for axis, image, label in zip(axes, np.clip(images, 0, 255), labels):
        _show(axis, image, class_names[int(label)])
    figure.tight_layout()
    return figure


def plot_history(history: pd.DataFrame, title: str = "training history"):
    """Loss, accuracy, recall and ROC-AUC per epoch, training vs validation.

    A ``member`` column (from :func:`medlab.train.train_members`) gives one
    pair of lines per ensemble member in its own colour (validation dashed).
    """
    metrics = [m for m in ("loss", "accuracy", "recall", "auc") if m in history and f"val_{m}" in history]
    figure, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3), squeeze=False)
    groups = list(history.groupby("member", sort=False)) if "member" in history else [(None, history)]
    for axis, metric in zip(axes[0], metrics):
        for index, (member, table) in enumerate(groups):
            suffix = "" if member is None or len(groups) == 1 else f" (seed {member})"
            colours = ("C0", "C1") if len(groups) == 1 else (f"C{index}", f"C{index}")  # a member: one colour
            axis.plot(table.index, table[metric], marker=".", color=colours[0], label="train" + suffix)
            axis.plot(table.index, table[f"val_{metric}"], marker=".", linestyle="--", color=colours[1],
                      label="validation" + suffix)
        axis.set_title(metric, fontsize=10)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


def plot_source_sizes(dataset: Dataset):
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


# --------------------------------------------------------------------------
# Evaluation figures (lesson 06)
# --------------------------------------------------------------------------


def plot_confusion_matrices(model, threshold: float | None = None):
    """Counts and row-normalised confusion matrices on the test set (sklearn's ConfusionMatrixDisplay)."""
    from sklearn.metrics import ConfusionMatrixDisplay

    labels = model.test_labels
    if model.binary:
        predicted = (model.test_probabilities >= threshold).astype(int)
        subtitle = f"threshold {threshold:.3f} (frozen on validation)"
    else:
        predicted = model.test_probabilities.argmax(axis=1)
        subtitle = "most probable class"
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    indices = list(range(len(model.class_names)))
    for axis, normalize, title in ((axes[0], None, "counts"), (axes[1], "true", "row-normalised (recall)")):
        ConfusionMatrixDisplay.from_predictions(labels, predicted, labels=indices, display_labels=model.class_names,
                                                normalize=normalize, ax=axis, colorbar=False, cmap="Blues",
                                                values_format=".2f" if normalize else "d")
        axis.set_title(title, fontsize=10)
    figure.suptitle(f"{model.name}: test set, {subtitle}", fontsize=10)
    figure.tight_layout()
    return figure


def plot_curves(model, threshold: float | None = None):
    """ROC, precision-recall, and recall/precision against the threshold, with the operating point marked."""
    from sklearn.metrics import PrecisionRecallDisplay, RocCurveDisplay, precision_recall_curve

    labels, probabilities = model.test_labels, model.test_probabilities
    if not model.binary:  # one-vs-rest curves, one per class
        figure, axes = plt.subplots(1, 2, figsize=(10, 4))
        for index, name in enumerate(model.class_names):
            RocCurveDisplay.from_predictions(labels == index, probabilities[:, index], name=name, ax=axes[0])
            PrecisionRecallDisplay.from_predictions(labels == index, probabilities[:, index], name=name, ax=axes[1])
        axes[0].set_title("ROC (one-vs-rest)", fontsize=10)
        axes[1].set_title("precision-recall (one-vs-rest)", fontsize=10)
        figure.suptitle(f"{model.name}: test set", fontsize=10)
        figure.tight_layout()
        return figure
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    RocCurveDisplay.from_predictions(labels, probabilities, name=model.name, ax=axes[0], plot_chance_level=True)
    PrecisionRecallDisplay.from_predictions(labels, probabilities, name=model.name, ax=axes[1],
                                            plot_chance_level=True)
    precision, recall, thresholds = precision_recall_curve(labels, probabilities)
    axes[2].plot(thresholds, recall[:-1], label="recall (sensitivity)")
    axes[2].plot(thresholds, precision[:-1], label="precision")
    if threshold is not None:
        predicted = probabilities >= threshold
        tpr = predicted[labels == 1].mean()
        fpr = predicted[labels == 0].mean()
        hits = predicted[labels == 1].sum()
        ppv = hits / max(predicted.sum(), 1)
        axes[0].plot(fpr, tpr, "o", color="crimson", label=f"operating point ({threshold:.3f})")
        axes[1].plot(tpr, ppv, "o", color="crimson", label="operating point")
        axes[2].axvline(threshold, color="crimson", linestyle="--", label="frozen threshold")
        axes[0].legend(fontsize=8, loc="lower right")
        axes[1].legend(fontsize=8, loc="lower left")
    axes[2].set_xlabel("threshold")
    axes[2].set_title("recall and precision against the threshold", fontsize=10)
    axes[2].legend(fontsize=8)
    axes[2].grid(alpha=0.3)
    figure.suptitle(f"{model.name}: test set", fontsize=10)
    figure.tight_layout()
    return figure


def plot_reliability(models, bins: int = 10):
    """Reliability diagram of every model on the test set (sklearn's CalibrationDisplay).

    Binary: the probability of disease against how often disease is present.
    Multi-class: top-label, the confidence of the predicted class against how
    often that prediction is right (what the multi-class ECE summarises).
    """
    from sklearn.calibration import CalibrationDisplay

    figure, axis = plt.subplots(figsize=(5, 5))
    for model in models:
        if model.binary:
            outcome, confidence = model.test_labels, model.test_probabilities
        else:
            outcome = model.test_probabilities.argmax(axis=1) == model.test_labels
            confidence = model.test_probabilities.max(axis=1)
        CalibrationDisplay.from_predictions(outcome, confidence, n_bins=bins, name=model.name, ax=axis)
    binary = all(model.binary for model in models)
    axis.set_title("reliability on the test set" + ("" if binary else " (top-label: confidence vs correct)"),
                   fontsize=10)
    figure.tight_layout()
    return figure


def gallery_indices(labels: np.ndarray, predicted: np.ndarray, per_group: int = 8, seed: int = 0,
                    class_names: list[str] | None = None) -> dict:
    """Indices of up to ``per_group`` images per group, drawn at random (seeded).

    Binary: true positives, false negatives and false positives. With more
    than two ``class_names``: for each true class, images classified
    correctly (``"glioma: correct"``) and images taken for another class
    (``"glioma: confused"``).
    """
    rng = np.random.default_rng(seed)
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    if class_names is not None and len(class_names) > 2:
        groups = {}
        for index, name in enumerate(class_names):
            groups[f"{name}: correct"] = (labels == index) & (predicted == index)
            groups[f"{name}: confused"] = (labels == index) & (predicted != index)
    else:
        labels, predicted = labels.astype(bool), predicted.astype(bool)
        groups = {"true positive": labels & predicted, "false negative": labels & ~predicted,
                  "false positive": ~labels & predicted}
    chosen = {}
    for name, members in groups.items():
        candidates = np.nonzero(members)[0]
        chosen[name] = np.sort(rng.choice(candidates, size=min(per_group, len(candidates)), replace=False))
    return chosen


def gallery_titles(groups: dict, predicted: np.ndarray, class_names: list[str]) -> list[str]:
    """One title per image of :func:`gallery_indices`' groups; a confused image also names the class it was given."""
    return [f"{name.removesuffix(': confused')} as {class_names[predicted[index]]}" if name.endswith(": confused")
            else name for name, indices in groups.items() for index in indices]


def plot_error_gallery(split: Split, labels: np.ndarray, probabilities: np.ndarray, predicted: np.ndarray,
                       class_names: list[str], per_group: int = 8, seed: int = 0):
    """Test images the model got wrong: false negatives and false positives (or any error, multi-class)."""
    if probabilities.ndim == 1:
        groups = gallery_indices(labels, predicted, per_group, seed)
        groups.pop("true positive")
        score = probabilities
    else:
        wrong = np.nonzero(np.asarray(predicted) != np.asarray(labels))[0]
        rng = np.random.default_rng(seed)
        groups = {"misclassified": np.sort(rng.choice(wrong, size=min(2 * per_group, len(wrong)), replace=False))}
        score = probabilities.max(axis=1)
    rows = max(1, len(groups))
    figure, axes = plt.subplots(rows, per_group * (1 if probabilities.ndim == 1 else 2),
                                figsize=(1.7 * per_group * (1 if probabilities.ndim == 1 else 2), 2.0 * rows),
                                squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for row, (name, indices) in enumerate(groups.items()):
        axes[row, 0].set_title(name, fontsize=9, loc="left")
        for column, index in enumerate(indices):
            title = (f"p={score[index]:.2f}" if probabilities.ndim == 1 else
                     f"{class_names[labels[index]]}->{class_names[predicted[index]]}")
            _show(axes[row, column], split.images[index], title if column else f"{name}\n{title}")
        if len(indices) == 0:
            axes[row, 0].text(0, 0.5, f"no {name}s", fontsize=9)
    figure.tight_layout()
    return figure


def plot_gradcam_gallery(images: np.ndarray, heatmaps: np.ndarray, titles: list[str], columns: int = 8):
    """Each image with its Grad-CAM heatmap overlaid (jet colour map, half transparent)."""
    figure, axes = _image_grid(len(images), columns)
    for axis, image, heatmap, title in zip(axes, images, heatmaps, titles):
        _show(axis, image, title)
        axis.imshow(heatmap, cmap="jet", alpha=0.4, vmin=0, vmax=1)
    figure.tight_layout()
    return figure


def plot_tflite_comparison(table: pd.DataFrame):
    """File size per variant (bars), and latency against ROC-AUC with marker area by size."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    table = table.astype({"size_kb": float, "latency_ms": float, "roc_auc": float})
    sizes_kb = table["size_kb"]
    bars = left.bar(table.index, sizes_kb, color=["#888"] + ["#4c72b0"] * (len(table) - 1))
    left.bar_label(bars, labels=[f"{v:,.0f}" for v in sizes_kb], fontsize=8)
    left.set_ylabel("file size (KiB)")
    left.set_title("model size", fontsize=10)
    left.tick_params(axis="x", rotation=20)
    area = 40 + 400 * sizes_kb / sizes_kb.max()
    right.scatter(table["latency_ms"], table["roc_auc"], s=area, alpha=0.6)
    for name, row in table.iterrows():
        right.annotate(name, (row["latency_ms"], row["roc_auc"]), fontsize=8, xytext=(4, 4),
                       textcoords="offset points")
    right.set_xlabel("median single-image latency (ms, this CPU)")
    right.set_ylabel("test ROC-AUC")
    right.set_title("latency and accuracy (marker area: size)", fontsize=10)
    right.grid(alpha=0.3)
    figure.tight_layout()
    return figure


__all__ = [
    "SPLITS", "save_figure", "describe_figure", "show_alt_text", "synthetic_banner", "plot_class_counts", "plot_sample_grid",
    "plot_intensity_histograms", "plot_mean_images", "plot_augmentation_grid", "plot_image_batch",
    "plot_history", "plot_source_sizes", "plot_near_duplicate_pairs", "plot_confusion_matrices", "plot_curves",
    "plot_reliability",
    "gallery_indices", "plot_error_gallery", "plot_gradcam_gallery", "plot_tflite_comparison",
]


show_alt_text()  # figures shown in a Jupyter kernel carry alternative text (a no-op elsewhere)
