"""Class-per-folder image trees (the Kaggle layouts): scan, validate, decode once, cache.

``chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}``, ``{train,valid,test}/<class>``
and ``{Training,Testing}/<class>`` all load as they are. The tree is checked
first (split and class folders, empty folders, classes that differ between
splits); every image header is read with Pillow (zero-byte and non-image
files are caught here); then a parallel ``tf.data`` pipeline decodes and
resizes every file with :func:`decode_image_file`, the same function the
prediction tools use. Files that fail are named, or skipped and listed with
``on_error="skip"``. The result is cached atomically in ``data/cache/``,
keyed by every file's path, size and modification time.
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medlab import config
from medlab.data import dicom
from medlab.data.splitting import carve_validation
from medlab.data.types import SPLITS, DataError, Dataset, DatasetInfo, Split
from medlab.npzio import file_sha256, one_writer, write_npz_atomic

SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test",
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".dcm"}  # + DICOM by content
# (format, mode) pairs that tf.io.decode_image decodes correctly; the rest go through Pillow.
TF_DECODABLE = {
    "PNG": {"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16", "I;16B"},
    "JPEG": {"L", "RGB"},
}
_GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}
# File names that carry a patient identifier, e.g. Kaggle's person123_bacteria_456.jpeg.
DEFAULT_PATIENT_PATTERN = r"^(person\d+|patient[_-]?\d+)"
_CACHE_VERSION = 3  # 2: grayscale pictures saved as RGB are read as one channel; 3: DICOM patient ids


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
    notes: list[str] = []
    root, subdirs = _descend_to_splits(Path(root), notes)
    split_dirs = _split_folders(root, subdirs, notes)
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
        files[split] = []
        for raw_name, class_name in class_maps[split].items():
            images = _class_images(root, folder / raw_name, ignored)
            files[split] += [(file, class_names.index(class_name)) for file in images]
    if ignored:
        shown = ", ".join(ignored[:5]) + (" ..." if len(ignored) > 5 else "")
        notes.append(f"ignored {len(ignored)} non-image file(s): {shown}")
    return _FolderScan(root, class_names, files, ignored, notes)


def _descend_to_splits(root: Path, notes: list[str]) -> tuple[Path, list[Path]]:
    """Kaggle archives often nest the tree one level deeper (chest_xray/chest_xray/...): go down to the splits."""
    while True:
        subdirs = _visible_dirs(root)
        if any(entry.name.lower() in SPLIT_ALIASES for entry in subdirs):
            return root, subdirs
        if len(subdirs) == 1 or any(entry.name.lower() == root.name.lower() for entry in subdirs):
            root = next((e for e in subdirs if e.name.lower() == root.name.lower()), subdirs[0])
            notes.append(f"descended into nested folder {root.name}/")
            continue
        raise DataError(
            f"{root}: no split folders found; expected train/ and test/ (or Training/Testing, "
            f"valid/val), each with one folder per class. Found: {', '.join(e.name for e in subdirs) or 'nothing'}"
        )


def _split_folders(root: Path, subdirs: list[Path], notes: list[str]) -> dict[str, Path]:
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
    return split_dirs


def _class_images(root: Path, class_dir: Path, ignored: list[str]) -> list[Path]:
    """The image files under one class folder; the rest (hidden, other suffixes) go to ``ignored``."""
    images = []
    for file in sorted(class_dir.rglob("*")):
        if not file.is_file():
            continue
        hidden = any(part.startswith(".") for part in file.relative_to(class_dir).parts)
        if hidden or (file.suffix.lower() not in IMAGE_SUFFIXES and not dicom.is_dicom(file)):
            ignored.append(str(file.relative_to(root)))  # hidden files and folders (.ipynb_checkpoints/) never count
            continue
        images.append(file)
    if not images:
        raise DataError(f"{class_dir}: class folder is empty (no image files)")
    return images


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


def read_header(path: Path) -> tuple[str, str, tuple[int, int]] | str:
    """(format, mode, (width, height)) from the file header, or an error message."""
    from PIL import Image, UnidentifiedImageError

    if path.stat().st_size == 0:
        return "zero-byte file"
    if dicom.is_dicom(path):
        return dicom.read_header(path)
    try:
        with Image.open(path) as image:
            return image.format or "", image.mode, image.size
    except (UnidentifiedImageError, OSError, ValueError) as error:
        return f"not a readable image ({error})"


def _pil_decode(path: bytes, channels: int) -> np.ndarray:
    """Decode any Pillow-readable image (or DICOM file) to uint8 (H, W, channels); used inside tf.data."""
    from PIL import Image

    path = path if isinstance(path, (bytes, str)) else np.asarray(path).item()  # graph: bytes, eager: an array
    path = path.decode() if isinstance(path, bytes) else path
    channels = int(channels)
    if dicom.is_dicom(Path(path)):
        return dicom.pixels(path, channels)
    with Image.open(path) as image:
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


def decode_image_file(path, use_pillow: bool, image_size: int, channels: int):
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

    image = with_pillow() if use_pillow else with_tf()  # a Python bool: only that branch enters a traced graph
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
    decode; each file goes through :func:`decode_image_file`. Files TensorFlow
    decodes and files Pillow decodes go through separate pipelines: Pillow runs
    in a ``numpy_function``, a stateful op, and with op determinism on (lessons
    call ``set_determinism``) TensorFlow runs any map holding one serially,
    printing an "E0000 ... NodeDef mentions attribute use_unbounded_threadpool"
    line as it rewrites it. Kept apart, the TensorFlow files decode in parallel.
    """
    images = np.zeros((len(paths), image_size, image_size, channels), dtype=np.uint8)
    decoded = np.zeros(len(paths), dtype=bool)
    bar = None
    if progress:
        # text bars (tqdm.auto warns "IProgress not found" in Jupyter without ipywidgets)
        from tqdm import tqdm

        bar = tqdm(total=len(paths), desc="decoding images", unit="img", leave=False)
    for pillow in (False, True):
        indices = np.array([index for index, flag in enumerate(use_pillow) if bool(flag) == pillow], dtype=np.int64)
        if len(indices) == 0:
            continue
        dataset = _decode_dataset([str(paths[index]) for index in indices], indices, pillow, image_size, channels)
        for batch_images, batch_index in dataset.as_numpy_iterator():
            images[batch_index] = batch_images
            decoded[batch_index] = True
            if bar is not None:
                bar.update(len(batch_index))
    if bar is not None:
        bar.close()
    return images, [int(i) for i in np.nonzero(~decoded)[0]]


