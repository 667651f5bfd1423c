"""Carving a validation split out of training images: patients and identical images stay together."""

from __future__ import annotations

import numpy as np

from medlab.data.types import DataError, Split


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
           if patients < len(train) else "neither file names nor headers name a patient, so this split is NOT grouped by patient")
        + (f"; {copies} exact copies kept in the split of their original" if copies else "")
    )
    return train.take(np.sort(train_index)), train.take(np.sort(val_index)), note
