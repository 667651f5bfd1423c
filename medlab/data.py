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
import json
import re
import zipfile
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from medlab import config
from medlab.download import MEDMNIST, parse_medmnist_name
from medlab.npzio import file_sha256, write_npz_atomic
from medlab.synthetic import SyntheticConfig, ensure_synthetic, load_manifest

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test",
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
# (format, mode) pairs that tf.io.decode_image decodes correctly; the rest go through Pillow.
_TF_DECODABLE = {
    "PNG": {"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16", "I;16B"},
    "JPEG": {"L", "RGB"},
}
_GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}
# File names that carry a patient identifier, e.g. Kaggle's person123_bacteria_456.jpeg.
DEFAULT_PATIENT_PATTERN = r"^(person\d+|patient[_-]?\d+)"
_CACHE_VERSION = 1


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
            dataset = _load_folder(path, image_size, channels, seed, validation_fraction, on_error, progress)
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
        splits["train"], splits["val"], note = _carve_validation(
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


def _carve_validation(train: Split, fraction: float, seed: int, patient_ids: list[str] | None):
    """Move a stratified share of ``train`` to a new validation split, keeping patients together."""
    from sklearn.model_selection import StratifiedGroupKFold

    groups = patient_ids if patient_ids is not None else [str(i) for i in range(len(train))]
    smallest_class = np.bincount(train.labels).min()
    folds = min(round(1.0 / fraction), len(set(groups)), int(smallest_class))
    if folds < 2:
        raise DataError(
            f"the training split ({len(train)} images, {smallest_class} in its smallest class) is too small "
            "to carve a validation split from; add a val/ folder or more training images"
        )
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    train_index, val_index = next(splitter.split(np.zeros(len(train)), train.labels, groups))
    grouped = patient_ids is not None and len(set(patient_ids)) < len(patient_ids)
    note = (
        f"no validation split in the source: {len(val_index)} of {len(train)} training images "
        f"(about {fraction:.0%}, stratified, seed {seed}) moved to 'val'"
        + (f", grouped by patient ({len(set(patient_ids))} patients) so none is in two splits" if grouped else "")
    )
    return train.take(np.sort(train_index)), train.take(np.sort(val_index)), note


# --------------------------------------------------------------------------
# Folders of images (Kaggle layouts)
# --------------------------------------------------------------------------


@dataclass
class _FolderScan:
    root: Path
    class_names: list[str]
    files: dict[str, list[tuple[Path, int]]]  # split -> [(path, label)]
    ignored: list[str]
    notes: list[str]


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(
        entry for entry in folder.iterdir()
        if entry.is_dir() and not entry.name.startswith((".", "__"))
    )


def scan_folder(root: Path) -> _FolderScan:
    """Find splits and classes in a class-per-folder tree; check its structure."""
    root = Path(root)
    notes: list[str] = []
    # Kaggle archives often nest the tree one level deeper (chest_xray/chest_xray/...).
    while True:
        subdirs = _visible_dirs(root)
        if any(entry.name.lower() in SPLIT_ALIASES for entry in subdirs):
            break
        if len(subdirs) == 1 or any(
            entry.name.lower() == root.name.lower() for entry in subdirs
        ):
            nested = next((e for e in subdirs if e.name.lower() == root.name.lower()), subdirs[0])
            notes.append(f"descended into nested folder {nested.name}/")
            root = nested
            continue
        raise DataError(
            f"{root}: no split folders found; expected train/ and test/ (or Training/Testing, "
            f"valid/val), each with one folder per class. Found: {', '.join(e.name for e in subdirs) or 'nothing'}"
        )
    split_dirs: dict[str, Path] = {}
    for entry in subdirs:
        split = SPLIT_ALIASES.get(entry.name.lower())
        if split is None:
            notes.append(f"ignored folder {entry.name}/ (not a split name)")
            continue
        if split in split_dirs:
            raise DataError(f"{root}: both {split_dirs[split].name}/ and {entry.name}/ look like the {split} split")
        split_dirs[split] = entry
    for needed in ("train", "test"):
        if needed not in split_dirs:
            raise DataError(f"{root}: no {needed} split folder (found: {', '.join(d.name for d in split_dirs.values())})")

    raw_classes = {split: [d.name for d in _visible_dirs(folder)] for split, folder in split_dirs.items()}
    for split, names in raw_classes.items():
        if len(names) < 2:
            raise DataError(
                f"{split_dirs[split]}: split {split!r} has {len(names)} class folder(s) "
                f"({', '.join(names) or 'none'}); every split needs a folder for each of at least two classes"
            )
    class_maps = _match_class_folders(raw_classes, split_dirs, notes)
    class_names = sorted(set(class_maps["train"].values()))

    files: dict[str, list[tuple[Path, int]]] = {}
    ignored: list[str] = []
    for split, folder in split_dirs.items():
        entries = []
        for raw_name, class_name in class_maps[split].items():
            class_dir = folder / raw_name
            found = 0
            for file in sorted(class_dir.rglob("*")):
                if not file.is_file():
                    continue
                relative = str(file.relative_to(root))
                if file.name.startswith(".") or file.suffix.lower() not in IMAGE_SUFFIXES:
                    ignored.append(relative)
                    continue
                entries.append((file, class_names.index(class_name)))
                found += 1
            if found == 0:
                raise DataError(f"{class_dir}: class folder is empty (no image files)")
        files[split] = entries
    if ignored:
        shown = ", ".join(ignored[:5]) + (" ..." if len(ignored) > 5 else "")
        notes.append(f"ignored {len(ignored)} non-image file(s): {shown}")
    return _FolderScan(root, class_names, files, ignored, notes)


def _match_class_folders(raw_classes, split_dirs, notes) -> dict[str, dict[str, str]]:
    """Map each split's class folders to shared class names, or explain why they differ.

    Folder names are compared case-insensitively. The Kaggle Chest CT-Scan set
    names its train/valid folders ``adenocarcinoma_left.lower.lobe_T2_N0_M0_Ib``
    but its test folder ``adenocarcinoma``: when the part before the first
    underscore matches one-to-one across splits, that part becomes the class name.
    """
    for key, how in ((str.lower, None),
                     (lambda name: name.split("_")[0].lower(), "the part before the first '_'")):
        keyed = {split: {key(name): name for name in names} for split, names in raw_classes.items()}
        if any(len(keyed[split]) != len(names) for split, names in raw_classes.items()):
            continue  # two folders would collapse onto one class
        if all(set(keys) == set(keyed["train"]) for keys in keyed.values()):
            if how:
                notes.append(f"class folders differ between splits; matched by {how}")
            names = {k: keyed["train"][k] if how is None else k for k in keyed["train"]}
            return {split: {raw: names[k] for k, raw in keys.items()} for split, keys in keyed.items()}
    lines = [f"  {split} ({split_dirs[split].name}/): {', '.join(sorted(names))}"
             for split, names in raw_classes.items()]
    raise DataError("class folders differ between splits:\n" + "\n".join(lines))


def _header(path: Path) -> tuple[str, str, tuple[int, int]] | str:
    """(format, mode, (width, height)) from the file header, or an error message."""
    from PIL import Image, UnidentifiedImageError

    if path.stat().st_size == 0:
        return "zero-byte file"
    try:
        with Image.open(path) as image:
            return image.format or "", image.mode, image.size
    except (UnidentifiedImageError, OSError, ValueError) as error:
        return f"not a readable image ({error})"


def _pil_decode(path: bytes, channels: int) -> np.ndarray:
    """Decode any Pillow-readable image to uint8 (H, W, channels); used inside tf.data."""
    from PIL import Image

    with Image.open(path.decode()) as image:
        image.load()
        if image.mode in {"I;16", "I;16B", "I;16L", "I"}:
            array = np.asarray(image, dtype=np.float64)
            image = Image.fromarray(np.clip(np.round(array / 257.0), 0, 255).astype(np.uint8))
        elif image.mode == "F":
            array = np.asarray(image, dtype=np.float64)
            scale = 255.0 if array.max() <= 1.0 else 1.0
            image = Image.fromarray(np.clip(np.round(array * scale), 0, 255).astype(np.uint8))
        elif image.mode in {"P", "PA"}:
            image = image.convert("RGBA")
        converted = image.convert("L" if channels == 1 else "RGB")
        array = np.asarray(converted, dtype=np.uint8)
    return array.reshape(array.shape[0], array.shape[1], channels)


def decode_image_file(path, use_pillow, image_size: int, channels: int):
    """Read, decode and resize one image file to uint8 (S, S, channels): training's preprocessing.

    PNG and JPEG files in common modes use ``tf.io.decode_image``; others (CMYK,
    TIFF, BMP, GIF, WebP) go through Pillow. Shrinking uses area averaging (a box
    filter: antialiased, and twice as fast as ``antialias=True`` here),
    enlarging uses bilinear interpolation. Works eagerly and inside ``tf.data``.
    """
    import tensorflow as tf

    def with_tf():
        image = tf.io.decode_image(tf.io.read_file(path), channels=channels, expand_animations=False)
        return tf.ensure_shape(image, [None, None, channels])

    def with_pillow():
        image = tf.numpy_function(_pil_decode, [path, channels], tf.uint8)
        return tf.ensure_shape(image, [None, None, channels])

    image = tf.cond(tf.convert_to_tensor(use_pillow), with_pillow, with_tf)
    shrinking = tf.reduce_max(tf.shape(image)[:2]) > image_size
    image = tf.cond(
        shrinking,
        lambda: tf.image.resize(image, [image_size, image_size], method="area"),
        lambda: tf.image.resize(image, [image_size, image_size], method="bilinear"),
    )
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def decode_files(paths: list[Path], use_pillow: list[bool], image_size: int, channels: int,
                 progress: bool = True) -> tuple[np.ndarray, list[int]]:
    """Decode and resize images with a parallel ``tf.data`` pipeline.

    Returns the images (N, S, S, C) uint8 and the indices that failed to
    decode; each file goes through :func:`decode_image_file`.
    """
    import tensorflow as tf

    def decode(path, pillow, index):
        return decode_image_file(path, pillow, image_size, channels), index

    dataset = (
        tf.data.Dataset.from_tensor_slices(
            ([str(p) for p in paths], np.asarray(use_pillow, dtype=bool), np.arange(len(paths))))
        .map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .ignore_errors()
        .batch(256)
        .prefetch(tf.data.AUTOTUNE)
    )
    images = np.zeros((len(paths), image_size, image_size, channels), dtype=np.uint8)
    decoded = np.zeros(len(paths), dtype=bool)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(paths), desc="decoding images", unit="img", leave=False)
    for batch_images, batch_index in dataset.as_numpy_iterator():
        images[batch_index] = batch_images
        decoded[batch_index] = True
        if bar is not None:
            bar.update(len(batch_index))
    if bar is not None:
        bar.close()
    return images, [int(i) for i in np.nonzero(~decoded)[0]]


