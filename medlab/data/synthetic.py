"""The built-in synthetic phantoms (the offline default): generated once, cached, loaded as ``.npz``."""

from __future__ import annotations

from medlab.data.npz import load_npz
from medlab.data.types import Dataset
from medlab.synthetic import SyntheticConfig, ensure_synthetic

NAMES = {"synthetic": "binary", "synthetic-binary": "binary",
         "synthetic-4class": "four_class", "synthetic-four_class": "four_class"}


def matches(spec: str) -> bool:
    return spec.startswith("synthetic")


def load(spec: str, options) -> Dataset:
    task = NAMES.get(spec)
    if task is None:
        raise ValueError(f"unknown synthetic dataset {spec!r}; use 'synthetic' or 'synthetic-4class'")
    cfg = SyntheticConfig(task=task, image_size=options.image_size or 64, seed=options.seed)
    path = ensure_synthetic(cfg, progress=options.progress)
    return load_npz(path, None, options.channels, options.seed, options.validation_fraction)
