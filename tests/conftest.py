"""Shared fixtures: isolated data/report folders and tiny generated image trees."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_PNEUMONIAMNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "pneumoniamnist" / "pneumoniamnist.npz"


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path, monkeypatch):
    """Every test writes its caches and reports under its own temporary folder."""
    monkeypatch.setenv("MEDLAB_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MEDLAB_REPORTS_DIR", str(tmp_path / "reports"))
    return tmp_path


def write_image(path: Path, value: int, size=(20, 16), mode: str = "L", fmt: str | None = None) -> Path:
    """A flat image of brightness ``value`` with a small bright square, saved in ``mode``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.full((size[1], size[0]), value, dtype=np.uint8)
    array[2:6, 2:6] = 255
    image = Image.fromarray(array)
    if mode == "I;16":
        image = Image.fromarray(array.astype(np.uint16) * 257)
    elif mode != "L":
        image = image.convert(mode)
    image.save(path, format=fmt)
    return path


def make_tree(root: Path, splits: dict[str, str], classes: dict[str, int], per_class: int = 6,
              names: str = "img{index}.png") -> Path:
    """A class-per-folder tree: ``splits`` maps folder name to anything, ``classes`` folder name to brightness."""
    for split_folder in splits:
        for class_folder, value in classes.items():
            for index in range(per_class):
                write_image(root / split_folder / class_folder / names.format(index=index, split=split_folder),
                            value + index)
    return root


@pytest.fixture
def tiny_npz(tmp_path) -> Path:
    """A MedMNIST-layout file: 28x28 grayscale, two classes, labels shaped (N, 1)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in (("train", 40), ("val", 10), ("test", 12)):
        labels = np.arange(count) % 2
        images = rng.integers(0, 100, (count, 28, 28), dtype=np.uint8) + (labels * 100)[:, None, None].astype(np.uint8)
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = labels.reshape(-1, 1).astype(np.uint8)
    path = tmp_path / "pneumoniamnist.npz"
    np.savez(path, **arrays)
    return path
