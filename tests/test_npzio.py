import threading
import time

import numpy as np
import pytest

from medlab.npzio import file_sha256, one_writer, write_npz_atomic, write_text_atomic


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


def test_two_threads_writing_the_same_file_never_take_each_others_temporary(tmp_path):
    # Two lessons generating the same dataset write the same manifest at the same moment: a temporary name
    # shared between writers was renamed away by the first, and the second's rename failed (CI, session 30).
    target = tmp_path / "out" / "manifest.json"
    start = threading.Barrier(2)
    errors = []

    def write(text):
        try:
            for _round in range(200):
                start.wait()
                write_text_atomic(target, text)
        except Exception as error:  # noqa: BLE001 - collected for the assertion below
            errors.append(error)
            start.abort()

    threads = [threading.Thread(target=write, args=(text,)) for text in ("one", "two")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert target.read_text() in {"one", "two"}
    assert [path.name for path in target.parent.iterdir()] == ["manifest.json"]


def test_one_writer_makes_the_second_wait_and_says_so(tmp_path, capsys):
    target = tmp_path / "data.npz"
    entered = threading.Event()

    def second():
        with one_writer(target):
            entered.set()

    with one_writer(target):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.3)
        assert not entered.is_set()  # the lock holds it back
    thread.join(timeout=10)
    assert entered.is_set()
    assert "waiting for another process to finish data.npz" in capsys.readouterr().out
