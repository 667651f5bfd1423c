"""Benchmarks that print figures (``make bench``), not timed unit tests.

``data``: for a PNG folder of generated images (5,000 by default), the
images/s of

- the synthetic generator itself;
- a per-file ``PIL.Image.open`` -> resize -> ``numpy`` loop, the way many
  tutorials load data (the baseline);
- medlab's folder pipeline on its first pass (scan, parallel ``tf.data``
  decode and resize, hashing, cache write);
- a training epoch over the cached split through ``make_tf_dataset``,

and the ratios against the baseline, all measured in the same run.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from medlab.synthetic import SyntheticConfig, generate_split


def write_png_folder(root: Path, count: int, source_size: int, seed: int = 0) -> float:
    """Write ``count`` synthetic PNGs as a train/test class-per-folder tree; return images/s generated."""
    from PIL import Image

    train = int(count * 0.8)
    generated = 0.0
    for split, number in (("train", train), ("test", count - train)):
        cfg = SyntheticConfig(image_size=source_size, counts=(number, 1, 1), seed=seed)
        started = time.perf_counter()
        images, labels, _masks = generate_split(cfg, "train")
        generated += time.perf_counter() - started
        for index, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / cfg.class_names[label].upper()
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[..., 0]).save(folder / f"person{index // 3}_{split}_{index}.png")
    return count / generated


def tutorial_loop(root: Path, image_size: int) -> tuple[np.ndarray, float]:
    """The baseline: open, convert, resize and stack every file in a Python loop."""
    from PIL import Image

    started = time.perf_counter()
    arrays = []
    for path in sorted(root.rglob("*.png")):
        with Image.open(path) as image:
            arrays.append(np.asarray(image.convert("L").resize((image_size, image_size), Image.BILINEAR)))
    stacked = np.stack(arrays)
    return stacked, len(arrays) / (time.perf_counter() - started)


def data_benchmark(count: int = 5000, source_size: int = 128, image_size: int = 64,
                   batch_size: int = 64) -> dict:
    from medlab.data import load_dataset, make_tf_dataset

    previous_data_dir = os.environ.get("MEDLAB_DATA_DIR")
    with tempfile.TemporaryDirectory(prefix="medlab-bench-") as temporary:
        root = Path(temporary) / "bench_folder"
        os.environ["MEDLAB_DATA_DIR"] = str(Path(temporary) / "data")  # a cold cache, thrown away after
        generator_rate = write_png_folder(root, count, source_size)
        import tensorflow  # noqa: F401  (its one-off import, ~5 s, is not charged to the pipeline)
        _baseline, baseline_rate = tutorial_loop(root, image_size)

        started = time.perf_counter()
        dataset = load_dataset(root, image_size=image_size, progress=False)
        first_pass_rate = count / (time.perf_counter() - started)

        started = time.perf_counter()
        load_dataset(root, image_size=image_size, progress=False)
        reload_rate = count / (time.perf_counter() - started)

        pipeline = make_tf_dataset(dataset.train, dataset.info.num_classes, batch_size=batch_size, shuffle=True)
        for _ in pipeline.take(1):  # build the pipeline once
            pass
        started = time.perf_counter()
        seen = sum(int(images.shape[0]) for images, _labels in pipeline)
        epoch_rate = seen / (time.perf_counter() - started)
    if previous_data_dir is None:
        os.environ.pop("MEDLAB_DATA_DIR", None)
    else:
        os.environ["MEDLAB_DATA_DIR"] = previous_data_dir
    return {
        "images": count,
        "source_size": source_size,
        "image_size": image_size,
        "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "synthetic_generator_images_per_s": round(generator_rate, 1),
        "tutorial_loop_images_per_s": round(baseline_rate, 1),
        "medlab_first_pass_images_per_s": round(first_pass_rate, 1),
        "medlab_reload_from_cache_images_per_s": round(reload_rate, 1),
        "medlab_cached_epoch_images_per_s": round(epoch_rate, 1),
        "first_pass_vs_loop": round(first_pass_rate / baseline_rate, 3),
        "cached_epoch_vs_loop": round(epoch_rate / baseline_rate, 3),
    }


def print_table(results: dict) -> None:
    width = max(map(len, results))
    for key, value in results.items():
        print(f"{key:<{width}}  {value}")