def _decode_dataset(paths: list[str], indices: np.ndarray, pillow: bool, image_size: int, channels: int):
    """Batches of (images, their indices) for files that all decode with Pillow, or all with TensorFlow."""
    import tensorflow as tf

    def decode(path, index):
        return decode_image_file(path, pillow, image_size, channels), index

    dataset = tf.data.Dataset.from_tensor_slices((paths, indices))
    if pillow:  # one file at a time: under op determinism TensorFlow would make this map serial anyway
        dataset = dataset.map(decode)
    else:
        dataset = dataset.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return (
        dataset
        .ignore_errors()
        .batch(256)
        .prefetch(tf.data.AUTOTUNE)
    )


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


GREY_CHANNEL_DIFFERENCE = 16  # largest |R-G|, |G-B| (0-255) of a colour file that holds a grayscale picture
GREY_SAMPLE = 64  # colour files decoded (small) to estimate how many of them are grayscale pictures


def _choose_channels(headers: dict, notes: list[str]) -> int:
    """1 when most images are grayscale, counting colour files whose three channels are equal; else 3.

    Kaggle sets often store grayscale scans as RGB JPEGs (the brain MRI set: 3,926 of its 7,019
    files); reading those as one channel gives the same pixels at a third of the memory and of
    the augmentation work. A few colour files are decoded at low resolution to check.
    """
    modes = {path: header[1] for path, header in headers.items() if not isinstance(header, str)}
    grayscale = sum(mode in _GRAYSCALE_MODES for mode in modes.values())
    colour = sorted(path for path, mode in modes.items() if mode not in _GRAYSCALE_MODES)
    if grayscale * 2 >= len(modes) or not colour:
        return 1
    sample = colour[:: max(1, len(colour) // GREY_SAMPLE)][:GREY_SAMPLE]
    grey_share = float(np.mean([_is_grey_picture(path) for path in sample]))
    if (grayscale + grey_share * len(colour)) * 2 < len(modes):
        return 3
    notes.append(f"{len(colour)} colour files, of which {grey_share:.0%} of a sample of {len(sample)} hold a "
                 f"grayscale picture (channels differ by at most {GREY_CHANNEL_DIFFERENCE} of 255): "
                 "every image is read as one grayscale channel")
    return 1


def _is_grey_picture(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.draft("RGB", (64, 64))  # JPEG: decode at reduced size, fast
            pixels = np.asarray(image.convert("RGB").resize((64, 64)), dtype=np.int16)
    except (OSError, ValueError):
        return False
    return int(np.abs(np.diff(pixels, axis=-1)).max()) <= GREY_CHANNEL_DIFFERENCE


def load_folder(root: Path, image_size: int | None, channels: int | None, seed: int,
                validation_fraction: float, on_error: str, progress: bool) -> Dataset:
    """Scan the tree, then read it from the cache, or read headers, decode, check and write the cache."""
    scan = scan_folder(root)
    image_size = image_size or config.default_folder_image_size(sum(len(e) for e in scan.files.values()))
    key = _folder_cache_key(scan, image_size, channels, seed, validation_fraction)
    cache_path = config.cache_dir() / f"{scan.root.name}-{key}.npz"
    with one_writer(cache_path, progress):  # lessons started together decode the tree once; the others wait
        if cache_path.exists():
            try:
                return _dataset_from_folder_cache(cache_path, scan, on_error)
            except (DataError, KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile):
                pass  # unreadable, half-written or inconsistent cache: rebuild it below
        _write_folder_cache(scan, cache_path, image_size, channels, seed, validation_fraction, on_error, progress)
    return _dataset_from_folder_cache(cache_path, scan, on_error)


def _write_folder_cache(scan: _FolderScan, cache_path: Path, image_size: int, channels: int | None, seed: int,
                        validation_fraction: float, on_error: str, progress: bool) -> None:
    """Read headers, decode, check, and write the tree's arrays and description to ``cache_path``."""
    # Headers first: they catch zero-byte and unreadable files early and give modes and sizes.
    headers = {path: read_header(path) for entries in scan.files.values() for path, _label in entries}
    bad = {path: result for path, result in headers.items() if isinstance(result, str)}
    notes = list(scan.notes)
    if channels is None:
        channels = _choose_channels(headers, notes)
    entries = [(split, path, label) for split, split_entries in scan.files.items()
               for path, label in split_entries if path not in bad]
    use_pillow = [headers[path][1] not in TF_DECODABLE.get(headers[path][0], set()) for _s, path, _l in entries]
    images, failed = decode_files([path for _s, path, _l in entries], use_pillow, image_size, channels, progress)
    for index in failed:
        bad[entries[index][1]] = f"could not be decoded ({decode_error(entries[index][1])})"
    if bad and on_error == "raise":
        _refuse_bad_files(scan.root, bad)
    arrays = _split_arrays(scan, entries, images, bad)
    good_headers = [h for h in headers.values() if not isinstance(h, str)]
    sizes = np.array([size for _fmt, _mode, size in good_headers]) if good_headers else np.zeros((0, 2))
    meta = {
        "class_names": scan.class_names, "channels": channels, "image_size": image_size,
        "fingerprint": _fingerprint(arrays, scan.files), "notes": notes,
        "skipped": [(str(path.relative_to(scan.root)), reason) for path, reason in sorted(bad.items())],
        "modes": dict(Counter(f"{fmt} {mode}" for fmt, mode, _size in good_headers)),
        "seed": seed, "validation_fraction": validation_fraction,
        "source_sizes": {
            "count": int(len(sizes)),
            "width": _stats(sizes[:, 0]) if len(sizes) else {},
            "height": _stats(sizes[:, 1]) if len(sizes) else {},
        },
    }
    arrays["meta"] = np.array(json.dumps(meta))
    write_npz_atomic(cache_path, arrays, compress=False)


def _refuse_bad_files(root: Path, bad: dict[Path, str]) -> None:
    listing = "\n".join(f"  {path.relative_to(root)}: {reason}" for path, reason in sorted(bad.items())[:20])
    more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
    raise DataError(
        f"{len(bad)} unreadable image file(s) in {root}:\n{listing}{more}\n"
        "Remove or fix them, or leave them out and list them: the notebook parameter skip_bad_files = True, "
        "`medlab info|audit PATH --skip-bad-files`, or load_dataset(..., on_error='skip')."
    )


def _split_arrays(scan: _FolderScan, entries: list, images: np.ndarray, bad: dict) -> dict[str, np.ndarray]:
    """Images, labels, ids and file hashes of each split, without the bad files: what the cache holds."""
    arrays: dict[str, np.ndarray] = {}
    entry_splits = np.array([split for split, _path, _label in entries])
    entry_labels = np.array([label for _split, _path, label in entries], dtype=np.int64)
    entry_ids = np.array([str(path.relative_to(scan.root)) for _split, path, _label in entries])
    keep = np.array([path not in bad for _split, path, _label in entries], dtype=bool)
    for split in scan.files:
        chosen = (entry_splits == split) & keep
        if not chosen.any():
            raise DataError(f"{scan.root}: no readable images left in split {split!r}")
        arrays[f"{split}_images"] = images[chosen]
        arrays[f"{split}_labels"] = entry_labels[chosen]
        arrays[f"{split}_ids"] = entry_ids[chosen]
        arrays[f"{split}_hashes"] = np.array([file_sha256(scan.root / name) for name in entry_ids[chosen]])
        # DICOM files name their patient in the header; other files may carry one in their name.
        arrays[f"{split}_patients"] = np.array([
            dicom.patient_id(scan.root / name) if dicom.is_dicom(scan.root / name) else ""
            for name in entry_ids[chosen]])
    return arrays


def _fingerprint(arrays: dict[str, np.ndarray], splits) -> str:
    """sha256 of the sorted (file hash, path) lines: the same files give the same fingerprint."""
    lines = sorted(f"{h}  {i}" for split in splits for h, i in zip(arrays[f"{split}_hashes"], arrays[f"{split}_ids"]))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _stats(values: np.ndarray) -> dict[str, float]:
    return {"min": int(values.min()), "median": float(np.median(values)), "max": int(values.max())}


def decode_error(path: Path) -> str:
    """Why a file that passed the header check could not be decoded, in one line (for error messages)."""
    from PIL import Image

    if dicom.is_dicom(path):
        try:
            dicom.pixels(path, 1)
        except Exception as error:  # the message is the point here
            return f"{type(error).__name__}: {' '.join(str(error).split())[:240]}"  # one line, plugin details kept

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
            ids = [str(i) for i in archive[f"{split}_ids"]]
            splits[split] = Split(
                images=archive[f"{split}_images"], labels=archive[f"{split}_labels"], ids=ids,
                hashes=[str(h) for h in archive[f"{split}_hashes"]],
                patients=[str(header_id) or _patient_id(name)
                          for header_id, name in zip(archive[f"{split}_patients"], ids)],
            )
    notes = list(meta["notes"])
    if "val" not in splits:
        patients = [patient or name for patient, name in zip(splits["train"].patients, splits["train"].ids)]
        splits["train"], splits["val"], note = carve_validation(
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
    """The patient id a file name carries (``person123_...``), or '' when it carries none."""
    name = Path(relative_path).name
    match = re.match(pattern, name, flags=re.IGNORECASE)
    return match.group(1).lower() if match else ""


def matches(spec: str) -> bool:
    return Path(spec).expanduser().is_dir()


def load(spec: str, options) -> Dataset:
    return load_folder(Path(spec).expanduser(), options.image_size, options.channels, options.seed,
                       options.validation_fraction, options.on_error, options.progress)
