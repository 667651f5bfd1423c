"""Datasets from every source the course uses, behind one description.

``load_dataset(spec)`` accepts

- ``"synthetic"`` / ``"synthetic-4class"``: the built-in generator (the offline default);
- a MedMNIST flag such as ``"pneumoniamnist"`` or ``"pneumoniamnist_64"``, looked up
  in ``data/medmnist/`` (``make data`` puts it there);
- a path to a MedMNIST-style ``.npz`` file (any 2D single-label flag and size);
- a path to a class-per-folder image tree in the Kaggle layouts, e.g.
  ``chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}``, ``{train,valid,test}/<class>``
  or ``{Training,Testing}/<class>``.

Whatever the source, the result is a :class:`Dataset`: a :class:`DatasetInfo`
(class names, task, image size, channels, source, licence, sha256 fingerprint,
notes) and ``train``/``val``/``test`` :class:`Split` objects holding uint8 pixels
in memory. Folder images are decoded once, in parallel, by a ``tf.data``
pipeline and cached on disk, so later runs start in seconds.

Images stay in [0, 255]. Scaling and normalisation belong to each model
(a ``Normalization`` layer or the backbone's ``preprocess_input``), so an
exported model takes raw pixels and cannot be fed the wrong scale.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from medlab import config
from medlab.download import MEDMNIST, parse_medmnist_name
from medlab.npzio import file_sha256
from medlab.synthetic import SyntheticConfig, ensure_synthetic, load_manifest

SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """Bad input data; the message names the offending file, folder or key."""


@dataclass
class Split:
    """One split held in memory: uint8 images (N, H, W, C), integer labels, ids.

    ``ids`` name each image (a file path relative to the dataset root, or
    ``"train[12]"`` for array data); ``hashes`` are content hashes used by the
    duplicate audit; ``masks`` are lesion masks when the source has them.
    """

    images: np.ndarray
    labels: np.ndarray
    ids: list[str]
    hashes: list[str]
    masks: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices: np.ndarray) -> Split:
        indices = np.asarray(indices)
        return Split(
            images=self.images[indices],
            labels=self.labels[indices],
            ids=[self.ids[i] for i in indices],
            hashes=[self.hashes[i] for i in indices],
            masks=None if self.masks is None else self.masks[indices],
        )


@dataclass
class DatasetInfo:
    """Everything a report needs to say about where the data came from."""

    name: str
    kind: str  # "synthetic", "npz" or "folder"
    source: str
    class_names: list[str]
    image_size: tuple[int, int]
    channels: int
    licence: str
    fingerprint: str  # sha256 of the file, or of the sorted file hashes for a folder
    synthetic: bool = False
    notes: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    # Folder data only: the source images' width/height statistics before resizing.
    source_image_sizes: dict | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def task(self) -> str:
        """``"binary"`` (one sigmoid output) or ``"multiclass"`` (softmax)."""
        return "binary" if self.num_classes == 2 else "multiclass"


@dataclass
class Dataset:
    info: DatasetInfo
    splits: dict[str, Split]

    @property
    def train(self) -> Split:
        return self.splits["train"]

    @property
    def val(self) -> Split:
        return self.splits["val"]

    @property
    def test(self) -> Split:
        return self.splits["test"]

    def counts(self):
        """A pandas table of image counts: one row per split, one column per class."""
        import pandas as pd

        table = pd.DataFrame(
            {
                split: np.bincount(self.splits[split].labels, minlength=self.info.num_classes)
                for split in SPLITS
            },
            index=self.info.class_names,
        ).T
        table["total"] = table.sum(axis=1)
        return table

    def class_weights(self) -> dict[int, float]:
        """Keras ``class_weight`` from training counts: n_samples / (n_classes * count)."""
        counts = np.bincount(self.train.labels, minlength=self.info.num_classes)
        total = counts.sum()
        return {
            index: float(total / (self.info.num_classes * count)) if count else 0.0
            for index, count in enumerate(counts)
        }

    def describe(self) -> dict:
        """A JSON-ready summary for reports and ``metrics.json``."""
        info = self.info
        return {
            "name": info.name,
            "kind": info.kind,
            "source": info.source,
            "source_image_sizes": info.source_image_sizes,
            "synthetic": info.synthetic,
            "task": info.task,
            "class_names": info.class_names,
            "image_size": list(info.image_size),
            "channels": info.channels,
            "licence": info.licence,
            "sha256": info.fingerprint,
            "counts": {
                split: dict(zip(info.class_names, map(int, np.bincount(
                    self.splits[split].labels, minlength=info.num_classes))))
                for split in SPLITS
            },
            "notes": info.notes,
            "skipped_files": [{"file": name, "reason": reason} for name, reason in info.skipped],
        }

    def subsample(self, max_per_split: int, seed: int = config.DEFAULT_SEED) -> Dataset:
        """A stratified random subset of at most ``max_per_split`` images per split (0 = all)."""
        if max_per_split <= 0:
            return self
        from sklearn.model_selection import train_test_split

        splits = {}
        for name, split in self.splits.items():
            if len(split) <= max_per_split:
                splits[name] = split
                continue
            counts = np.bincount(split.labels)
            stratify = split.labels if counts[counts > 0].min() >= 2 else None
            keep, _ = train_test_split(
                np.arange(len(split)), train_size=max_per_split, stratify=stratify,
                random_state=seed,
            )
            splits[name] = split.take(np.sort(keep))
        notes = self.info.notes + [f"subsampled to at most {max_per_split} images per split"]
        return Dataset(replace(self.info, notes=notes), splits)


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------


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
    """Load a dataset by name or path (see the module docstring).

    Args:
        spec: ``"synthetic"``, ``"synthetic-4class"``, a MedMNIST flag, or a path
            to an ``.npz`` file or an image folder.
        image_size: square side in pixels; ``None`` or 0 keeps the native size
            (64 for synthetic data) and resizes folder images to 128.
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
    image_size = int(image_size) if image_size else None
    text = str(spec)
    if text.startswith("synthetic"):
        task = {"synthetic": "binary", "synthetic-binary": "binary",
                "synthetic-4class": "four_class", "synthetic-four_class": "four_class"}.get(text)
        if task is None:
            raise ValueError(f"unknown synthetic dataset {text!r}; use 'synthetic' or 'synthetic-4class'")
        cfg = SyntheticConfig(task=task, image_size=image_size or 64, seed=seed)
        path = ensure_synthetic(cfg, progress=progress)
        dataset = _load_npz(path, None, channels, seed, validation_fraction)
    else:
        path = Path(text).expanduser()
        if not path.exists() and parse_medmnist_name(text) and "/" not in text:
            path = _find_medmnist(text)
        if path.is_dir():
            from medlab.folders import load_folder

            dataset = load_folder(path, image_size, channels, seed, validation_fraction, on_error, progress)
        elif path.suffix == ".npz" and path.is_file():
            dataset = _load_npz(path, image_size, channels, seed, validation_fraction)
        elif not path.exists():
            raise DataError(
                f"dataset {text!r} not found: expected 'synthetic', 'synthetic-4class', a MedMNIST "
                "flag (e.g. 'pneumoniamnist', fetched by `make data`), or an existing .npz file or image folder"
            )
        else:
            raise DataError(f"{path}: not an .npz file or an image folder")
    return dataset.subsample(max_images_per_split, seed)


