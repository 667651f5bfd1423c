"""Folder datasets in the Kaggle layouts, and every kind of bad input they come with."""

import io
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import make_tree, write_image
from PIL import Image

from medlab.data import DataError, load_dataset
from medlab.data import folder as folders

CHEST = {"NORMAL": 40, "PNEUMONIA": 160}


def test_kaggle_chest_xray_layout_with_nested_folder(tmp_path):
    root = make_tree(tmp_path / "chest_xray" / "chest_xray", {"train": 0, "val": 0, "test": 0}, CHEST)
    (tmp_path / "chest_xray" / "__MACOSX").mkdir()
    dataset = load_dataset(tmp_path / "chest_xray", image_size=24, progress=False)
    assert dataset.info.class_names == ["NORMAL", "PNEUMONIA"]
    assert dataset.train.images.shape == (12, 24, 24, 1)  # grayscale sources stay one channel
    assert dataset.info.kind == "folder"
    assert any("nested" in note for note in dataset.info.notes)
    assert root.exists()


def test_folder_without_val_is_split_by_patient(tmp_path):
    root = tmp_path / "xray"
    for label, (name, value) in enumerate(CHEST.items()):
        for patient in range(12):
            for view in range(3):
                write_image(root / "train" / name / f"person{patient + 100 * label}_virus_{view}.jpeg",
                            value + view + 3 * patient, fmt="JPEG")  # no two images identical
        for index in range(3):
            write_image(root / "test" / name / f"person{900 + index}_x.jpeg", value, fmt="JPEG")
    dataset = load_dataset(root, image_size=16, validation_fraction=0.25, progress=False)
    patients = lambda split: {path.split("/")[-1].split("_")[0] for path in split.ids}  # noqa: E731
    assert len(dataset.val) > 0
    assert not patients(dataset.train) & patients(dataset.val)
    assert set(dataset.val.labels) == {0, 1}
    assert any("grouped by patient" in note for note in dataset.info.notes)


def test_brain_mri_layout_training_testing(tmp_path):
    classes = {"glioma": 30, "meningioma": 80, "notumor": 130, "pituitary": 180}
    make_tree(tmp_path / "mri", {"Training": 0, "Testing": 0}, classes, per_class=10)
    dataset = load_dataset(tmp_path / "mri", image_size=16, progress=False)
    assert dataset.info.num_classes == 4 and dataset.info.task == "multiclass"
    assert len(dataset.val) > 0 and len(dataset.test) == 40


def test_hidden_checkpoint_folder_inside_a_class_is_skipped_and_listed(tmp_path):
    classes = {"glioma": 30, "meningioma": 80, "notumor": 130, "pituitary": 180}
    root = make_tree(tmp_path / "mri", {"Training": 0, "Testing": 0}, classes, per_class=10)
    write_image(root / "Testing" / "meningioma" / ".ipynb_checkpoints" / "Te-me_0011-checkpoint.jpg", 90, fmt="JPEG")
    dataset = load_dataset(root, image_size=16, progress=False)
    assert len(dataset.test) == 40 and not any("checkpoint" in name for name in dataset.test.ids)
    assert any(".ipynb_checkpoints/Te-me_0011-checkpoint.jpg" in note for note in dataset.info.notes)


def test_carved_validation_keeps_identical_images_together_and_says_it_is_not_patient_grouped(tmp_path):
    root = tmp_path / "mri"
    rng = np.random.default_rng(0)
    for name in ("glioma", "notumor"):
        for index in range(30):
            array = rng.integers(0, 255, (12, 12), dtype=np.uint8)
            for copy in range(3 if index < 10 else 1):  # ten images with two exact copies each
                folder = root / "Training" / name
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(folder / f"{name}_{index}_{copy}.png")
        make_tree(root, {"Testing": 0}, {name: 50}, per_class=3)
    dataset = load_dataset(root, image_size=12, validation_fraction=0.25, progress=False)
    assert len(dataset.val) > 0
    assert not set(dataset.train.hashes) & set(dataset.val.hashes)  # no copy straddles train and val
    note = next(note for note in dataset.info.notes if "moved to 'val'" in note)
    assert "NOT grouped by patient" in note and "40 exact copies" in note


