"""Each lesson writes its technique out in a cell tagged ``technique``; that code must equal medlab's.

The cells are read from the committed notebooks and executed here on tiny inputs, so a lesson cannot
lose its written-out technique, and the lesson and the library cannot drift apart.
"""

import json
import math
import re
import tempfile
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from medlab import config

# Per lesson: what its technique cell must show (the lines a student is meant to read).
REQUIRED = {
    "02_augmentation": ["keras.layers.RandomRotation", "keras.layers.RandomContrast", "affine_transform"],
    "03_scratch_cnn": ["keras.layers.Conv2D", "keras.layers.BatchNormalization", "keras.layers.MaxPooling2D",
                       "keras.layers.GlobalAveragePooling2D", "keras.Model(", "model.fit(",
                       "keras.callbacks.ModelCheckpoint", "keras.callbacks.EarlyStopping",
                       "images[:, :, ::-1]", "np.roll("],
    "04_transfer_learning": ["base.trainable = False", "keras.applications.MobileNetV2", "keras.layers.Dense"],
    "05_fine_tuning": ["layer.trainable = False", "keras.layers.BatchNormalization", "layer.trainable = True"],
    "06_evaluation": ["tf.GradientTape", "tape.gradient", "tf.reduce_mean", "tf.nn.relu"],
    "07_tflite": ["TFLiteConverter.from_saved_model", "Interpreter(", ".invoke()"],
}


def technique(lesson: str) -> dict:
    """Execute the lesson's ``technique`` cells; return what they define."""
    cells = json.loads((config.NOTEBOOKS_DIR / f"{lesson}.ipynb").read_text())["cells"]
    sources = ["".join(cell["source"]) for cell in cells
               if "technique" in cell.get("metadata", {}).get("tags", [])]
    assert sources, f"{lesson} has no cell tagged 'technique' (its written-out core)"
    from ai_edge_litert.interpreter import Interpreter

    namespace = {"keras": keras, "tf": tf, "np": np, "math": math, "Interpreter": Interpreter}
    for source in sources:
        exec(compile(source, f"{lesson}.ipynb[technique]", "exec"), namespace)
    namespace["__source__"] = "\n".join(sources)
    return namespace


