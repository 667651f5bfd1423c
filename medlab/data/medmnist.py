"""MedMNIST by flag (``"pneumoniamnist"``, ``"pneumoniamnist_64"``): the file ``make data`` put in ``data/medmnist/``."""

from __future__ import annotations

from pathlib import Path

from medlab import config
from medlab.data.npz import load_npz
from medlab.data.types import DataError, Dataset
from medlab.download import parse_medmnist_name


def matches(spec: str) -> bool:
    return "/" not in spec and not Path(spec).expanduser().exists() and parse_medmnist_name(spec) is not None


def find(name: str) -> Path:
    """The downloaded file for a flag, or a :class:`DataError` that says how to get it."""
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


def load(spec: str, options) -> Dataset:
    return load_npz(find(spec), options.image_size, options.channels, options.seed, options.validation_fraction)
