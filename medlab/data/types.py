"""The dataset types every source produces: :class:`Split`, :class:`DatasetInfo`, :class:`Dataset`."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from medlab import config

SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """Bad input data; the message names the offending file, folder or key."""


@dataclass
class Split:
    """One split held in memory: uint8 images (N, H, W, C), integer labels, ids.

    ``ids`` name each image (a file path relative to the dataset root, or
    ``"train[12]"`` for array data); ``hashes`` are content hashes used by the
    duplicate audit; ``masks`` are lesion masks when the source has them; ``patients``
    name each image's patient where the source says (DICOM headers, file names).
    """

    images: np.ndarray
    labels: np.ndarray
    ids: list[str]
    hashes: list[str]
    masks: np.ndarray | None = None
    patients: list[str] | None = None  # patient id per image ('' unknown): DICOM headers or file names

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
            patients=None if self.patients is None else [self.patients[i] for i in indices],
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
