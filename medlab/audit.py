"""Data audit: exact and near-duplicate images within and across splits.

Duplicates matter twice over in medical imaging. Within the training split
they over-weight some patients; across splits they leak: a test image that
also sits in the training set measures memory, not generalisation.

- **Exact** copies share a content hash (the decoded pixels for array data,
  the file bytes for folder data): :func:`find_duplicates`.
- **Near** duplicates are the same picture re-encoded, resized or shifted by
  a few pixels: their bytes differ but their perceptual hash (``imagehash``'s
  pHash: the signs of the 8 x 8 lowest frequencies of a 32 x 32 DCT, 64 bits)
  differs in at most :data:`NEAR_DUPLICATE_DISTANCE` bits:
  :func:`find_near_duplicates`. Pairs that are exact copies are not repeated.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pandas as pd

from medlab.data import SPLITS, Dataset


def find_duplicates(dataset: Dataset) -> pd.DataFrame:
    """One row per group of identical images that appears more than once.

    Columns: ``scope`` ("within train", "train / val", ...), ``copies``,
    ``members`` (ids of every copy), ``labels`` (class of every copy) and
    ``label_conflict`` (the copies disagree on the class: a labelling error).
    """
    members = defaultdict(list)
    for split in SPLITS:
        part = dataset.splits[split]
        for image_id, content_hash, label in zip(part.ids, part.hashes, part.labels):
            members[content_hash].append((split, image_id, int(label)))
    rows = []
    for content_hash, copies in members.items():
        if len(copies) < 2:
            continue
        splits = sorted({split for split, _, _ in copies}, key=SPLITS.index)
        labels = [dataset.info.class_names[label] for _, _, label in copies]
        rows.append({
            "scope": f"within {splits[0]}" if len(splits) == 1 else " / ".join(splits),
            "copies": len(copies),
            "members": ", ".join(image_id for _, image_id, _ in copies),
            "labels": ", ".join(labels),
            "label_conflict": len(set(labels)) > 1,
            "hash": content_hash[:16],
        })
    columns = ["scope", "copies", "members", "labels", "label_conflict", "hash"]
    table = pd.DataFrame(rows, columns=columns)
    return table.sort_values(["scope", "members"], ignore_index=True)


def patients_across_splits(dataset: Dataset) -> pd.DataFrame:
    """Patients whose images sit in more than one of the given splits (ids from DICOM headers or file names).

    One row per patient: ``splits`` ("train / test") and ``images``. Empty when
    the source names no patients, or when every patient stays in one split.
    """
    where = defaultdict(lambda: defaultdict(int))
    for split in SPLITS:
        for patient in dataset.splits[split].patients or []:
            if patient:
                where[patient][split] += 1
    rows = [{"patient": patient, "splits": " / ".join(sorted(counts, key=SPLITS.index)),
             "images": sum(counts.values())} for patient, counts in where.items() if len(counts) > 1]
    return pd.DataFrame(rows, columns=["patient", "splits", "images"]).sort_values("patient", ignore_index=True)


def duplicate_summary(duplicates: pd.DataFrame) -> pd.DataFrame:
    """Counts per scope: duplicate groups, images involved, groups with conflicting labels."""
    if duplicates.empty:
        return pd.DataFrame(columns=["groups", "images", "label_conflicts"]).rename_axis("scope")
    return duplicates.groupby("scope").agg(
        groups=("copies", "size"), images=("copies", "sum"), label_conflicts=("label_conflict", "sum")
    )


# Hamming distance (bits of 64) up to which two pHashes count as the same picture. JPEG re-encoding and
# resizing change a pHash by 0-2 bits, a 1 px shift of a 128 px image by 2-4 (2 px: 6). Brain MRI slices
# of different patients look alike at this scale: on the brain MRI set (64 px), pairs at distance 0, 2, 4,
# 6 and 8 carried different labels (so were surely different pictures) in 0%, 0.1%, 1.5%, 10% and 27% of
# cases; 8 bits flagged 14,221 pairs, most of them distinct images. 4 keeps near duplicates near.
NEAR_DUPLICATE_DISTANCE = 4


def perceptual_hashes(images: np.ndarray) -> np.ndarray:
    """64-bit pHash of each image (uint8, N x H x W x C) as uint64, computed by ``imagehash``."""
    import imagehash
    from PIL import Image

    hashes = np.empty(len(images), dtype=np.uint64)
    for index, image in enumerate(images):
        picture = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        bits = imagehash.phash(picture).hash.flatten()
        hashes[index] = np.packbits(bits).view(">u8")[0]
    return hashes


def find_near_duplicates(dataset: Dataset, max_distance: int = NEAR_DUPLICATE_DISTANCE) -> pd.DataFrame:
    """Pairs of images whose pHashes differ in at most ``max_distance`` bits but that are not exact copies.

    Columns: ``scope`` ("within train", "train / test", ...), ``first``,
    ``second`` (ids), ``distance`` (bits), ``labels`` and ``label_conflict``.
    """
    ids, splits, labels, content, hashes = [], [], [], [], []
    for split in SPLITS:
        part = dataset.splits[split]
        ids += part.ids
        splits += [split] * len(part)
        labels += [dataset.info.class_names[label] for label in part.labels]
        content += part.hashes
        hashes.append(perceptual_hashes(part.images))
    hashes = np.concatenate(hashes)
    rows = []
    for start in range(0, len(hashes), 1024):  # all pairs, a block of rows at a time
        block = hashes[start:start + 1024]
        distances = np.bitwise_count(block[:, None] ^ hashes[None, :])
        for row, column in zip(*np.nonzero(distances <= max_distance)):
            first, second = start + row, column
            if second <= first or content[first] == content[second]:
                continue
            scope = sorted({splits[first], splits[second]}, key=SPLITS.index)
            rows.append({
                "scope": f"within {scope[0]}" if len(scope) == 1 else " / ".join(scope),
                "first": ids[first], "second": ids[second], "distance": int(distances[row, column]),
                "labels": f"{labels[first]}, {labels[second]}", "label_conflict": labels[first] != labels[second],
            })
    columns = ["scope", "first", "second", "distance", "labels", "label_conflict"]
    return pd.DataFrame(rows, columns=columns).sort_values(["scope", "distance", "first"], ignore_index=True)


def near_duplicate_summary(pairs: pd.DataFrame) -> pd.DataFrame:
    """Counts per scope: near-duplicate pairs, pairs with conflicting labels."""
    if pairs.empty:
        return pd.DataFrame(columns=["pairs", "label_conflicts"]).rename_axis("scope")
    return pairs.groupby("scope").agg(pairs=("distance", "size"), label_conflicts=("label_conflict", "sum"))
