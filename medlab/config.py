"""Every path and project-wide default, derived in one place.

Paths follow the Cookiecutter Data Science layout: ``data/`` for inputs and
caches, ``reports/`` for everything generated, ``notebooks/`` for the lessons.
``MEDLAB_DATA_DIR`` and ``MEDLAB_REPORTS_DIR`` override the two writable
folders (the tests point them at temporary directories).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"

DEFAULT_SEED = 42
DEFAULT_DATASET = "synthetic"
# Folder datasets have no single native size. Unless a notebook asks for a size,
# they are resized to the largest of FOLDER_IMAGE_SIZES whose total pixel count
# (images x side^2) fits FOLDER_PIXEL_BUDGET: training time grows with pixels, and
# the budget is what trains every lesson of the 7,000-image brain MRI set at 64 px
# within a 30-minute report on 2 CPU cores (a 1,000-image set gets 128 px).
FOLDER_IMAGE_SIZES = (128, 96, 64, 48, 32)
FOLDER_PIXEL_BUDGET = 7_500 * 64 * 64
DEFAULT_VALIDATION_FRACTION = 0.1


def default_folder_image_size(images: int) -> int:
    """The side folder images are resized to by default: the largest that keeps ``images`` within budget."""
    if images < 0:
        raise ValueError(f"images must be non-negative, got {images}")
    fitting = [side for side in FOLDER_IMAGE_SIZES if images * side * side <= FOLDER_PIXEL_BUDGET]
    return max(fitting) if fitting else min(FOLDER_IMAGE_SIZES)


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


def notebooks_at_once() -> int:
    """How many notebooks ``make reports`` runs side by side: ``MEDLAB_NOTEBOOKS_AT_ONCE``, else 2 (1 on one core).

    Two at a time cut the synthetic report's wall time on 2 cores (see :mod:`medlab.execution`).
    """
    value = os.environ.get("MEDLAB_NOTEBOOKS_AT_ONCE", "")
    if not value:
        return min(2, cpu_count())
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"MEDLAB_NOTEBOOKS_AT_ONCE must be a whole number of at least 1, got {value!r}")
    return int(value)


def run_eagerly() -> bool:
    """Whether :func:`medlab.train.compile_model` asks Keras to run eagerly: ``MEDLAB_RUN_EAGERLY=1``; off by default.

    Eager Keras runs each step op by op instead of tracing a graph first. For a
    real run that is much slower; for the few batches of ``make test``'s
    notebook runs it is faster, since tracing a deep backbone's training step
    costs more than the steps: lessons 04 and 05 under nbval took 73 s instead
    of 103 s (MobileNetV2 and EfficientNetB0 at 32 px, 48 images, one epoch).
    ``tests/test_train.py`` checks that eager training ends with the traced
    graph's weights (within 1e-5). ``make test`` sets it for nbval only.
    """
    value = os.environ.get("MEDLAB_RUN_EAGERLY", "")
    if value not in ("", "0", "1"):
        raise ValueError(f"MEDLAB_RUN_EAGERLY must be 0 or 1, got {value!r}")
    return value == "1"


def cpu_flags() -> set[str] | None:
    """The instruction-set flags this CPU reports (Linux ``/proc/cpuinfo``), e.g. ``"amx_bf16"``; None if unknown."""
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None


def git_commit() -> str:
    """The project's git commit (``-dirty`` with uncommitted changes to tracked files), or "unknown"."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=PROJECT_ROOT, capture_output=True, text=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
