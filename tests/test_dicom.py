"""DICOM in folder datasets, checked on the real files pydicom ships with its test data and on trees mixing PNG."""

import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import write_image
from pydicom.data import get_testdata_file

from medlab.data import DataError, dicom, load_dataset

warnings.filterwarnings("ignore", module="pydicom")
TEST_FILES = Path(get_testdata_file("CT_small.dcm")).parent


def test_single_frame_images_load_and_the_rest_are_refused_in_one_line():
    usable, refused = {}, {}
    for path in sorted(TEST_FILES.glob("*.dcm")):
        header = dicom.read_header(path)
        (refused if isinstance(header, str) else usable)[path.name] = header
    for name in ("CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm", "liver_1frame.dcm",
                 "SC_rgb_rle.dcm"):
        assert name in usable, (name, refused.get(name))
    assert usable["CT_small.dcm"] == ("DICOM", "L", (128, 128)) and usable["SC_rgb_rle.dcm"][1] == "RGB"
    assert refused["SC_rgb_rle_2frame.dcm"].startswith("multi-frame DICOM (2 frames)")
    assert refused["rtdose.dcm"].startswith("multi-frame DICOM (15 frames)")
    assert refused["rtplan.dcm"] == "DICOM file without an image (RT Plan Storage)"
    assert refused["reportsi.dcm"] == "DICOM file without an image (Basic Text SR Storage)"
    assert all("\n" not in reason for reason in refused.values())
    for name in ("CT_small.dcm", "MR_small.dcm", "SC_rgb_rle.dcm"):
        image = dicom.pixels(TEST_FILES / name, 1)
        width, height = usable[name][2]
        assert image.shape == (height, width, 1) and image.dtype == np.uint8
        assert image.std() > 10  # a picture, not a flat field
        assert dicom.pixels(TEST_FILES / name, 3).shape == (height, width, 3)


def test_windowing_rescale_and_monochrome1(tmp_path):
    source = pydicom.dcmread(TEST_FILES / "MR_small.dcm")  # stores the window 600 +- 800
    raw = source.pixel_array.astype(np.float64)
    expected = np.clip(np.round((raw - (600 - 800)) / 1600 * 255), 0, 255)
    np.testing.assert_array_equal(dicom.pixels(TEST_FILES / "MR_small.dcm", 1)[..., 0], expected)

    del source.WindowCenter, source.WindowWidth  # no window: the percentiles
    no_window = tmp_path / "no_window.dcm"
    source.save_as(no_window)
    low, high = np.percentile(raw, dicom.PERCENTILE_WINDOW)
    expected = np.clip(np.round((raw - low) / (high - low) * 255), 0, 255)
    np.testing.assert_array_equal(dicom.pixels(no_window, 1)[..., 0], expected)

    inverted = tmp_path / "monochrome1.dcm"
    source.PhotometricInterpretation = "MONOCHROME1"
    source.save_as(inverted)
    np.testing.assert_array_equal(dicom.pixels(inverted, 1)[..., 0], 255 - expected)

    windowed = tmp_path / "windowed.dcm"
    source.PhotometricInterpretation = "MONOCHROME2"
    source.RescaleSlope, source.RescaleIntercept = 2, -100  # stored values -> real values
    source.WindowCenter, source.WindowWidth = float(np.median(raw) * 2 - 100), 200.0
    source.save_as(windowed)
    image = dicom.pixels(windowed, 1)[..., 0]
    real = raw * 2 - 100
    centre = source.WindowCenter
    assert (image[real <= centre - 100] == 0).all() and (image[real >= centre + 100] == 255).all()
    assert 0 < (image == 0).mean() < 1
    source.WindowCenter, source.WindowWidth = [centre, 0.0], [200.0, 10.0]  # several windows: the first counts
    source.save_as(windowed)
    np.testing.assert_array_equal(dicom.pixels(windowed, 1)[..., 0], image)


def test_header_without_suffix_is_recognised(tmp_path):
    plain = tmp_path / "IM0001"
    shutil.copy(TEST_FILES / "CT_small.dcm", plain)
    assert dicom.is_dicom(plain) and dicom.read_header(plain)[0] == "DICOM"
    png = write_image(tmp_path / "x.png", 10)
    assert not dicom.is_dicom(png)


def _dicom_copy(source: Path, destination: Path, patient: str, offset: int) -> None:
    dataset = pydicom.dcmread(source)
    dataset.PatientID = patient
    pixels = dataset.pixel_array.astype(np.int32) + offset  # a different image for each copy
    dataset.PixelData = pixels.astype(dataset.pixel_array.dtype).tobytes()
    destination.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(destination)


@pytest.fixture
def mixed_tree(tmp_path):
    """train/test with a DICOM class (MR, 2 images per patient, some without a suffix) and a PNG class."""
    root = tmp_path / "mixed"
    for split, patients in (("train", 12), ("test", 3)):
        for patient in range(patients):
            for image in range(2):
                name = f"{split}_p{patient}_{image}" + (".dcm" if image == 0 else "")
                _dicom_copy(TEST_FILES / "MR_small.dcm", root / split / "mr" / name, f"{split}-P{patient}",
                            patient * 2 + image)
        for index in range(patients * 2):
            write_image(root / split / "photo" / f"img{index}.png", 20 + index, size=(64, 64))
    return root