def _find_medmnist(name: str) -> Path:
    flag, size = parse_medmnist_name(name)
    file_name = f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"
    candidates = [config.medmnist_dir() / file_name, config.data_dir() / file_name]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise DataError(
        f"{file_name} is not in {candidates[0].parent}. Run `make data MEDMNIST={name}` to download it "
        f"(needs internet), put a copy at {candidates[0]}, or pass the file's path as the dataset."
    )


# --------------------------------------------------------------------------
# Arrays (.npz, synthetic)
# --------------------------------------------------------------------------


def _pixel_hashes(images: np.ndarray) -> list[str]:
    return [hashlib.blake2b(image.tobytes(), digest_size=16).hexdigest() for image in images]


def _as_uint8_images(images: np.ndarray, key: str, path: Path) -> np.ndarray:
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(
            f"{path}: key {key!r} has shape {images.shape}; expected (N, H, W), (N, H, W, 1) or (N, H, W, 3)"
        )
    if images.dtype == np.uint8:
        return images
    if np.issubdtype(images.dtype, np.floating) and images.size and images.max() <= 1.0:
        return np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)
    if np.issubdtype(images.dtype, np.integer) and images.size and images.min() >= 0:
        if images.max() <= 255:
            return images.astype(np.uint8)
        return np.round(images / 257.0).clip(0, 255).astype(np.uint8)  # 16-bit -> 8-bit
    raise DataError(f"{path}: key {key!r} has dtype {images.dtype} with values outside [0, 255]")


