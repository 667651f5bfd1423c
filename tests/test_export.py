import json
import logging
import os

import keras
import numpy as np
import pytest

from medlab.data import load_dataset
from medlab.export import (
    VARIANTS,
    LiteModel,
    convert,
    cost_of_test_time_views,
    export_saved_model,
    export_variant,
    model_metadata,
    native_stderr_without,
    parity,
    strip_augmentation,
)
from medlab.models import build_scratch_cnn
from medlab.runs import RunFolder
from medlab.train import compile_model, predict


@pytest.fixture(scope="module")
def trained():
    data = load_dataset("synthetic", image_size=32, max_images_per_split=120, seed=0, progress=False)
    keras.utils.set_random_seed(0)
    model = compile_model(build_scratch_cnn((32, 32, 1), 2, data.train.images, filters=(8, 16), dense_units=8), 2,
                          learning_rate=3e-3)
    model.fit(data.train.images.astype("float32"), data.train.labels.astype("float32"), epochs=10, verbose=0)
    return model, data


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    model, data = trained
    folder = tmp_path_factory.mktemp("tflite")
    metadata = model_metadata(data.info.class_names, (32, 32, 1), 0.42, "scratch_cnn", pretrained=None)
    return {variant: export_variant(model, variant, folder / f"{variant}.tflite", metadata, data.train.images[:64])
            for variant in VARIANTS}


def test_all_four_variants_match_keras(trained, exported):
    model, data = trained
    reference = predict(model, data.test)
    sizes = {variant: lite.path.stat().st_size for variant, lite in exported.items()}
    assert sizes["float16"] < sizes["float32"] and sizes["dynamic_range"] < sizes["float32"]
    for variant, lite in exported.items():
        result = parity(reference, lite.predict(data.test.images, batch_size=50), data.test.labels, 0.42)
        tolerance = {"float32": 1e-5, "float16": 5e-3, "dynamic_range": 2e-2, "int8": 0.2}[variant]
        assert result["max_abs_probability_difference"] < tolerance, variant
        assert result["decision_agreement"] >= 0.95, variant


def test_an_export_does_not_log_its_temporary_folder(trained, tmp_path, caplog, monkeypatch):
    """TensorFlow's "Assets written to: /tmp/..." (INFO) is dropped by medlab's filter, even at INFO level."""
    model, _data = trained
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    with caplog.at_level(logging.INFO, logger="tensorflow"):  # the level TensorFlow sets in a Jupyter kernel
        export_saved_model(model, tmp_path / "saved_model")
    assert (tmp_path / "saved_model" / "saved_model.pb").exists()
    assert not [record for record in caplog.records if "Assets written" in record.getMessage()]


def test_the_converters_status_line_is_dropped_and_other_native_output_kept(trained, capfd):
    """The int8 converter echoes its settings from C++ on stderr ("fully_quantize: 0, ..."): medlab drops that
    line (and LiteRT's XNNPACK note); any other line written there meanwhile is kept, and when the block fails,
    every line is."""
    model, data = trained
    convert(model, "int8", data.train.images[:8])
    assert "fully_quantize" not in capfd.readouterr().err
    status = b"fully_quantize: 0, inference_type: 6, input_inference_type: UINT8, output_inference_type: UINT8\n"
    xnnpack = b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n"  # LiteRT, once per process
    with native_stderr_without():
        os.write(2, b"W0000 a warning worth reading\n" + status + xnnpack + b"and its second line\n")
    assert capfd.readouterr().err == "W0000 a warning worth reading\nand its second line\n"
    with pytest.raises(RuntimeError, match="planted"), native_stderr_without():
        os.write(2, status)
        raise RuntimeError("planted conversion failure")
    assert capfd.readouterr().err == status.decode()


