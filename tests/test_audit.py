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
