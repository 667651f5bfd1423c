"""Data audit: exact-duplicate images within and across splits.

Duplicates matter twice over in medical imaging. Within the training split
they over-weight some patients; across splits they leak: a test image that
also sits in the training set measures memory, not generalisation. Images are
compared by content hash (the decoded pixels for array data, the file bytes
for folder data), so only exact copies are reported.
"""

from __future__ import annotations

from collections import defaultdict

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


def duplicate_summary(duplicates: pd.DataFrame) -> pd.DataFrame:
    """Counts per scope: duplicate groups, images involved, groups with conflicting labels."""
    if duplicates.empty:
        return pd.DataFrame(columns=["groups", "images", "label_conflicts"]).rename_axis("scope")
    return duplicates.groupby("scope").agg(
        groups=("copies", "size"), images=("copies", "sum"), label_conflicts=("label_conflict", "sum")
    )
