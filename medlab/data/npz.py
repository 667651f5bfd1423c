"""MedMNIST-style ``.npz`` files: ``{train,val,test}_images`` and ``_labels`` (``val`` optional)."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np

from medlab.data.splitting import carve_validation
from medlab.data.types import SPLITS, DataError, Dataset, DatasetInfo, Split
from medlab.download import MEDMNIST, parse_medmnist_name
from medlab.npzio import file_sha256
from medlab.synthetic import load_manifest


def pixel_hashes(images: np.ndarray) -> list[str]:
    return [hashlib.blake2b(image.tobytes(), digest_size=16).hexdigest() for image in images]


def as_uint8_images(images: np.ndarray, key: str, path: Path) -> np.ndarray:
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


def load_npz(path: Path, image_size: int | None, channels: int | None, seed: int,
             validation_fraction: float) -> Dataset:
    """Open, check, read each split, name the classes, carve validation if missing, convert."""
    archive, keys = _open_npz(path)
    has_val = _check_keys(path, keys)
    splits = {split: _read_split(archive, keys, split, path) for split in (SPLITS if has_val else ("train", "test"))}
    parsed = parse_medmnist_name(path.name)
    registry = MEDMNIST.get(parsed[0]) if parsed else None
    class_names = _class_names(archive, keys, registry, splits, path)
    shapes = {split.images.shape[1:] for split in splits.values()}
    if len(shapes) != 1:
        raise DataError(f"{path}: splits have different image shapes {sorted(shapes)}")
    height, width, native_channels = shapes.pop()
    notes: list[str] = []
    if not has_val:
        splits["train"], splits["val"], note = carve_validation(splits["train"], validation_fraction, seed, None)
        notes.append(note)
    manifest = load_manifest(path)
    if manifest is not None:
        kind, licence, name = "synthetic", manifest["licence"], manifest["name"]
        notes.append("SYNTHETIC DATA: generated phantoms, not real patients")
    else:
        kind, name = "npz", path.stem
        licence = registry.licence if registry else "unknown (see the file's source)"
        if registry is not None:
            notes.append(f"MedMNIST {registry.flag}; class names from MedMNIST's published labels")
    info = DatasetInfo(name=name, kind=kind, source=str(path), class_names=class_names,
                       image_size=(height, width), channels=native_channels, licence=licence,
                       fingerprint=file_sha256(path), synthetic=manifest is not None, notes=notes)
    return convert(Dataset(info, {split: splits[split] for split in SPLITS}), image_size, channels)


def _open_npz(path: Path):
    try:
        archive = np.load(path, allow_pickle=False)
        return archive, set(archive.files)
    except Exception as error:  # zipfile, pickle and OS errors all mean the same here
        raise DataError(f"{path}: not a readable .npz file ({error})") from None


def _check_keys(path: Path, keys: set[str]) -> bool:
    """Refuse a file without train/test images and labels; return whether it has a val split."""
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
    return has_val


def _read_split(archive, keys: set[str], split: str, path: Path) -> Split:
    images = as_uint8_images(archive[f"{split}_images"], f"{split}_images", path)
    labels = np.asarray(archive[f"{split}_labels"])
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise DataError(
            f"{path}: key '{split}_labels' has shape {labels.shape}: multi-label data "
            "(e.g. ChestMNIST) is not supported; medlab needs one class per image"
        )
    labels = labels.reshape(-1)
    if len(labels) != len(images):
        raise DataError(f"{path}: '{split}_images' has {len(images)} images but '{split}_labels' has {len(labels)} labels")
    if len(labels) == 0:
        raise DataError(f"{path}: split {split!r} is empty")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise DataError(f"{path}: '{split}_labels' must hold non-negative integers")
    masks = np.asarray(archive[f"{split}_masks"]) if f"{split}_masks" in keys else None
    return Split(images=images, labels=labels.astype(np.int64), ids=[f"{split}[{i}]" for i in range(len(labels))],
                 hashes=pixel_hashes(images), masks=masks)


def _class_names(archive, keys: set[str], registry, splits: dict[str, Split], path: Path) -> list[str]:
    """The file's ``class_names``, else MedMNIST's published labels, else ``class_0``, ``class_1`` ..."""
    max_label = max(int(split.labels.max()) for split in splits.values())
    if "class_names" in keys:
        class_names = [str(name) for name in archive["class_names"]]
    elif registry is not None:
        class_names = list(registry.class_names)
    else:
        class_names = [f"class_{index}" for index in range(max_label + 1)]
    if max_label >= len(class_names):
        raise DataError(f"{path}: label {max_label} found but only {len(class_names)} class names")
    return class_names


def convert(dataset: Dataset, image_size: int | None, channels: int | None) -> Dataset:
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


def matches(spec: str) -> bool:
    path = Path(spec).expanduser()
    return path.suffix == ".npz" and path.is_file()


def load(spec: str, options) -> Dataset:
    return load_npz(Path(spec).expanduser(), options.image_size, options.channels, options.seed,
                    options.validation_fraction)
