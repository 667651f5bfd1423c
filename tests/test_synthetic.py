import json
import threading
import time

import numpy as np
import pytest

from medlab import synthetic
from medlab.npzio import file_sha256
from medlab.synthetic import (
    SyntheticConfig,
    ensure_synthetic,
    generate,
    generate_split,
    load_manifest,
)

SMALL = dict(image_size=32, counts=(40, 12, 12))


def test_same_seed_same_bytes_different_seed_different():
    first = generate(SyntheticConfig(**SMALL, seed=1))
    second = generate(SyntheticConfig(**SMALL, seed=1))
    other = generate(SyntheticConfig(**SMALL, seed=2))
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
    assert not np.array_equal(first["train_images"], other["train_images"])


def test_cached_file_is_byte_identical_across_folders(tmp_path):
    cfg = SyntheticConfig(**SMALL)
    one = ensure_synthetic(cfg, tmp_path / "a", progress=False)
    two = ensure_synthetic(cfg, tmp_path / "b", progress=False)
    assert file_sha256(one) == file_sha256(two)
    manifest = load_manifest(one)
    assert manifest["synthetic"] is True and manifest["sha256"] == file_sha256(one)
    assert manifest["class_counts"]["train"] == [16, 24]  # 40% normal / 60% pneumonia


def test_two_processes_asking_at_once_generate_once(tmp_path, monkeypatch):
    # make reports starts lessons 03 and 04 together on a fresh clone: both ask for the dataset at once.
    calls = []

    def slow_generate(cfg, progress=False):
        calls.append(cfg.name)
        time.sleep(0.3)  # both are inside ensure_synthetic before either has written
        return generate(cfg, progress)

    monkeypatch.setattr(synthetic, "generate", slow_generate)
    cfg = SyntheticConfig(**SMALL)
    paths, errors = [], []

    def ask():
        try:
            paths.append(ensure_synthetic(cfg, tmp_path, progress=False))
        except Exception as error:  # noqa: BLE001 - collected for the assertion below
            errors.append(error)

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(calls) == 1
    assert paths[0] == paths[1]
    assert json.loads(paths[0].with_suffix(".json").read_text())["sha256"] == file_sha256(paths[0])


def test_a_prepared_set_in_a_read_only_folder_is_used(tmp_path, monkeypatch):
    # a course's shared data folder: the lock file beside the set cannot be created there
    from medlab import npzio

    cfg = SyntheticConfig(**SMALL)
    path = ensure_synthetic(cfg, tmp_path, progress=False)
    (tmp_path / f".{path.name}.lock").unlink()

    def read_only(lock_path):
        raise PermissionError(f"[Errno 13] Permission denied: {lock_path}")

    monkeypatch.setattr(npzio, "_open_lock", read_only)
    monkeypatch.setattr(synthetic, "generate", lambda *a, **k: pytest.fail("the prepared set was generated again"))
    assert ensure_synthetic(cfg, tmp_path, progress=False) == path


def test_exact_class_counts_and_masks_only_for_lesions():
    cfg = SyntheticConfig(task="four_class", image_size=32, counts=(41, 8, 8))
    images, labels, masks = generate_split(cfg, "train")
    assert images.shape == (41, 32, 32, 1) and images.dtype == np.uint8
    assert sorted(np.bincount(labels)) == [10, 10, 10, 11]
    has_lesion = masks.reshape(len(masks), -1).any(axis=1)
    np.testing.assert_array_equal(has_lesion, labels != 0)


def test_lesions_are_brighter_than_surrounding_lung():
    cfg = SyntheticConfig(image_size=64, counts=(60, 4, 4), difficulty=0.0)
    images, labels, masks = generate_split(cfg, "train")
    inside = [images[i, ..., 0][masks[i]].mean() for i in np.nonzero(labels == 1)[0]]
    normal_mean = images[labels == 0].mean()
    assert np.mean(inside) > normal_mean  # opacities add density


def test_corrupt_cache_is_regenerated_not_trusted(tmp_path):
    cfg = SyntheticConfig(**SMALL)
    path = ensure_synthetic(cfg, tmp_path, progress=False)
    good = file_sha256(path)
    path.write_bytes(path.read_bytes()[:100])  # an interrupted write
    assert ensure_synthetic(cfg, tmp_path, progress=False) == path
    assert file_sha256(path) == good
    assert json.loads(path.with_suffix(".json").read_text())["sha256"] == good


@pytest.mark.parametrize("kwargs", [
    {"task": "three_class"}, {"image_size": 8}, {"counts": (10, 0, 5)}, {"difficulty": 1.5},
    {"class_fractions": (1.0,)},
])
def test_bad_configuration_is_rejected(kwargs):
    with pytest.raises(ValueError):
        SyntheticConfig(**kwargs)