def test_chest_ct_layout_with_differently_named_test_folders(tmp_path):
    root = tmp_path / "ct"
    long_names = {"adenocarcinoma_left.lower.lobe_T2_N0_M0_Ib": 30, "normal": 200}
    make_tree(root, {"train": 0, "valid": 0}, long_names, per_class=4)
    make_tree(root, {"test": 0}, {"adenocarcinoma": 30, "normal": 200}, per_class=4)
    dataset = load_dataset(root, image_size=16, progress=False)
    assert dataset.info.class_names == ["adenocarcinoma", "normal"]
    assert len(dataset.val) == 8


def test_class_folders_that_really_differ_are_refused(tmp_path):
    make_tree(tmp_path / "d", {"train": 0}, {"cat": 10, "dog": 200}, per_class=2)
    make_tree(tmp_path / "d", {"test": 0}, {"cat": 10, "bird": 200}, per_class=2)
    with pytest.raises(DataError, match="class folders differ between splits"):
        load_dataset(tmp_path / "d", progress=False)


def test_split_with_only_one_class_is_refused(tmp_path):
    make_tree(tmp_path / "d", {"train": 0}, CHEST, per_class=2)
    make_tree(tmp_path / "d", {"test": 0}, {"NORMAL": 10}, per_class=2)
    with pytest.raises(DataError, match=r"split 'test' has 1 class folder"):
        load_dataset(tmp_path / "d", progress=False)


def test_empty_class_folder_is_named(tmp_path):
    make_tree(tmp_path / "d", {"train": 0, "test": 0}, CHEST, per_class=2)
    for file in (tmp_path / "d" / "test" / "NORMAL").iterdir():
        file.unlink()
    with pytest.raises(DataError, match=r"test/NORMAL: class folder is empty"):
        load_dataset(tmp_path / "d", progress=False)


def test_non_image_files_are_ignored_and_reported(tmp_path):
    root = make_tree(tmp_path / "d", {"train": 0, "test": 0}, CHEST, per_class=10)
    (root / "train" / "NORMAL" / ".DS_Store").write_bytes(b"\x00\x01")
    (root / "train" / "PNEUMONIA" / "readme.txt").write_text("notes")
    dataset = load_dataset(root, image_size=16, progress=False)
    assert len(dataset.train) + len(dataset.val) == 20
    assert any("ignored 2 non-image file(s)" in note for note in dataset.info.notes)


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "zero-byte", "fake-extension"])
def test_unreadable_images_are_named_or_skipped(tmp_path, damage):
    root = make_tree(tmp_path / "d", {"train": 0, "test": 0}, CHEST, per_class=4)
    victim = root / "train" / "PNEUMONIA" / "img1.png"
    if damage == "corrupt":
        victim.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    elif damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:60])
    elif damage == "zero-byte":
        victim.write_bytes(b"")
    else:
        victim.write_text("this is text with an image extension")
    with pytest.raises(DataError, match=r"train/PNEUMONIA/img1.png"):
        load_dataset(root, image_size=16, progress=False)
    dataset = load_dataset(root, image_size=16, on_error="skip", progress=False)
    assert [name for name, _reason in dataset.info.skipped] == ["train/PNEUMONIA/img1.png"]
    assert len(dataset.train) + len(dataset.val) == 7
    assert dataset.describe()["skipped_files"][0]["file"] == "train/PNEUMONIA/img1.png"


