"""``load_dataset``: one entry point that hands a dataset name or path to the first source that takes it.

A source is a module with ``matches(spec) -> bool`` and ``load(spec, options) -> Dataset``.
Adding one is a new module in :mod:`medlab.data` plus one line in :data:`SOURCES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medlab import config
from medlab.data import folder, medmnist, npz, synthetic
from medlab.data.types import DataError, Dataset

# Tried in order: the first whose ``matches`` accepts the spec loads it.
SOURCES = {
    "synthetic": synthetic,  # "synthetic", "synthetic-4class"
    "folder": folder,  # a class-per-folder image tree
    "npz": npz,  # a MedMNIST-style .npz file by path
    "medmnist": medmnist,  # a MedMNIST flag, looked up in data/medmnist/
}


@dataclass(frozen=True)
class LoadOptions:
    """What every source is asked for (see :func:`load_dataset`)."""

    image_size: int | None
    channels: int | None
    seed: int
    validation_fraction: float
    on_error: str
    progress: bool


def load_dataset(
    spec: str | Path = config.DEFAULT_DATASET,
    image_size: int | None = None,
    channels: int | None = None,
    seed: int = config.DEFAULT_SEED,
    validation_fraction: float = config.DEFAULT_VALIDATION_FRACTION,
    on_error: str = "raise",
    max_images_per_split: int = 0,
    progress: bool = True,
) -> Dataset:
    """Load a dataset by name or path (see :mod:`medlab.data`).

    Args:
        spec: ``"synthetic"``, ``"synthetic-4class"``, a MedMNIST flag, or a path
            to an ``.npz`` file or an image folder.
        image_size: square side in pixels; ``None`` or 0 keeps the native size
            (64 for synthetic data); folders get 128, 96 or 64 px by their image
            count (:func:`medlab.config.default_folder_image_size`).
        channels: 1 (grayscale) or 3 (RGB); ``None`` keeps what the source has
            (for folders: grayscale when most images are).
        seed: seeds the validation carve-out and any subsampling.
        validation_fraction: share of training images moved to ``val`` when the
            source has no validation split (grouped by patient when file names
            carry one, so no patient is in two splits).
        on_error: ``"raise"`` stops at unreadable images, naming them;
            ``"skip"`` leaves them out and lists them in ``info.skipped``.
        max_images_per_split: keep a stratified subset per split (0 = all).
        progress: show progress bars for long work.
    """
    if on_error not in {"raise", "skip"}:
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if channels not in {None, 1, 3}:
        raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")
    if not 0.0 < validation_fraction < 0.5:
        raise ValueError(f"validation_fraction must be in (0, 0.5), got {validation_fraction}")
    options = LoadOptions(int(image_size) if image_size else None, channels, seed, validation_fraction,
                          on_error, progress)
    text = str(spec)
    source = next((source for source in SOURCES.values() if source.matches(text)), None)
    if source is None:
        if Path(text).expanduser().exists():
            raise DataError(f"{text}: not an .npz file or an image folder")
        raise DataError(
            f"dataset {text!r} not found: expected 'synthetic', 'synthetic-4class', a MedMNIST "
            "flag (e.g. 'pneumoniamnist', fetched by `make data`), or an existing .npz file or image folder"
        )
    return source.load(text, options).subsample(max_images_per_split, seed)