def test_threads_holding_back_native_stderr_take_turns(capfd):
    """Two threads at once must not leave stderr pointing at one of their temporary files."""
    import threading
    import time

    before = os.fstat(2).st_ino
    barrier = threading.Barrier(2)

    def hold(index):
        barrier.wait()
        for _ in range(20):
            with native_stderr_without():
                os.write(2, f"thread {index}\n".encode())
                time.sleep(0.002)  # let the other thread in, if nothing stops it

    threads = [threading.Thread(target=hold, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert os.fstat(2).st_ino == before
    err = capfd.readouterr().err
    assert err.count("thread 0\n") == 20 and err.count("thread 1\n") == 20


def test_int8_model_is_fully_integer_with_uint8_io(exported):
    details = exported["int8"].io_details()
    assert details["input"]["dtype"] == "uint8" and details["output"]["dtype"] == "uint8"
    scale, zero_point = details["input"]["quantization"]
    assert 0 < scale <= 1.01 and zero_point == 0  # raw 0-255 pixels fit uint8
    # The int8 model outputs logits (finer than 256 probability levels); LiteModel applies the sigmoid.
    assert exported["int8"].metadata["output_activation"] == "sigmoid"
    assert exported["float32"].metadata["output_activation"] is None


def test_parity_check_catches_a_wrong_input_scale(trained, exported):
    model, data = trained
    reference = predict(model, data.test)
    # A client that scales pixels to [0, 1], as many tutorials do, although the model expects 0-255.
    wrongly_scaled = exported["int8"].predict(data.test.images / 255.0)
    result = parity(reference, wrongly_scaled, data.test.labels, 0.42)
    assert result["max_abs_probability_difference"] > 0.1 or result["decision_agreement"] < 0.9


def test_logit_model_keeps_the_ranking(trained):
    from medlab.export import logit_model

    model, data = trained
    logits, activation = logit_model(model)
    assert activation == "sigmoid"
    probabilities = predict(model, data.test)
    raw = logits.predict(data.test.images.astype("float32"), verbose=0)[:, 0]
    np.testing.assert_allclose(1 / (1 + np.exp(-raw)), probabilities, atol=1e-5)


def test_recall_drop_is_flagged():
    labels = np.array([1, 1, 1, 1, 0, 0])
    reference = np.array([0.9, 0.8, 0.7, 0.6, 0.2, 0.1])
    degraded = np.array([0.9, 0.8, 0.7, 0.4, 0.2, 0.1])
    assert parity(reference, degraded, labels, 0.5)["recall_drop_flag"] is True
    assert parity(reference, reference, labels, 0.5)["recall_drop_flag"] is False


def test_multiclass_parity_per_class():
    labels = np.array([0, 0, 1, 1, 2, 2])
    reference = np.eye(3)[[0, 0, 1, 1, 2, 0]] * 0.8 + 0.2 / 3  # Keras: one class-2 image taken for class 0
    candidate = np.eye(3)[[0, 0, 1, 2, 2, 0]] * 0.8 + 0.2 / 3  # the export also moves one class-1 image
    result = parity(reference, candidate, labels, None, class_names=["glioma", "meningioma", "notumor"])
    assert result["decision_agreement"] == pytest.approx(5 / 6)
    assert result["agreement_glioma"] == 1.0 and result["agreement_meningioma"] == 0.5
    assert result["agreement_notumor"] == 1.0
    assert result["recall"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert result["recall_change"] == pytest.approx(-0.5) and result["recall_drop_flag"] is True
    same = parity(reference, reference, labels, None)
    assert same["recall_drop_flag"] is False and same["agreement_2"] == 1.0


def test_metadata_round_trips(exported):
    lite = LiteModel.load(exported["int8"].path)
    sidecar = json.loads(lite.path.with_suffix(".json").read_text())
    assert sidecar == lite.metadata
    assert lite.metadata["class_names"] == ["normal", "pneumonia"] and lite.metadata["threshold"] == 0.42
    assert lite.metadata["preprocessing"]["height"] == 32 and lite.metadata["variant"] == "int8"
    assert lite.metadata["io"]["input"]["dtype"] == "uint8"
    with pytest.raises(ValueError, match="expects images of shape"):
        lite.predict(np.zeros((2, 16, 16, 1)))


def test_augmentation_layers_are_stripped_and_int8_needs_data(trained):
    model, _data = trained
    inputs = keras.Input((32, 32, 1))
    augmented = keras.Model(inputs, model(keras.layers.RandomFlip(seed=0)(inputs)))
    stripped = strip_augmentation(augmented)
    assert not any(type(layer).__name__.startswith("Random") for layer in stripped.layers)
    batch = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 1)).astype("float32")
    np.testing.assert_allclose(stripped.predict(batch, verbose=0), model.predict(batch, verbose=0), atol=1e-6)
    with pytest.raises(ValueError, match="representative"):
        convert(model, "int8")


def test_variants_from_one_shared_export_are_the_files_a_fresh_export_gives(trained, tmp_path):
    from medlab.export import export_saved_model

    model, data = trained
    shared = export_saved_model(model, tmp_path / "saved")
    for variant in ("float32", "dynamic_range"):
        assert convert(model, variant, saved_model=shared) == convert(model, variant), variant


def test_compare_variants_table(trained, tmp_path):
    from medlab.export import compare_variants

    model, data = trained
    keras_file = tmp_path / "best.keras"
    model.save(keras_file)
    metadata = model_metadata(data.info.class_names, (32, 32, 1), 0.42, "scratch_cnn")
    table = compare_variants(model, keras_file, data.test.images, data.test.labels, RunFolder(tmp_path), "m",
                             metadata, data.train.images[:32], 0.42, latency_repeats=3)
    assert list(table.index) == ["keras", *VARIANTS]
    # A tiny model is mostly file overhead; on the real scratch CNN int8 is about 28% of float32.
    assert table.loc["float32", "size_vs_float32"] == 1.0 and table.loc["int8", "size_vs_float32"] < 1.0
    assert table.loc["keras", "decision_agreement"] == 1.0 and table["latency_ms"].min() > 0
    assert sorted(p.name for p in (tmp_path / "tflite").glob("*.tflite")) == sorted(f"m_{v}.tflite" for v in VARIANTS)


def test_logit_model_of_an_averaged_model(trained):
    from medlab.export import logit_model
    from medlab.models import average_models

    model, data = trained
    averaged = average_models([model, model])
    logits, activation = logit_model(averaged)
    assert activation == "sigmoid"
    raw = logits.predict(data.test.images.astype("float32"), verbose=0)[:, 0]
    np.testing.assert_allclose(1 / (1 + np.exp(-raw)), predict(model, data.test), atol=1e-5)


def test_a_model_with_test_time_views_exports_with_builtin_ops(trained, tmp_path):
    """Mirror and rolls are flips, slices and concatenations: float32 and int8 LiteRT models match Keras."""
    from medlab.models import average_models, test_time_views

    model, data = trained
    viewed = average_models([model], name="scratch_cnn", views=test_time_views((32, 32, 1)))
    reference = predict(viewed, data.test)
    assert not np.allclose(reference, predict(model, data.test), atol=1e-4)
    metadata = model_metadata(data.info.class_names, (32, 32, 1), 0.5, "scratch_cnn", pretrained=None)
    run = RunFolder(tmp_path / "run")
    for variant, tolerance in (("float32", 1e-5), ("int8", 0.2)):
        lite = export_variant(viewed, variant, run.tflite("scratch_cnn", variant), metadata, data.train.images[:64])
        result = parity(reference, lite.predict(data.test.images, batch_size=50), data.test.labels, 0.5)
        assert result["max_abs_probability_difference"] < tolerance, variant

    # Lesson 07's price of the views: the kept files timed beside the single-view model, converted on the side.
    folder = run.model("scratch_cnn").create()
    assert cost_of_test_time_views(run, "scratch_cnn", data.test.images[0], metadata, data.train.images[:64]).empty
    model.save(folder.single_view_checkpoint)
    with pytest.raises(ValueError, match="does not record the test-time views"):
        cost_of_test_time_views(run, "scratch_cnn", data.test.images[0], metadata, data.train.images[:64])
    decision = {"views": [list(view) for view in test_time_views((32, 32, 1))], "val_auc_single_view": 0.91,
                "val_auc_with_views": 0.93, "kept": True}
    folder.training.write_text(json.dumps({"epochs_run": 3, "test_time_views": decision}))
    table = cost_of_test_time_views(run, "scratch_cnn", data.test.images[0], metadata, data.train.images[:64],
                                    repeats=3)
    assert list(table.index) == ["scratch_cnn with 6 views (kept)", "scratch_cnn, single view"]
    assert table["views"].tolist() == [6, 1] and table["validation_auc"].tolist() == [0.93, 0.91]
    assert (table[["float32_ms", "int8_ms"]] > 0).all().all()
    assert sorted(path.name for path in run.tflite_dir.iterdir()) == [
        "scratch_cnn_float32.json", "scratch_cnn_float32.tflite", "scratch_cnn_int8.json", "scratch_cnn_int8.tflite"]
    run.tflite("scratch_cnn", "int8").unlink()
    with pytest.raises(FileNotFoundError, match="scratch_cnn_int8.tflite"):
        cost_of_test_time_views(run, "scratch_cnn", data.test.images[0], metadata, data.train.images[:64])


def test_builtin_kernels_give_the_same_outputs_and_a_latency_table(trained, exported):
    """Without the XNNPACK delegate the same file gives the same numbers (only speed may differ)."""
    from medlab.export import cpu_int8_features, latency_table

    _model, data = trained
    for variant in ("float32", "int8"):
        lite = exported[variant]
        batch = lite._quantize(data.test.images[:4].astype(np.float32), lite._interpreter(4).get_input_details()[0])
        outputs = []
        for xnnpack in (True, False):
            interpreter = lite._interpreter(4, xnnpack)
            detail = interpreter.get_input_details()[0]
            interpreter.set_tensor(detail["index"], batch)
            interpreter.invoke()
            outputs.append(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).astype(float))
        # int8: XNNPACK and the built-in kernels round each layer's requantisation their own way, which can add
        # up to a few output steps (2 seen after a retrained fixture); a wrong kernel would be far off.
        np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-4 if variant == "float32" else 3.0)
    table = latency_table({"float32": exported["float32"], "int8": exported["int8"]}, data.test.images[0], repeats=3)
    assert list(table.index) == ["float32", "int8"] and (table.iloc[:, :2] > 0).all().all()
    assert table.loc["float32", "vs float32 with XNNPACK"] == pytest.approx(1.0)
    features = cpu_int8_features()
    assert features is None or isinstance(features, list)