def _folder_cache_key(scan: _FolderScan, image_size: int, channels: int | None, seed: int,
                      validation_fraction: float) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([_CACHE_VERSION, str(scan.root.resolve()), image_size, channels, seed,
                              validation_fraction]).encode())
    for split in sorted(scan.files):
        for path, label in scan.files[split]:
            stat = path.stat()
            digest.update(f"{split}|{path}|{label}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def _load_folder(root: Path, image_size: int | None, channels: int | None, seed: int,
                 validation_fraction: float, on_error: str, progress: bool) -> Dataset:
    scan = scan_folder(root)
    image_size = image_size or config.DEFAULT_FOLDER_IMAGE_SIZE
    key = _folder_cache_key(scan, image_size, channels, seed, validation_fraction)
    cache_path = config.cache_dir() / f"{scan.root.name}-{key}.npz"
    if cache_path.exists():
        try:
            return _dataset_from_folder_cache(cache_path, scan, on_error)
        except (DataError, KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile):
            pass  # unreadable, half-written or inconsistent cache: rebuild it below

    # Headers: catch zero-byte and unreadable files early, learn modes and sizes.
    headers = {}
    for entries in scan.files.values():
        for path, _label in entries:
            headers[path] = _header(path)
    bad = {path: result for path, result in headers.items() if isinstance(result, str)}
    good_headers = [h for h in headers.values() if not isinstance(h, str)]
    if channels is None:
        grayscale = sum(mode in _GRAYSCALE_MODES for _format, mode, _size in good_headers)
        channels = 1 if grayscale * 2 >= len(good_headers) else 3
    modes = Counter(f"{fmt} {mode}" for fmt, mode, _size in good_headers)
    sizes = np.array([size for _fmt, _mode, size in good_headers]) if good_headers else np.zeros((0, 2))

    all_entries = [(split, path, label) for split, entries in scan.files.items()
                   for path, label in entries if path not in bad]
    use_pillow = [
        headers[path][1] not in _TF_DECODABLE.get(headers[path][0], set())
        for _split, path, _label in all_entries
    ]
    images, failed = decode_files([p for _s, p, _l in all_entries], use_pillow, image_size, channels, progress)
    for index in failed:
        bad[all_entries[index][1]] = f"could not be decoded ({_decode_error(all_entries[index][1])})"
    if bad and on_error == "raise":
        listing = "\n".join(f"  {path.relative_to(scan.root)}: {reason}" for path, reason in sorted(bad.items())[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise DataError(
            f"{len(bad)} unreadable image file(s) in {scan.root}:\n{listing}{more}\n"
            "Remove or fix them, or load with on_error='skip' to leave them out and list them."
        )
    skipped = [(str(path.relative_to(scan.root)), reason) for path, reason in sorted(bad.items())]

    arrays: dict[str, np.ndarray] = {}
    entry_splits = np.array([split for split, _path, _label in all_entries])
    entry_labels = np.array([label for _split, _path, label in all_entries], dtype=np.int64)
    entry_ids = np.array([str(path.relative_to(scan.root)) for _split, path, _label in all_entries])
    keep = np.array([path not in bad for _split, path, _label in all_entries], dtype=bool)
    for split in scan.files:
        chosen = (entry_splits == split) & keep
        if not chosen.any():
            raise DataError(f"{scan.root}: no readable images left in split {split!r}")
        arrays[f"{split}_images"] = images[chosen]
        arrays[f"{split}_labels"] = entry_labels[chosen]
        arrays[f"{split}_ids"] = entry_ids[chosen]
        arrays[f"{split}_hashes"] = np.array([file_sha256(scan.root / name) for name in entry_ids[chosen]])
    fingerprint = hashlib.sha256(
        "\n".join(sorted(f"{h}  {i}" for split in scan.files
                         for h, i in zip(arrays[f"{split}_hashes"], arrays[f"{split}_ids"]))).encode()
    ).hexdigest()
    meta = {
        "class_names": scan.class_names, "channels": channels, "image_size": image_size,
        "fingerprint": fingerprint, "notes": scan.notes, "skipped": skipped,
        "modes": dict(modes), "seed": seed, "validation_fraction": validation_fraction,
        "source_sizes": {
            "count": int(len(sizes)),
            "width": _stats(sizes[:, 0]) if len(sizes) else {},
            "height": _stats(sizes[:, 1]) if len(sizes) else {},
        },
    }
    arrays["meta"] = np.array(json.dumps(meta))
    write_npz_atomic(cache_path, arrays, compress=False)
    return _dataset_from_folder_cache(cache_path, scan, on_error)


def _stats(values: np.ndarray) -> dict[str, float]:
    return {"min": int(values.min()), "median": float(np.median(values)), "max": int(values.max())}


def _decode_error(path: Path) -> str:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
    except Exception as error:  # the message is the point here
        return str(error) or type(error).__name__
    return "TensorFlow could not decode it"


def _dataset_from_folder_cache(cache_path: Path, scan: _FolderScan, on_error: str) -> Dataset:
    with np.load(cache_path, allow_pickle=False) as archive:
        meta = json.loads(str(archive["meta"]))
        if meta["skipped"] and on_error == "raise":
            raise DataError("cached scan has skipped files but on_error='raise'")  # rebuild to report
        splits = {}
        for split in scan.files:
            splits[split] = Split(
                images=archive[f"{split}_images"], labels=archive[f"{split}_labels"],
                ids=[str(i) for i in archive[f"{split}_ids"]],
                hashes=[str(h) for h in archive[f"{split}_hashes"]],
            )
    notes = list(meta["notes"])
    if "val" not in splits:
        patients = [_patient_id(name) for name in splits["train"].ids]
        splits["train"], splits["val"], note = _carve_validation(
            splits["train"], meta["validation_fraction"], meta["seed"], patients)
        notes.append(note)
    if meta["skipped"]:
        notes.append(f"skipped {len(meta['skipped'])} unreadable file(s) (on_error='skip'); see skipped_files")
    notes.append(f"source image modes: {', '.join(f'{k} x{v}' for k, v in sorted(meta['modes'].items()))}")
    size = meta["image_size"]
    info = DatasetInfo(
        name=scan.root.name, kind="folder", source=str(scan.root), class_names=meta["class_names"],
        image_size=(size, size), channels=meta["channels"],
        licence="see the dataset's own licence (folder data)", fingerprint=meta["fingerprint"],
        notes=notes, skipped=[tuple(item) for item in meta["skipped"]],
        source_image_sizes=meta["source_sizes"],
    )
    return Dataset(info, {split: splits[split] for split in SPLITS})


def _patient_id(relative_path: str, pattern: str = DEFAULT_PATIENT_PATTERN) -> str:
    name = Path(relative_path).name
    match = re.match(pattern, name, flags=re.IGNORECASE)
    return match.group(1).lower() if match else relative_path


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
    return dataset.prefetch(tf.data.AUTOTUNE)
