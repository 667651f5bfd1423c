"""Every path and project-wide default, derived in one place.

Paths follow the Cookiecutter Data Science layout: ``data/`` for inputs and
caches, ``reports/`` for everything generated, ``notebooks/`` for the lessons.
``MEDLAB_DATA_DIR`` and ``MEDLAB_REPORTS_DIR`` override the two writable
folders (the tests point them at temporary directories).
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"

DEFAULT_SEED = 42
DEFAULT_DATASET = "synthetic"
# Folder datasets have no single native size; this is what they are resized to
# unless a notebook asks for something else. 128 px keeps CPU training in minutes.
DEFAULT_FOLDER_IMAGE_SIZE = 128
DEFAULT_VALIDATION_FRACTION = 0.1


def data_dir() -> Path:
    """Where datasets, downloads and caches live (``data/`` unless overridden)."""
    return Path(os.environ.get("MEDLAB_DATA_DIR", PROJECT_ROOT / "data"))


def reports_dir() -> Path:
    """Where ``make reports`` writes its run folders (``reports/`` unless overridden)."""
    return Path(os.environ.get("MEDLAB_REPORTS_DIR", PROJECT_ROOT / "reports"))


def cache_dir() -> Path:
    """Decoded-image caches for folder datasets."""
    return data_dir() / "cache"


def synthetic_dir() -> Path:
    """Generated synthetic datasets and their manifests."""
    return data_dir() / "synthetic"


def medmnist_dir() -> Path:
    """Where ``make data`` puts official MedMNIST files."""
    return data_dir() / "medmnist"


def cpu_count() -> int:
    """CPU cores this process may use (what reports and benchmarks quote)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
