"""Checks on the real PneumoniaMNIST copy in ../shared; skipped cleanly when it is absent."""

import numpy as np
import pytest
from conftest import SHARED_PNEUMONIAMNIST

from medlab.data import load_dataset

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not SHARED_PNEUMONIAMNIST.exists(), reason="real PneumoniaMNIST not present in ../shared"),
]


def test_fingerprint_and_counts_match_the_readme():
    dataset = load_dataset(SHARED_PNEUMONIAMNIST)
    assert dataset.info.fingerprint == "8adc2319716dd06a410ac2835561f421ce67c21da9d082d4fbf9008e35f2e3b1"
    counts = dataset.counts()
    assert counts.loc["train"].tolist() == [1214, 3494, 4708]
    assert counts.loc["val"].tolist() == [135, 389, 524]
    assert counts.loc["test"].tolist() == [234, 390, 624]
    assert dataset.info.class_names == ["normal", "pneumonia"] and not dataset.info.synthetic
    assert dataset.train.images.dtype == np.uint8 and dataset.train.images.shape[1:] == (28, 28, 1)
