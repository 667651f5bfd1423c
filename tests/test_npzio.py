import numpy as np
import pytest

from medlab.npzio import file_sha256, write_npz_atomic


def test_same_arrays_give_identical_bytes(tmp_path):
    arrays = {"b": np.arange(10), "a": np.eye(3)}
    first = write_npz_atomic(tmp_path / "one.npz", arrays)
    second = write_npz_atomic(tmp_path / "two.npz", dict(reversed(list(arrays.items()))))
    assert file_sha256(first) == file_sha256(second)
    with np.load(first) as loaded:
        np.testing.assert_array_equal(loaded["b"], arrays["b"])


def test_failed_write_leaves_no_file(tmp_path):
    folder = tmp_path / "out"  # (tmp_path itself holds the data folder that conftest.py makes)
    folder.mkdir()
    target = folder / "out.npz"
    with pytest.raises(ValueError):
        write_npz_atomic(target, {"ok": np.zeros(3), "bad": np.array([object()], dtype=object)})
    assert not target.exists()
    assert list(folder.iterdir()) == []
