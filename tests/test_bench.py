import os

import pytest

from medlab.bench import data_benchmark


def test_data_benchmark_measures_every_stage():
    before = os.environ["MEDLAB_DATA_DIR"]
    results = data_benchmark(count=60, source_size=32, image_size=16, batch_size=16)
    assert os.environ["MEDLAB_DATA_DIR"] == before  # the benchmark's cold cache does not leak out
    assert results["images"] == 60
    for key in ("synthetic_generator_images_per_s", "tutorial_loop_images_per_s", "medlab_first_pass_images_per_s",
                "medlab_cached_epoch_images_per_s"):
        assert results[key] > 0, key
    loop = results["tutorial_loop_images_per_s"]
    assert results["cached_epoch_vs_loop"] == pytest.approx(results["medlab_cached_epoch_images_per_s"] / loop, abs=0.01)
    assert results["first_pass_vs_loop"] == pytest.approx(results["medlab_first_pass_images_per_s"] / loop, abs=0.01)