@pytest.mark.parametrize("notebook", sorted(config.NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb")), ids=lambda p: p.stem)
def test_every_challenge_has_a_worked_solution_cell(notebook):
    """A collapsed code cell tagged ``solution`` follows the challenge; nbval (``make test``) executes it."""
    cells = json.loads(notebook.read_text())["cells"]
    challenges = [index for index, cell in enumerate(cells)
                  if cell["cell_type"] == "markdown" and "**Challenge.**" in "".join(cell["source"])]
    assert len(challenges) == 1, f"{notebook.name}: expected one challenge, found {len(challenges)}"
    solutions = [cell for cell in cells[challenges[0] + 1:]
                 if cell["cell_type"] == "code" and "solution" in cell["metadata"].get("tags", [])]
    assert solutions, f"{notebook.name}: no code cell tagged 'solution' after the challenge"
    assert all(cell["metadata"].get("jupyter", {}).get("source_hidden") for cell in solutions), \
        f"{notebook.name}: solution cells are collapsed (source_hidden) so a student tries first"
    declared = "".join("".join(cell["source"]) for cell in cells if "parameters" in cell["metadata"].get("tags", []))
    from medlab.smoke import SMOKE_PARAMETERS

    # A solution that make reports skips (solution_epochs = 0, ...) is switched on in make test's smoke run.
    for gate in set(re.findall(r"\bsolution_\w+", "".join("".join(cell["source"]) for cell in solutions))):
        assert re.search(rf"^{gate}: \w+ = ", declared, re.MULTILINE), f"{notebook.name}: {gate} is not a parameter"
        assert SMOKE_PARAMETERS.get(gate), f"{notebook.name}: make test's smoke run skips the solution ({gate})"


@pytest.mark.parametrize("lesson", sorted(REQUIRED))
def test_each_lesson_writes_its_technique_out(lesson):
    source = technique(lesson)["__source__"]
    missing = [text for text in REQUIRED[lesson] if text not in source]
    assert not missing, f"{lesson}'s technique cell no longer shows {missing}"


def test_augmentation_written_out_draws_what_medlab_draws():
    from medlab.augment import AugmentationConfig, build_augmentation

    written_out = technique("02_augmentation")["augmentation_written_out"]
    cfg = AugmentationConfig()
    images = np.random.default_rng(0).uniform(0, 255, (6, 32, 32, 1)).astype("float32")
    for seed in (0, 42):
        ours = written_out(cfg.rotation, cfg.zoom, cfg.translation, cfg.contrast, seed)(images, training=True)
        np.testing.assert_allclose(ours, build_augmentation(cfg, seed=seed)(images, training=True), atol=1e-4)


@pytest.mark.parametrize("classes,side,stride", [(2, 32, 1), (4, 64, 2)])
def test_scratch_cnn_written_out_is_build_scratch_cnn(classes, side, stride):
    from medlab.models import build_scratch_cnn, default_filters

    written_out = technique("03_scratch_cnn")["scratch_cnn_written_out"]
    images = np.random.default_rng(1).integers(0, 255, (20, side, side, 1)).astype("uint8")
    filters = default_filters((side, side))
    ours = written_out((side, side, 1), classes, images, filters, stride, 16, 0.3)
    reference = build_scratch_cnn((side, side, 1), classes, images, filters=filters, dense_units=16, dropout=0.3,
                                  stem_stride=stride)
    assert ours.count_params() == reference.count_params()
    ours.set_weights(reference.get_weights())
    batch = images[:8].astype("float32")
    np.testing.assert_allclose(ours(batch, training=False), reference(batch, training=False), atol=1e-5)


@pytest.mark.parametrize("classes,side", [(2, 28), (4, 64)])
def test_views_written_out_is_average_models_over_test_time_views(classes, side):
    from medlab.export import logit_model
    from medlab.models import average_models, build_scratch_cnn, test_time_views

    written_out = technique("03_scratch_cnn")["views_written_out"]
    images = np.random.default_rng(2).uniform(0, 255, (8, side, side, 1)).astype("float32")
    keras.utils.set_random_seed(0)
    model = build_scratch_cnn((side, side, 1), classes, images, filters=(4, 8), dense_units=8)
    views = test_time_views(images.shape[1:])
    ours = written_out(logit_model(model)[0], images, step=views[2][1])
    np.testing.assert_allclose(ours, average_models([model], views=views).predict(images, verbose=0), atol=1e-5)
    assert not np.allclose(ours, model.predict(images, verbose=0), atol=1e-4)


@pytest.mark.parametrize("schedule", ["cosine", "plateau"])
def test_fit_written_out_trains_like_train_model(tmp_path, schedule):
    from medlab import data as medlab_data
    from medlab import train
    from medlab.models import build_scratch_cnn
    from medlab.runs import ModelFolder

    lesson = technique("03_scratch_cnn")
    lesson.update(make_tf_dataset=medlab_data.make_tf_dataset, PreciseBatchNorm=train.PreciseBatchNorm,
                  cosine_learning_rate=train.cosine_learning_rate)
    dataset = medlab_data.load_dataset("synthetic", image_size=16, max_images_per_split=48, seed=0, progress=False)
    cfg = train.TrainConfig(max_epochs=2, batch_size=16, schedule=schedule, seed=0)
    weights = []
    for name, fit in (("written_out", lesson["fit_written_out"]), ("medlab", train.train_model)):
        train.set_determinism(0)
        model = train.compile_model(build_scratch_cnn((16, 16, 1), 2, dataset.train.images, filters=(4, 8),
                                                      dense_units=4), 2)
        fit(model, dataset, ModelFolder(tmp_path / name).create(), cfg, None, verbose=0)
        weights.append(model.get_weights())
    assert any(not np.allclose(w, 0) for w in weights[0])
    for ours, theirs in zip(*weights):
        np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_transfer_written_out_is_build_transfer_model():
    from medlab.models import build_transfer_model

    written_out = technique("04_transfer_learning")["transfer_written_out"]
    reference, info = build_transfer_model((32, 32, 1), 4, weights=None, dropout=0.2)
    ours = written_out((32, 32, 1), 4, info.backbone_size, 0.2, weights=None)
    assert ours.count_params() == reference.count_params()
    head = sum(int(np.prod(w.shape)) for w in ours.trainable_weights)
    assert head == 1280 * 4 + 4  # frozen base: only the new output layer trains
    ours.set_weights(reference.get_weights())
    batch = np.random.default_rng(2).uniform(0, 255, (4, 32, 32, 1)).astype("float32")
    np.testing.assert_allclose(ours(batch, training=False), reference(batch, training=False), atol=1e-4)


def test_unfreeze_written_out_is_unfreeze_top_layers():
    from medlab.models import backbone_layers, build_transfer_model, unfreeze_top_layers

    written_out = technique("05_fine_tuning")["unfreeze_written_out"]
    ours, _ = build_transfer_model((32, 32, 1), 2, weights=None, freeze_backbone=True)
    reference, _ = build_transfer_model((32, 32, 1), 2, weights=None, freeze_backbone=True)
    for count in (0, 30, 100, 10_000):
        assert written_out(backbone_layers(ours), count) == unfreeze_top_layers(reference, count)
        assert [layer.trainable for layer in ours.layers] == [layer.trainable for layer in reference.layers]
        assert ours.count_params() == reference.count_params()
    bn = [layer for layer in backbone_layers(ours) if isinstance(layer, keras.layers.BatchNormalization)]
    assert bn and not any(layer.trainable for layer in bn)


@pytest.mark.parametrize("classes", [2, 4])
def test_gradcam_written_out_is_explain_gradcam(classes):
    from medlab import explain
    from medlab.models import build_scratch_cnn, last_conv_layer_name

    written_out = technique("06_evaluation")["gradcam_written_out"]
    images = np.random.default_rng(3).integers(0, 255, (3, 32, 32, 1)).astype("uint8")
    keras.utils.set_random_seed(classes)
    model = build_scratch_cnn((32, 32, 1), classes, images, filters=(8, 16), dense_units=8)
    layer = last_conv_layer_name(model)
    for image in images:
        np.testing.assert_allclose(written_out(model, image, layer),
                                   explain.gradcam(model, image[None], layer_name=layer)[0], atol=1e-4)


def test_tflite_written_out_matches_keras_and_medlab_export():
    from medlab.export import convert
    from medlab.models import build_scratch_cnn

    lesson = technique("07_tflite")
    images = np.random.default_rng(4).integers(0, 255, (5, 32, 32, 1)).astype("uint8")
    model = build_scratch_cnn((32, 32, 1), 4, images, filters=(8, 16), dense_units=8)
    with tempfile.TemporaryDirectory() as folder:
        tflite_bytes = lesson["tflite_written_out"](model, Path(folder) / "saved_model")
    ours = lesson["run_tflite_written_out"](tflite_bytes, images)
    np.testing.assert_allclose(ours, model.predict(images.astype("float32"), verbose=0), atol=1e-5)
    np.testing.assert_allclose(ours, lesson["run_tflite_written_out"](convert(model, "float32"), images), atol=1e-6)
