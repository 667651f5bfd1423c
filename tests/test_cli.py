import json

import numpy as np
import pytest

from medlab.cli import _parse_parameter, main


def test_info_prints_description(tiny_npz, capsys):
    assert main(["info", str(tiny_npz)]) == 0
    output = capsys.readouterr().out
    description = json.loads(output[: output.rindex("}") + 1])
    assert description["class_names"] == ["normal", "pneumonia"]


def test_bad_input_gives_one_clear_line_not_a_traceback(tmp_path, capsys):
    broken = tmp_path / "broken.npz"
    np.savez(broken, train_images=np.zeros((2, 4, 4), np.uint8))
    assert main(["info", str(broken)]) == 1
    error = capsys.readouterr().err
    assert error.startswith("medlab: error: ") and "train_labels" in error
    assert "Traceback" not in error


def test_offline_download_fails_cleanly(capsys, monkeypatch):
    from medlab import download

    monkeypatch.setattr(download.MedMNISTInfo, "url", lambda self, size=28: "http://127.0.0.1:9/x.npz")
    assert main(["data", "download", "pneumoniamnist"]) == 1
    error = capsys.readouterr().err
    assert "could not download" in error and "put it at" in error and "Traceback" not in error


def test_a_kernel_folder_without_write_permission_is_one_clear_line(capsys, monkeypatch):
    from medlab import execution

    def refused(**options):
        raise PermissionError("[Errno 13] Permission denied: '/usr/local/share/jupyter/kernels/medlab'")

    monkeypatch.setattr(execution, "install_kernel", refused)
    assert main(["kernel"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("medlab: error: ") and "Permission denied" in error and "Traceback" not in error


def test_audit_and_synthetic_commands(capsys):
    assert main(["data", "synthetic"]) == 0  # the default set, which the audit below reads
    assert main(["audit", "synthetic"]) == 0
    assert "no exact duplicates" in capsys.readouterr().out


def test_audit_of_a_folder_with_a_corrupt_file_names_the_flag_then_works_with_it(tmp_path, capsys):
    from conftest import make_tree

    root = make_tree(tmp_path / "mri", {"Training": 0, "Testing": 0}, {"glioma": 40, "notumor": 120}, per_class=6)
    (root / "Training" / "glioma" / "broken.png").write_bytes(b"not a png at all")
    assert main(["audit", str(root)]) == 1
    error = capsys.readouterr().err
    assert "broken.png" in error and "--skip-bad-files" in error and "Traceback" not in error
    assert main(["audit", str(root), "--skip-bad-files"]) == 0
    output = capsys.readouterr().out
    assert "skipped Training/glioma/broken.png" in output


def test_python_dash_m_medlab_is_the_same_command_line():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "medlab", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "{data,info,audit,kernel,reports,predict,serve,bench}" in result.stdout


@pytest.mark.parametrize(("text", "expected"), [
    ("mixed_precision=False", ("mixed_precision", False)),  # a string "False" would be truthy: bfloat16 after all
    ("mixed_precision=false", ("mixed_precision", False)),
    ("test_time_views=True", ("test_time_views", True)),
    ("image_size=32", ("image_size", 32)),
    ("learning_rate=0.003", ("learning_rate", 0.003)),
    ("monitor=auc", ("monitor", "auc")),
    ("dataset=../data/x.npz", ("dataset", "../data/x.npz")),
])
def test_parameters_are_typed_as_in_the_notebooks(text, expected):
    assert _parse_parameter(text) == expected


def test_bench_kernels_prints_the_table_or_says_why_there_is_none(capsys, monkeypatch):
    import medlab.train
    from medlab import speed

    monkeypatch.setattr(medlab.train, "onednn_enabled", lambda: False)
    assert main(["bench", "kernels"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("medlab: error: TensorFlow runs its own kernels here") and "Traceback" not in error
    monkeypatch.setattr(medlab.train, "onednn_enabled", lambda: True)
    monkeypatch.setattr(medlab.train, "cpu_trains_bfloat16", lambda: False)
    monkeypatch.setattr(speed, "kernel_breakdown", lambda name, precision: {
        "model": name, "precision": precision, "batch_size": 64, "step_wall_ms": 40.0, "onednn_ms": 30.0,
        "kernels": {}, "convolutions": {"ms": 20.0, "gflops": 800.0}})
    assert main(["bench", "kernels"]) == 0
    assert "| scratch_cnn_64px float32 | scratch_cnn_128px float32 |" in capsys.readouterr().out