def _load_npz(path: Path, image_size: int | None, channels: int | None, seed: int,
              validation_fraction: float) -> Dataset:
    try:
        archive = np.load(path, allow_pickle=False)
        keys = set(archive.files)
    except Exception as error:  # zipfile, pickle and OS errors all mean the same here
        raise DataError(f"{path}: not a readable .npz file ({error})") from None
    required = ["train_images", "train_labels", "test_images", "test_labels"]
    missing = [key for key in required if key not in keys]
    if missing:
        raise DataError(
            f"{path}: missing key(s) {', '.join(missing)}; a MedMNIST-style file has "
            f"train/val/test _images and _labels (found: {', '.join(sorted(keys)) or 'nothing'})"
        )
    has_val = "val_images" in keys or "val_labels" in keys
    if has_val and not {"val_images", "val_labels"} <= keys:
        raise DataError(f"{path}: has only one of val_images / val_labels")

    manifest = load_manifest(path)
    parsed = parse_medmnist_name(path.name)
    registry = MEDMNIST.get(parsed[0]) if parsed else None
    splits: dict[str, Split] = {}
    max_label = -1
    for split in SPLITS if has_val else ("train", "test"):
        images = _as_uint8_images(archive[f"{split}_images"], f"{split}_images", path)
        labels = np.asarray(archive[f"{split}_labels"])
        if labels.ndim == 2 and labels.shape[1] > 1:
            raise DataError(
                f"{path}: key '{split}_labels' has shape {labels.shape}: multi-label data "
                "(e.g. ChestMNIST) is not supported; medlab needs one class per image"
            )
        labels = labels.reshape(-1)
        if len(labels) != len(images):
            raise DataError(
                f"{path}: '{split}_images' has {len(images)} images but '{split}_labels' has {len(labels)} labels"
            )
        if len(labels) == 0:
            raise DataError(f"{path}: split {split!r} is empty")
        if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
            raise DataError(f"{path}: '{split}_labels' must hold non-negative integers")
        labels = labels.astype(np.int64)
        max_label = max(max_label, int(labels.max()))
        masks_key = f"{split}_masks"
        masks = np.asarray(archive[masks_key]) if masks_key in keys else None
        splits[split] = Split(
            images=images, labels=labels, ids=[f"{split}[{i}]" for i in range(len(labels))],
            hashes=_pixel_hashes(images), masks=masks,
        )
    if "class_names" in keys:
        class_names = [str(name) for name in archive["class_names"]]
    elif registry is not None:
        class_names = list(registry.class_names)
    else:
        class_names = [f"class_{index}" for index in range(max_label + 1)]
    if max_label >= len(class_names):
        raise DataError(f"{path}: label {max_label} found but only {len(class_names)} class names")
    shapes = {split.images.shape[1:] for split in splits.values()}
    if len(shapes) != 1:
        raise DataError(f"{path}: splits have different image shapes {sorted(shapes)}")
    height, width, native_channels = shapes.pop()

    notes: list[str] = []
    if not has_val:
        splits["train"], splits["val"], note = carve_validation(
            splits["train"], validation_fraction, seed, None)
        notes.append(note)
    if manifest is not None:
        kind, licence, name = "synthetic", manifest["licence"], manifest["name"]
        notes.append("SYNTHETIC DATA: generated phantoms, not real patients")
    else:
        kind = "npz"
        licence = registry.licence if registry else "unknown (see the file's source)"
        name = path.stem
        if registry is not None:
            notes.append(f"MedMNIST {registry.flag}; class names from MedMNIST's published labels")
    dataset = Dataset(
        DatasetInfo(
            name=name, kind=kind, source=str(path), class_names=class_names,
            image_size=(height, width), channels=native_channels, licence=licence,
            fingerprint=file_sha256(path), synthetic=manifest is not None, notes=notes,
        ),
        {split: splits[split] for split in SPLITS},
    )
    return _convert(dataset, image_size, channels)


def _convert(dataset: Dataset, image_size: int | None, channels: int | None) -> Dataset:
    """Resize (antialiased bilinear) and convert channels, in place of a copy."""
    info = dataset.info
    target_channels = channels or info.channels
    target_size = (image_size, image_size) if image_size else info.image_size
    if target_size == tuple(info.image_size) and target_channels == info.channels:
        return dataset
    import tensorflow as tf

    splits = {}
    for name, split in dataset.splits.items():
        converted = []
        for start in range(0, len(split), 1024):
            batch = tf.convert_to_tensor(split.images[start:start + 1024])
            if target_channels == 3 and info.channels == 1:
                batch = tf.image.grayscale_to_rgb(batch)
            elif target_channels == 1 and info.channels == 3:
                batch = tf.image.rgb_to_grayscale(batch)
            if target_size != tuple(info.image_size):
                batch = tf.image.resize(batch, target_size, antialias=True)
            converted.append(tf.cast(tf.clip_by_value(tf.round(batch), 0, 255), tf.uint8).numpy())
        masks = split.masks
        if masks is not None and target_size != tuple(info.image_size):
            masks = tf.image.resize(masks[..., None].astype(np.float32), target_size).numpy()[..., 0] > 0.5
        splits[name] = replace(split, images=np.concatenate(converted), masks=masks)
    notes = info.notes + [
        f"converted from {info.image_size[0]}x{info.image_size[1]}x{info.channels} "
        f"to {target_size[0]}x{target_size[1]}x{target_channels}"
    ]
    return Dataset(replace(info, image_size=target_size, channels=target_channels, notes=notes), splits)