def test_a_folder_mixing_dicom_and_png_loads_with_patients_kept_together(mixed_tree):
    data = load_dataset(mixed_tree, image_size=32, seed=0, progress=False)
    assert data.info.class_names == ["mr", "photo"] and data.info.channels == 1
    counts = data.counts()
    assert counts.loc["test", "mr"] == 6 and counts["total"].sum() == 2 * (24 + 6)
    dicom_ids = {split: {Path(i).name.split("_")[1] for i in data.splits[split].ids if "/mr/" in i}
                 for split in ("train", "val")}
    assert dicom_ids["val"] and not dicom_ids["train"] & dicom_ids["val"]  # one patient, one split
    assert "grouped by patient" in " ".join(data.info.notes)
    assert data.train.images.dtype == np.uint8 and data.train.images.max() > 200


def test_a_multi_frame_file_is_named_or_skipped(mixed_tree):
    bad = mixed_tree / "train" / "mr" / "cine.dcm"
    shutil.copy(TEST_FILES / "SC_rgb_rle_2frame.dcm", bad)
    with pytest.raises(DataError, match=r"train/mr/cine.dcm: multi-frame DICOM \(2 frames\)"):
        load_dataset(mixed_tree, image_size=32, seed=0, progress=False)
    data = load_dataset(mixed_tree, image_size=32, seed=0, progress=False, on_error="skip")
    assert [name for name, _ in data.info.skipped] == ["train/mr/cine.dcm"]


def test_predict_and_the_web_page_accept_dicom(tiny_run, tmp_path):
    from fastapi.testclient import TestClient

    from medlab.predict import Predictor
    from medlab.serve import create_app

    run, _ = tiny_run
    predictor = Predictor(run)
    plain = tmp_path / "IM0001"  # DICOM without a suffix
    shutil.copy(TEST_FILES / "CT_small.dcm", plain)
    (result,) = predictor.predict_files([plain])
    assert result.predicted_class in ("normal", "pneumonia")
    response = TestClient(create_app(predictor)).post(
        "/predict", files={"file": ("IM0001", plain.read_bytes(), "application/dicom")})
    assert response.status_code == 200 and response.json()["predicted_class"] == result.predicted_class
    refused = TestClient(create_app(predictor)).post(
        "/predict", files={"file": ("plan.dcm", (TEST_FILES / "rtplan.dcm").read_bytes(), "application/dicom")})
    assert refused.status_code == 422 and "DICOM file without an image" in refused.json()["detail"]


def test_the_audit_finds_a_patient_in_two_splits(mixed_tree, capsys):
    from medlab import cli
    from medlab.audit import patients_across_splits

    _dicom_copy(TEST_FILES / "MR_small.dcm", mixed_tree / "test" / "mr" / "again.dcm", "train-P4", 99)
    data = load_dataset(mixed_tree, image_size=32, seed=0, progress=False)
    shared = patients_across_splits(data)
    assert shared.to_dict("records") in (
        [{"patient": "train-P4", "splits": "train / test", "images": 3}],
        [{"patient": "train-P4", "splits": "val / test", "images": 3}],
    )
    assert cli.main(["audit", str(mixed_tree)]) == 0
    assert "patients in more than one split: 1" in capsys.readouterr().out


def test_every_pydicom_test_file_renders_in_the_web_page_or_is_refused_in_one_line(tiny_run):
    """The web page's /predict on each of pydicom's own test files: a prediction with its Grad-CAM overlay, or a
    one-line refusal (422: a DICOM file medlab cannot use; 415: no DICOM preamble, so not recognised as DICOM)."""
    from fastapi.testclient import TestClient

    from medlab.predict import Predictor
    from medlab.serve import create_app

    run, _ = tiny_run
    client = TestClient(create_app(Predictor(run)))
    rendered, refused = [], {}
    for path in sorted(TEST_FILES.glob("*.dcm")):
        response = client.post("/predict", files={"file": (path.name, path.read_bytes(), "application/dicom")})
        assert response.status_code in (200, 415, 422), (path.name, response.status_code, response.text[:300])
        if response.status_code == 200:
            body = response.json()
            assert body["predicted_class"] in ("normal", "pneumonia") and body["gradcam_png"], path.name
            rendered.append(path.name)
        else:
            refused[path.name] = response.json()["detail"]
            assert "\n" not in refused[path.name], path.name
    header_ok = {path.name for path in TEST_FILES.glob("*.dcm") if not isinstance(dicom.read_header(path), str)}
    assert set(rendered) <= header_ok  # whatever the header check refuses is refused on the page too
    for name in ("CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm", "liver_1frame.dcm",
                 "SC_rgb_rle.dcm", "JPEG2000.dcm", "examples_palette.dcm"):
        assert name in rendered, (name, refused.get(name))
    for name in ("rtplan.dcm", "SC_rgb_rle_2frame.dcm", "rtdose.dcm"):
        assert name in refused
    print(f"rendered {len(rendered)}: {', '.join(rendered)}")
    print(f"refused {len(refused)}: " + "; ".join(f"{name}: {reason}" for name, reason in refused.items()))