def test_truncated_jpeg_is_caught(tmp_path):
    root = make_tree(tmp_path / "d", {"train": 0, "test": 0}, CHEST, per_class=4)
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(buffer, "JPEG")
    (root / "test" / "NORMAL" / "cut.jpg").write_bytes(buffer.getvalue()[:300])
    with pytest.raises(DataError, match="cut.jpg"):
        load_dataset(root, image_size=16, progress=False)


@pytest.mark.parametrize("mode,fmt,suffix", [
    ("CMYK", "JPEG", "jpg"), ("I;16", "PNG", "png"), ("RGBA", "PNG", "png"), ("P", "PNG", "png"),
    ("RGB", "TIFF", "tif"), ("L", "BMP", "bmp"), ("LA", "PNG", "png"),
])
def test_image_modes_are_converted(tmp_path, mode, fmt, suffix):
    root = make_tree(tmp_path / "d", {"train": 0, "test": 0}, CHEST, per_class=4)
    write_image(root / "train" / "NORMAL" / f"odd.{suffix}", 40, mode=mode, fmt=fmt)
    dataset = load_dataset(root, image_size=20, channels=1, progress=False)
    everything = {**dict(zip(dataset.train.ids, dataset.train.images)), **dict(zip(dataset.val.ids, dataset.val.images))}
    reference = everything["train/NORMAL/img0.png"].astype(int)  # same picture, brightness 40, saved as L/PNG
    odd = everything[f"train/NORMAL/odd.{suffix}"].astype(int)
    tolerance = 12 if fmt == "JPEG" else 2  # JPEG is lossy
    assert np.abs(odd - reference).mean() <= tolerance, f"{mode} {fmt} decoded differently"


def test_colour_folder_becomes_three_channels(tmp_path):
    root = tmp_path / "d"
    for split in ("train", "test"):
        for name, value in CHEST.items():
            for index in range(3):
                path = write_image(root / split / name / f"{index}.png", value, mode="RGB")
                pixels = np.asarray(Image.open(path)).copy()
                pixels[8:12, 8:12] = (200, 30, 30)  # a red mark: a real colour picture
                Image.fromarray(pixels).save(path)
    dataset = load_dataset(root, image_size=12, progress=False)
    assert dataset.info.channels == 3 and dataset.train.images.shape[-1] == 3


def test_grayscale_pictures_saved_as_rgb_are_read_as_one_channel(tmp_path):
    """Like the Kaggle brain MRI set: most files are RGB JPEGs of grayscale scans."""
    root = tmp_path / "d"
    for split in ("train", "test"):
        for name, value in CHEST.items():
            for index in range(4):
                write_image(root / split / name / f"{index}.jpg", value + index, mode="RGB", fmt="JPEG")
            write_image(root / split / name / "gray.png", value, mode="L")
    dataset = load_dataset(root, image_size=16, progress=False)
    assert dataset.info.channels == 1 and dataset.train.images.shape[-1] == 1
    assert any("hold a grayscale picture" in note and "one grayscale channel" in note for note in dataset.info.notes)
    everything = {**dict(zip(dataset.train.ids, dataset.train.images)), **dict(zip(dataset.val.ids, dataset.val.images))}
    assert np.abs(everything["train/NORMAL/0.jpg"].astype(int) - everything["train/NORMAL/gray.png"]).mean() < 12


def test_folder_cache_is_used_and_rebuilt_when_files_change(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "d", {"train": 0, "test": 0}, CHEST, per_class=4)
    first = load_dataset(root, image_size=16, progress=False)
    calls = []
    original = folders.decode_files
    monkeypatch.setattr(folders, "decode_files", lambda *a, **k: calls.append(1) or original(*a, **k))
    again = load_dataset(root, image_size=16, progress=False)
    assert calls == []  # served from the cache
    np.testing.assert_array_equal(first.train.images, again.train.images)
    assert first.info.fingerprint == again.info.fingerprint
    write_image(root / "test" / "NORMAL" / "new.png", 90)
    changed = load_dataset(root, image_size=16, progress=False)
    assert calls == [1] and len(changed.test) == 9
    assert changed.info.fingerprint != first.info.fingerprint