def carve_groups(train: Split, patient_ids: list[str] | None = None) -> np.ndarray:
    """Group numbers for carving validation: images of one patient, and identical images, share a group.

    Identical images (same content hash) in two splits would let the
    validation score reward memorisation, so they are kept together like a
    patient's images; groups that share a patient or a copy are merged.
    """
    parent = list(range(len(train)))

    def root(index: int) -> int:
        while parent[index] != index:
            parent[index] = parent[parent[index]]
            index = parent[index]
        return index

    for keys in (patient_ids, train.hashes):
        first: dict[str, int] = {}
        for index, key in enumerate(keys or []):
            if not key:
                continue
            if key in first:
                parent[root(index)] = root(first[key])
            else:
                first[key] = index
    return np.array([root(index) for index in range(len(train))])


def carve_validation(train: Split, fraction: float, seed: int, patient_ids: list[str] | None = None):
    """Move a stratified share of ``train`` to a new validation split, keeping patients and copies together.

    ``patient_ids`` (one per image, or ``None`` when file names carry none)
    and identical images are grouped by :func:`carve_groups`. Returns
    ``(train, val, note)``; the note says how the split was grouped.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    groups = carve_groups(train, patient_ids)
    smallest_class = np.bincount(train.labels).min()
    folds = min(round(1.0 / fraction), len(set(groups)), int(smallest_class))
    if folds < 2:
        raise DataError(
            f"the training split ({len(train)} images, {smallest_class} in its smallest class) is too small "
            "to carve a validation split from; add a val/ folder or more training images"
        )
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    train_index, val_index = next(splitter.split(np.zeros(len(train)), train.labels, groups))
    patients = len(set(patient_ids)) if patient_ids is not None else len(train)
    copies = len(train) - len(set(h for h in train.hashes if h)) - sum(1 for h in train.hashes if not h)
    note = (
        f"no validation split in the source: {len(val_index)} of {len(train)} training images "
        f"(about {fraction:.0%}, stratified, seed {seed}) moved to 'val'; "
        + (f"grouped by patient ({patients} patients) so none is in two splits"
           if patients < len(train) else "file names carry no patient id, so this split is NOT grouped by patient")
        + (f"; {copies} exact copies kept in the split of their original" if copies else "")
    )
    return train.take(np.sort(train_index)), train.take(np.sort(val_index)), note


# --------------------------------------------------------------------------
# tf.data pipelines for training
# --------------------------------------------------------------------------


def make_tf_dataset(split: Split, num_classes: int, batch_size: int = 32, shuffle: bool = False,
                    seed: int = config.DEFAULT_SEED, augmentation=None):
    """A ``tf.data`` pipeline over an in-memory split: shuffle, batch, augment, prefetch.

    Yields ``(images float32 in [0, 255], labels)``. Labels are float32 0/1 for
    two classes (one sigmoid output) and one-hot float32 rows otherwise
    (softmax output), which is what the Keras precision, recall and AUC
    metrics expect. ``augmentation`` is a Keras layer (see :mod:`medlab.augment`)
    applied to training batches only; shuffling is seeded so a rerun sees the
    same order.
    """
    import tensorflow as tf

    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if num_classes == 2:
        labels = split.labels.astype(np.float32)
    else:
        labels = np.eye(num_classes, dtype=np.float32)[split.labels]
    dataset = tf.data.Dataset.from_tensor_slices((split.images, labels))
    if shuffle:
        dataset = dataset.shuffle(len(split), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size).map(lambda x, y: (tf.cast(x, tf.float32), y))
    if augmentation is not None:
        dataset = dataset.map(lambda x, y: (augmentation(x, training=True), y))
    # One thread per op inside the pipeline: on a 2-core CPU, augmentation ops that each used every core
    # fought the training step for them and made some epochs twice as long (medlab bench speed).
    options = tf.data.Options()
    options.threading.max_intra_op_parallelism = 1
    return dataset.prefetch(tf.data.AUTOTUNE).with_options(options)
