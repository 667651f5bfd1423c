import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medlab.cli import main
from medlab.predict import PredictError, Predictor, expand_inputs


@pytest.fixture(scope="module")
def test_images(tiny_run, tmp_path_factory):
    """The run's test images written as PNG files, as a person would have them."""
    _run, dataset = tiny_run
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for index in range(12):
        path = folder / f"case_{index:02d}.png"
        Image.fromarray(dataset.test.images[index][..., 0]).save(path)
        paths.append(path)
    return folder, paths


def test_predict_agrees_with_the_saved_test_predictions(tiny_run, test_images, capsys):
    run, _dataset = tiny_run
    folder, paths = test_images
    assert main(["predict", str(folder), "--run", str(run), "--json"]) == 0
    output = json.loads(capsys.readouterr().out)
    saved = pd.read_csv(run / "models" / "scratch_cnn" / "predictions_test.csv").iloc[:12]
    ours = np.array([row["probabilities"]["pneumonia"] for row in output["predictions"]])
    np.testing.assert_allclose(ours, saved["p_pneumonia"].to_numpy(), atol=1e-5)
    threshold = output["threshold"]
    assert [row["crossed_threshold"] for row in output["predictions"]] == list(ours >= threshold)
    for row in output["predictions"]:
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def test_bad_files_are_reported_and_the_rest_predicted(tiny_run, test_images, tmp_path, capsys):
    run, _ = tiny_run
    _folder, paths = test_images
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    code = main(["predict", str(paths[0]), str(broken), str(text), str(paths[1]), "--run", str(run), "--csv"])
    captured = capsys.readouterr()
    assert code == 1 and "2 of 4 file(s) could not be predicted" in captured.err
    rows = captured.out.strip().splitlines()
    assert rows[0].startswith("file,predicted_class,p_normal,p_pneumonia")
    assert len(rows) == 5 and "not a readable image" in rows[2] and "not a readable image" in rows[3]
    assert rows[1].split(",")[1] in {"normal", "pneumonia"} and rows[4].split(",")[1] in {"normal", "pneumonia"}


def test_tflite_model_and_globs(tiny_run, test_images, capsys):
    run, _ = tiny_run
    folder, _paths = test_images
    assert main(["predict", str(folder / "case_0*.png"), "--run", str(run), "--model", "tflite-int8"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "tflite-int8" in lines[0] and len(lines) == 1 + 10


def test_keras_and_tflite_agree(tiny_run, test_images):
    run, _ = tiny_run
    _folder, paths = test_images
    keras_rows = Predictor(run).predict_files(paths)
    lite_rows = Predictor(run, "tflite-int8").predict_files(paths)
    agreement = np.mean([a.predicted_class == b.predicted_class for a, b in zip(keras_rows, lite_rows)])
    assert agreement >= 0.9


def test_missing_run_and_model_are_explained(tmp_path, tiny_run, capsys):
    with pytest.raises(PredictError, match="make reports"):
        Predictor(tmp_path)
    run, _ = tiny_run
    with pytest.raises(PredictError, match="available"):
        Predictor(run, model_name="resnet")
    with pytest.raises(PredictError, match="notebook 07"):
        Predictor(run, "tflite-float16")
    assert main(["predict", "x.png", "--run", str(tmp_path)]) == 1
    assert "medlab: error:" in capsys.readouterr().err


def test_expand_inputs(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("a/1.png", "a/2.jpg", "a/.hidden.png", "a/notes.txt", "b.png"):
        (tmp_path / name).write_bytes(b"x")
    found = expand_inputs([str(tmp_path / "a"), str(tmp_path / "*.png")])
    assert [p.name for p in found] == ["1.png", "2.jpg", "b.png"]


def test_four_class_run_predicts_every_class(tiny_run_four_class, tmp_path, capsys):
    run, dataset = tiny_run_four_class
    paths = []
    for index in range(4):
        paths.append(tmp_path / f"case_{index}.png")
        Image.fromarray(dataset.test.images[index][..., 0]).save(paths[-1])
    assert main(["predict", *map(str, paths), "--run", str(run), "--json"]) == 0
    output = json.loads(capsys.readouterr().out)
    assert output["threshold"] is None
    saved = pd.read_csv(run / "models" / "scratch_cnn" / "predictions_test.csv").iloc[:4]
    for row, (_, expected) in zip(output["predictions"], saved.iterrows()):
        assert list(row["probabilities"]) == dataset.info.class_names and row["crossed_threshold"] is None
        np.testing.assert_allclose([row["probabilities"][c] for c in dataset.info.class_names],
                                   [expected[f"p_{c}"] for c in dataset.info.class_names], atol=1e-5)
        assert row["predicted_class"] == max(row["probabilities"], key=row["probabilities"].get)
    assert main(["predict", str(paths[0]), "--run", str(run), "--csv"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header.startswith("file,predicted_class," + ",".join(f"p_{c}" for c in dataset.info.class_names))