def test_two_lessons_loading_one_tree_at_once_decode_it_once(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "d", {"train": 0, "test": 0}, CHEST, per_class=4)
    calls = []
    original = folders.decode_files

    def slow_decode(*args, **kwargs):
        calls.append(1)
        time.sleep(0.3)  # the other thread is waiting on the lock by now
        return original(*args, **kwargs)

    monkeypatch.setattr(folders, "decode_files", slow_decode)
    results = []
    threads = [threading.Thread(target=lambda: results.append(load_dataset(root, image_size=16, progress=False)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == [1] and len(results) == 2
    np.testing.assert_array_equal(results[0].train.images, results[1].train.images)


DECODE_UNDER_DETERMINISM = """
import sys
from pathlib import Path
import medlab
from medlab.data.folder import decode_files
from medlab.train import set_determinism
set_determinism(0)
paths = sorted(Path(sys.argv[1]).rglob("*.*"))
images, failed = decode_files(paths, [path.suffix == ".bmp" for path in paths], 16, 1, progress=False)
print(images.shape, failed, int(images[:, 3, 3, 0].min()))
"""


def test_tensorflow_and_pillow_files_decode_under_op_determinism_without_a_rewrite(tmp_path):
    # With op determinism on (every lesson), a map holding Pillow's numpy_function is rewritten to run serially, and
    # TensorFlow prints "E0000 ... NodeDef mentions attribute use_unbounded_threadpool" into lesson 03 (brain MRI).
    # A fresh process: TensorFlow prints that line once per process.
    make_tree(tmp_path / "d", {"train": 0}, CHEST, per_class=3)
    write_image(tmp_path / "d" / "train" / "NORMAL" / "bitmap.bmp", 70, fmt="BMP")
    result = subprocess.run([sys.executable, "-c", DECODE_UNDER_DETERMINISM, str(tmp_path / "d")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-6:] == ["(7,", "16,", "16,", "1)", "[]", "255"]  # the bright square everywhere
    assert "NodeDef mentions" not in result.stderr


def test_half_written_cache_is_not_trusted(tmp_path):
    root = make_tree(tmp_path / "d", {"train": 0, "test": 0}, CHEST, per_class=4)
    load_dataset(root, image_size=16, progress=False)
    (cache,) = (tmp_path / "data" / "cache").glob("*.npz")
    cache.write_bytes(cache.read_bytes()[:500])
    dataset = load_dataset(root, image_size=16, progress=False)
    assert len(dataset.test) == 8


def test_training_split_too_small_to_carve_validation(tmp_path):
    make_tree(tmp_path / "d", {"train": 0, "test": 0}, CHEST, per_class=1)
    with pytest.raises(DataError, match="too small to carve a validation split"):
        load_dataset(tmp_path / "d", progress=False)


def test_no_split_folders_is_explained(tmp_path):
    make_tree(tmp_path / "flat", {"": 0}, CHEST, per_class=2)
    with pytest.raises(DataError, match="no split folders found"):
        load_dataset(tmp_path / "flat", progress=False)


def test_default_folder_image_size_follows_the_pixel_budget():
    from medlab import config

    assert config.default_folder_image_size(1_000) == 128  # e.g. the 4-class lung CT set
    assert config.default_folder_image_size(3_000) == 96
    assert config.default_folder_image_size(7_019) == 64  # the brain MRI set
    assert config.default_folder_image_size(10**7) == min(config.FOLDER_IMAGE_SIZES)
    for images in (1, 500, 2_000, 7_500, 20_000):
        side = config.default_folder_image_size(images)
        assert images * side**2 <= config.FOLDER_PIXEL_BUDGET or side == min(config.FOLDER_IMAGE_SIZES)
    with pytest.raises(ValueError):
        config.default_folder_image_size(-1)
