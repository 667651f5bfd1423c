import numpy as np
import pytest
from conftest import SHARED_PNEUMONIAMNIST

from medlab.audit import duplicate_summary, find_duplicates
from medlab.data import load_dataset


def test_planted_duplicates_are_found(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {f"{s}_images": rng.integers(0, 255, (n, 8, 8), dtype=np.uint8) for s, n in
              (("train", 20), ("val", 6), ("test", 6))}
    arrays |= {f"{s}_labels": (np.arange(len(arrays[f"{s}_images"])) % 2).reshape(-1, 1) for s in ("train", "val", "test")}
    arrays["train_images"][5] = arrays["train_images"][3]  # within train, same label (3 and 5 are odd)
    arrays["test_images"][2] = arrays["train_images"][0]  # leak: train -> test
    arrays["val_images"][1] = arrays["train_images"][7]  # leak with a label conflict (val[1] odd, train[7] odd)
    arrays["val_labels"][1] = 0
    path = tmp_path / "planted.npz"
    np.savez(path, **arrays)
    duplicates = find_duplicates(load_dataset(path))
    assert set(duplicates["scope"]) == {"within train", "train / test", "train / val"}
    assert duplicates.set_index("scope").loc["train / val", "label_conflict"]
    assert duplicates.set_index("scope").loc["within train", "members"] == "train[3], train[5]"
    summary = duplicate_summary(duplicates)
    assert summary.loc["train / test", "images"] == 2
    assert summary["label_conflicts"].sum() == 1


def test_no_duplicates_gives_empty_tables():
    dataset = load_dataset("synthetic", image_size=32, max_images_per_split=20, progress=False)
    duplicates = find_duplicates(dataset)
    assert duplicates.empty and duplicate_summary(duplicates).empty


@pytest.mark.realdata
@pytest.mark.skipif(not SHARED_PNEUMONIAMNIST.exists(), reason="real PneumoniaMNIST not present in ../shared")
def test_real_pneumoniamnist_duplicates():
    duplicates = find_duplicates(load_dataset(SHARED_PNEUMONIAMNIST))
    scopes = set(duplicates["scope"])
    assert "within train" in scopes and "train / val" in scopes


def _real_mri_slice() -> np.ndarray:
    """A real brain MRI slice (256 x 256) that matplotlib ships as sample data, scaled to uint8."""
    import gzip

    from matplotlib import cbook

    with gzip.open(cbook.get_sample_data("s1045.ima.gz", asfileobj=False)) as handle:
        pixels = np.frombuffer(handle.read(), np.uint16).reshape(256, 256).astype(np.float64)
    return (255 * pixels / pixels.max()).astype(np.uint8)


def test_near_duplicates_of_a_real_image_are_found_and_different_images_are_not(tmp_path):
    import io

    from PIL import Image

    from medlab.audit import find_near_duplicates, near_duplicate_summary

    original = Image.fromarray(_real_mri_slice())
    root = tmp_path / "mri"
    for split, class_name in (("Training", "glioma"), ("Training", "notumor"), ("Testing", "glioma"),
                              ("Testing", "notumor")):
        (root / split / class_name).mkdir(parents=True)
    original.save(root / "Training" / "glioma" / "original.png")
    encoded = io.BytesIO()
    original.save(encoded, format="JPEG", quality=70)  # re-encoded
    (root / "Testing" / "glioma" / "reencoded.jpg").write_bytes(encoded.getvalue())
    original.resize((200, 200), Image.BILINEAR).save(root / "Testing" / "glioma" / "resized.png")
    shifted = np.roll(np.asarray(original), (2, 2), axis=(0, 1))
    Image.fromarray(shifted).save(root / "Training" / "notumor" / "shifted.png")  # and labelled differently
    # Different pictures: the slice upside down and mirrored, a real photograph, and smooth random images.
    Image.fromarray(np.asarray(original)[::-1]).save(root / "Training" / "notumor" / "flipped.png")
    Image.fromarray(np.asarray(original)[:, ::-1].T.copy()).save(root / "Testing" / "notumor" / "transposed.png")
    from matplotlib import cbook

    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as photo:
        photo.convert("L").resize((256, 256)).save(root / "Testing" / "notumor" / "photo.png")
    rng = np.random.default_rng(0)
    for index in range(12):
        coarse = rng.uniform(0, 255, (8, 8))
        smooth = np.kron(coarse, np.ones((32, 32))).astype(np.uint8)
        Image.fromarray(smooth).save(root / "Training" / ("glioma", "notumor")[index % 2] / f"random{index}.png")
    dataset = load_dataset(root, image_size=128, validation_fraction=0.25, progress=False)
    pairs = find_near_duplicates(dataset)
    names = {frozenset(name.split("/")[-1] for name in (row.first, row.second)) for row in pairs.itertuples()}
    copies = {"original.png", "reencoded.jpg", "resized.png", "shifted.png"}
    expected = {frozenset((a, b)) for a in copies for b in copies if a < b}
    assert names == expected, pairs
    assert pairs["label_conflict"].sum() == 3  # shifted.png (notumor) against each glioma copy
    assert find_duplicates(dataset).empty  # no byte-identical files: these are only near duplicates
    assert near_duplicate_summary(pairs)["pairs"].sum() == 6
