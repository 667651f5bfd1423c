import contextlib
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from conftest import needs_bfloat16

from medlab.augment import build_augmentation
from medlab.data import load_dataset
from medlab.models import build_scratch_cnn
from medlab.train import (
    PreciseBatchNorm,
    TrainConfig,
    compile_model,
    get_strategy,
    make_callbacks,
    one_call_per_epoch,
    set_determinism,
    summarise_model,
    train_model,
)


@pytest.fixture(scope="module")
def tiny():
    return load_dataset("synthetic", image_size=32, max_images_per_split=48, seed=0, progress=False)


def _one_epoch(dataset, folder, seed=0):
    set_determinism(seed)
    model = build_scratch_cnn((32, 32, 1), 2, dataset.train.images, filters=(8, 16), dense_units=8)
    compile_model(model, 2, 1e-3)
    history = train_model(model, dataset, folder, TrainConfig(max_epochs=1, batch_size=16, seed=seed),
                          augmentation=build_augmentation(seed=seed), verbose=0)
    return model, history


def test_two_runs_with_the_same_seed_give_the_same_weights(tiny, tmp_path):
    first, history_one = _one_epoch(tiny, tmp_path / "one")
    second, history_two = _one_epoch(tiny, tmp_path / "two")
    for a, b in zip(first.get_weights(), second.get_weights()):
        np.testing.assert_array_equal(a, b)
    pd.testing.assert_frame_equal(history_one, history_two)
    third, _ = _one_epoch(tiny, tmp_path / "three", seed=1)
    assert not all(np.array_equal(a, b) for a, b in zip(first.get_weights(), third.get_weights()))


def test_medlab_run_eagerly_trains_op_by_op_to_the_same_weights(tiny, tmp_path, monkeypatch):
    traced, traced_history = _one_epoch(tiny, tmp_path / "traced")
    assert not traced.run_eagerly
    monkeypatch.setenv("MEDLAB_RUN_EAGERLY", "1")  # what make test's notebook runs set
    eager, eager_history = _one_epoch(tiny, tmp_path / "eager")
    assert eager.run_eagerly
    for a, b in zip(traced.get_weights(), eager.get_weights()):  # precise BatchNorm's statistics included
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    pd.testing.assert_frame_equal(traced_history, eager_history, rtol=1e-5)
    monkeypatch.setenv("MEDLAB_RUN_EAGERLY", "yes")
    with pytest.raises(ValueError, match="MEDLAB_RUN_EAGERLY must be 0 or 1"):
        compile_model(traced, 2)


def test_set_determinism_switches_grappler_off_on_a_cpu_only(monkeypatch):
    from medlab.train import skip_graph_rewrites_on_cpu

    before = tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer", False)
    try:
        for gpus, switched_off in (([], True), (["GPU:0"], False)):
            tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": False})
            monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None, gpus=gpus: gpus)
            set_determinism(0)
            assert tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer", False) is switched_off
            assert skip_graph_rewrites_on_cpu() is switched_off
    finally:
        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": before})


def test_training_writes_checkpoint_history_and_summary(tiny, tmp_path):
    _model, history = _one_epoch(tiny, tmp_path)
    assert {"loss", "val_loss", "val_auc", "val_recall", "val_accuracy"} <= set(history.columns)
    assert "val_pr_auc" not in history  # the full metric set is computed once, in lesson 06
    assert (tmp_path / "best.keras").exists() and (tmp_path / "history.csv").exists()
    training = json.loads((tmp_path / "training.json").read_text())
    assert training["epochs_run"] == 1 and training["class_weight"]["0"] > training["class_weight"]["1"]
    summary = summarise_model(tmp_path, tiny, {"pretrained": False})
    assert 0.0 <= summary["val_auc"] <= 1.0 and summary["pretrained"] is False
    predictions = pd.read_csv(tmp_path / "predictions_test.csv")
    assert list(predictions.columns) == ["id", "label", "p_normal", "p_pneumonia"]
    assert len(predictions) == 48
    np.testing.assert_allclose(predictions["p_normal"] + predictions["p_pneumonia"], 1.0, atol=1e-5)


class BatchEnds(keras.callbacks.Callback):
    """Counts the returns to Python during training (Keras calls on_train_batch_end after each call)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def on_train_batch_end(self, batch, logs=None):
        self.count += 1


@pytest.mark.parametrize("epochs", [1, 3])
def test_one_call_per_epoch_trains_the_same_weights_without_overrunning_an_epoch(tiny, epochs):
    from medlab.data import make_tf_dataset

    steps = 3  # 48 training images in batches of 16
    trained = []
    for per_epoch in (False, True):
        set_determinism(0)
        model = compile_model(build_scratch_cnn((32, 32, 1), 2, tiny.train.images, filters=(8, 16), dense_units=8), 2)
        data = make_tf_dataset(tiny.train, 2, 16, shuffle=True, seed=0, augmentation=build_augmentation(seed=0),
                               repeat=True)
        calls = BatchEnds()
        with one_call_per_epoch(model, steps) if per_epoch else contextlib.nullcontext():
            history = model.fit(data, validation_data=make_tf_dataset(tiny.val, 2, 16), epochs=epochs,
                                steps_per_epoch=steps, callbacks=[calls], verbose=0)
        assert model.steps_per_execution == 1  # as before, for what comes next
        assert calls.count == (epochs if per_epoch else epochs * steps)
        assert int(model.optimizer.iterations.numpy()) == epochs * steps  # exactly the epoch's steps, no more
        trained.append((model.get_weights(), history.history))
    for ours, theirs in zip(trained[0][0], trained[1][0]):
        np.testing.assert_array_equal(ours, theirs)  # the same ops in the same order: bit for bit
    assert trained[0][1] == trained[1][1]
    with pytest.raises(ValueError, match="steps_per_epoch"):
        with one_call_per_epoch(model, 0):
            pass


def test_train_model_runs_each_epoch_in_one_call(tiny, tmp_path):
    set_determinism(0)
    model = compile_model(build_scratch_cnn((32, 32, 1), 2, tiny.train.images, filters=(8, 16), dense_units=8), 2)
    calls = BatchEnds()
    history = train_model(model, tiny, tmp_path, TrainConfig(max_epochs=2, batch_size=16), verbose=0, callbacks=[calls])
    assert calls.count == len(history) == 2
    assert int(model.optimizer.iterations.numpy()) == 2 * 3


def test_callbacks_are_wired_as_documented(tmp_path):
    precise, checkpoint, early, reduce, logger = make_callbacks(tmp_path, TrainConfig(monitor="auc"), np.zeros((4, 8, 8, 1)))
    assert isinstance(precise, PreciseBatchNorm)
    assert isinstance(checkpoint, keras.callbacks.ModelCheckpoint)
    assert checkpoint.monitor == "val_auc" and checkpoint.save_best_only and str(checkpoint.filepath).endswith(".keras")
    assert early.monitor == "val_loss" and early.restore_best_weights
    assert isinstance(reduce, keras.callbacks.ReduceLROnPlateau) and reduce.monitor == "val_loss"
    assert isinstance(logger, keras.callbacks.CSVLogger)


def test_multiclass_compiles_with_categorical_loss():
    model = compile_model(build_scratch_cnn((32, 32, 1), 4, filters=(8,)), 4)
    assert model.loss == "categorical_crossentropy"
    with pytest.raises(ValueError):
        compile_model(model, 4, learning_rate=0)
    with pytest.raises(ValueError):
        get_strategy("bogus")


def test_compile_model_makes_adams_slots_before_any_step():
    """Built at compile time, not inside the first traced train step (where Keras makes them, slowly)."""
    model = compile_model(build_scratch_cnn((32, 32, 1), 2, filters=(8,)), 2)
    optimizer = model.optimizer
    assert optimizer.built and int(optimizer.iterations.numpy()) == 0
    slots = [optimizer._momentums, optimizer._velocities]
    assert [len(slot) for slot in slots] == [len(model.trainable_variables)] * 2
    assert [tuple(v.shape) for v in optimizer._momentums] == [tuple(v.shape) for v in model.trainable_variables]


def test_mirrored_strategy_on_two_logical_cpus(tmp_path):
    script = textwrap.dedent("""
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from medlab.data import load_dataset
        from medlab.models import build_scratch_cnn
        from medlab.train import TrainConfig, compile_model, get_strategy, train_model
        data = load_dataset("synthetic", image_size=32, max_images_per_split=32, progress=False)
        strategy = get_strategy("mirrored")
        with strategy.scope():
            model = compile_model(build_scratch_cnn((32, 32, 1), 2, data.train.images, filters=(8,)), 2)
        history = train_model(model, data, r"MODEL_DIR", TrainConfig(max_epochs=1, batch_size=16), verbose=0)
        print("REPLICAS", strategy.num_replicas_in_sync, "EPOCHS", len(history))
    """).replace("MODEL_DIR", str(tmp_path))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "REPLICAS 2 EPOCHS 1" in result.stdout, result.stderr[-2000:]


def test_importing_medlab_asks_tensorflow_for_onednn_unless_told_not_to():
    from medlab.train import onednn_enabled

    script = "import os, medlab; print('ONEDNN', os.environ['TF_ENABLE_ONEDNN_OPTS'])"
    for setting, expected in ((None, "1"), ("0", "0")):  # a user's own setting wins
        env = {name: value for name, value in os.environ.items() if name != "TF_ENABLE_ONEDNN_OPTS"}
        if setting is not None:
            env["TF_ENABLE_ONEDNN_OPTS"] = setting
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
        assert f"ONEDNN {expected}" in result.stdout, (setting, result.stderr[-2000:])
    # and TensorFlow, loaded in this process after medlab (conftest.py), follows the setting
    assert onednn_enabled() is (os.environ["TF_ENABLE_ONEDNN_OPTS"] == "1")


@pytest.mark.parametrize("batchnorm", ["fused", "keras"])
def test_precise_batchnorm_sets_statistics_of_the_training_batches(batchnorm):
    from medlab.models import FusedBatchNormalization, clone_with_weights

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(32, 16, 16, 1)).astype("float32")
    model = build_scratch_cnn((16, 16, 1), 2, images, filters=(4, 8), dense_units=8, dropout=0.5)
    if batchnorm == "keras":
        model = clone_with_weights(model, lambda layer: (
            keras.layers.BatchNormalization if isinstance(layer, FusedBatchNormalization) else type(layer)
        ).from_config(layer.get_config()))
    assert all(type(layer) is keras.layers.BatchNormalization for layer in model.layers
               if isinstance(layer, keras.layers.BatchNormalization)) is (batchnorm == "keras")
    model(images[:8], training=True)  # moving statistics now far from the data's
    dropout_state = model.get_layer("head_dropout").seed_generator.state.numpy().copy()
    precise = PreciseBatchNorm(images, batch_size=32, max_batches=1, seed=0)  # one batch: all 32 images
    precise.set_model(model)
    precise.recalibrate()
    assert [layer.momentum for layer in model.layers if "bn" in layer.name] == [0.9] * 3  # restored
    # the head's dropout, after the last batch norm, did not run: training draws the same masks as without
    np.testing.assert_array_equal(model.get_layer("head_dropout").seed_generator.state.numpy(), dropout_state)
    model.get_layer("head_dropout").rate = 0.0
    # With the statistics of exactly this batch, inference mode reproduces training mode on it.
    np.testing.assert_allclose(model(images, training=False), model(images, training=True), atol=1e-4)

    # Several batches: the moving mean is the average of the per-batch means.
    first_bn = model.get_layer("block1_bn")
    conv_inputs = keras.Model(model.input, first_bn.input)
    precise = PreciseBatchNorm(images, batch_size=8, max_batches=4, seed=0)
    precise.set_model(model)
    precise.recalibrate()
    batch_means = [np.asarray(conv_inputs(batch)).mean(axis=(0, 1, 2)) for batch in precise.batches]
    np.testing.assert_allclose(first_bn.moving_mean.numpy(), np.mean(batch_means, axis=0), rtol=1e-4, atol=1e-4)
    batch_variances = [np.asarray(conv_inputs(batch)).var(axis=(0, 1, 2)) for batch in precise.batches]
    np.testing.assert_allclose(first_bn.moving_variance.numpy(), np.mean(batch_variances, axis=0), rtol=1e-3, atol=1e-4)


def test_train_members_saves_one_averaged_model(tiny, tmp_path):
    from medlab.train import member_seeds, train_members

    assert member_seeds(5, 3) == [5, 1005, 2005]
    with pytest.raises(ValueError):
        member_seeds(5, 0)
    built = []

    def build_model():
        built.append(1)
        return compile_model(build_scratch_cnn((32, 32, 1), 2, tiny.train.images, filters=(4,), dense_units=4), 2)

    history = train_members(build_model, tiny, tmp_path, TrainConfig(max_epochs=1, batch_size=16, seed=5), members=2,
                            augmentation=lambda seed: build_augmentation(seed=seed), verbose=0)
    assert len(built) == 2 and sorted(history["member"].unique()) == [5, 1005]
    assert (tmp_path / "members" / "seed5" / "best.keras").exists()
    assert (tmp_path / "members" / "seed1005" / "best.keras").exists()
    averaged = keras.saving.load_model(tmp_path / "best.keras")
    assert averaged.name == "scratch_cnn" and averaged.layers[-1].name == "medlab_output"
    training = json.loads((tmp_path / "training.json").read_text())
    assert training["member_seeds"] == [5, 1005] and training["epochs_run"] == 2
    assert training["train_seconds"] == pytest.approx(sum(m["train_seconds"] for m in training["members"]), abs=0.2)
    # The saved model is the members' average: its predictions are the mean of their logits.
    images = tiny.val.images.astype("float32")
    member_logits = []
    for seed in (5, 1005):
        probabilities = keras.saving.load_model(tmp_path / "members" / f"seed{seed}" / "best.keras").predict(
            images, verbose=0)[:, 0].astype("float64")
        member_logits.append(np.log(probabilities / (1 - probabilities)))
    expected = 1 / (1 + np.exp(-np.mean(member_logits, axis=0)))
    np.testing.assert_allclose(averaged.predict(images, verbose=0)[:, 0], expected, atol=1e-4)
    summarise_model(tmp_path, tiny)
    saved = pd.read_csv(tmp_path / "predictions_val.csv")["p_pneumonia"].to_numpy()
    np.testing.assert_allclose(saved, expected, atol=1e-4)


def test_test_time_views_are_kept_only_when_validation_auc_rises(tiny, tmp_path, monkeypatch):
    from medlab import train
    from medlab.runs import ModelFolder
    from medlab.train import train_members

    def build_model():
        return compile_model(build_scratch_cnn((32, 32, 1), 2, tiny.train.images, filters=(4,), dense_units=4), 2)

    config = TrainConfig(max_epochs=1, batch_size=16, seed=3)
    train_members(build_model, tiny, tmp_path / "plain", config, verbose=0)
    train_members(build_model, tiny, tmp_path / "viewed", config, verbose=0, test_time_views=True)
    folder = ModelFolder(tmp_path / "viewed")
    decision = json.loads(folder.training.read_text())["test_time_views"]
    assert len(decision["views"]) == 6 and decision["kept"] == (
        decision["val_auc_with_views"] > decision["val_auc_single_view"])
    plain = keras.saving.load_model(tmp_path / "plain" / "best.keras")
    saved = keras.saving.load_model(folder.checkpoint)
    images = tiny.val.images.astype("float32")
    if decision["kept"]:
        assert len(saved.layers) > len(plain.layers) and folder.single_view_checkpoint.exists()
        single = keras.saving.load_model(folder.single_view_checkpoint)
        np.testing.assert_allclose(single.predict(images, verbose=0), plain.predict(images, verbose=0), atol=1e-5)
    else:
        assert not folder.single_view_checkpoint.exists()
        np.testing.assert_allclose(saved.predict(images, verbose=0), plain.predict(images, verbose=0), atol=1e-5)
    # Both outcomes on purpose: validation decides, so a rigged AUC flips the decision.
    for single_wins in (True, False):
        aucs = iter([0.9, 0.8] if single_wins else [0.8, 0.9])
        monkeypatch.setattr(train, "evaluate_auc", lambda labels, probabilities, aucs=aucs: next(aucs))
        trained = [keras.saving.load_model(tmp_path / "plain" / "best.keras")]
        forced = ModelFolder(tmp_path / f"forced{single_wins}").create()
        plain.save(forced.checkpoint)
        assert train.keep_better_on_validation(forced, tiny, trained)["kept"] is not single_wins
        assert forced.single_view_checkpoint.exists() is not single_wins
        assert (len(keras.saving.load_model(forced.checkpoint).layers) == len(plain.layers)) is single_wins


def test_default_members_depends_on_image_size():
    from medlab.train import default_members

    assert default_members((28, 28, 1)) == 3 and default_members((64, 64, 1)) == 1


def test_frozen_head_trains_on_cached_features_and_saves_one_model(tiny, tmp_path):
    """Lesson 04 with (planted) pretrained weights: features once, head trained, one flat model saved."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    from medlab.models import build_transfer_model
    from medlab.train import feature_extractor, frozen_features, train_frozen_head

    keras.utils.set_random_seed(7)
    planted = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3))
    weights_file = tmp_path / "mobilenet_v2_planted.h5"
    with h5py.File(weights_file, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, planted)
    set_determinism(0)
    model, info = build_transfer_model((32, 32, 1), 2, weights=str(weights_file), backbone_size=32)
    assert info.pretrained and info.frozen
    compile_model(model, 2)
    backbone_before = model.get_layer("Conv1").get_weights()[0].copy()
    history = train_frozen_head(model, tiny, tmp_path / "transfer", TrainConfig(max_epochs=3, batch_size=16),
                                augmentation=build_augmentation(seed=0), augmented_copies=2, verbose=0)
    assert len(history) == 3 and "val_auc" in history
    training = json.loads((tmp_path / "transfer" / "training.json").read_text())
    assert training["head_on_cached_features"] and training["augmented_copies"] == 2
    saved = keras.saving.load_model(tmp_path / "transfer" / "best.keras")
    assert saved.name == model.name and len(saved.layers) == len(model.layers)  # the whole flat model
    np.testing.assert_array_equal(saved.get_layer("Conv1").get_weights()[0], backbone_before)  # backbone untouched
    # The saved model predicts what the cached features and the head predict.
    features = frozen_features(feature_extractor(saved), tiny.test.images)
    output = saved.get_layer("medlab_output")
    expected = features @ output.get_weights()[0] + output.get_weights()[1]
    expected = 1 / (1 + np.exp(-expected[:, 0]))
    np.testing.assert_allclose(saved.predict(tiny.test.images.astype("float32"), verbose=0)[:, 0], expected,
                               rtol=1e-4, atol=1e-5)
    # and its head is the best checkpointed epoch's: its validation AUC is the one the checkpoint recorded
    from sklearn.metrics import roc_auc_score

    val_auc = roc_auc_score(tiny.val.labels, saved.predict(tiny.val.images.astype("float32"), verbose=0)[:, 0])
    assert val_auc == pytest.approx(training["best_val_auc"], abs=0.02)
    with pytest.raises(ValueError, match="frozen backbone"):
        unfrozen, _ = build_transfer_model((32, 32, 1), 2, weights=None, backbone_size=32)
        train_frozen_head(unfrozen, tiny, tmp_path / "x", TrainConfig(max_epochs=1))


def test_bfloat16_is_chosen_only_when_asked_for_on_a_cpu_with_bfloat16_arithmetic(monkeypatch):
    from medlab import config
    from medlab.train import set_mixed_precision

    try:
        for flags, requested, cpu_bfloat16, policy in (
                ({"avx512f", "amx_bf16"}, True, True, "mixed_bfloat16"),
                ({"avx512f", "amx_bf16"}, True, False, "float32"),  # lessons 04-05: MobileNetV2 is slower in it
                ({"avx512f", "amx_bf16"}, False, True, "float32"),
                ({"avx512f", "avx512_bf16"}, True, True, "mixed_bfloat16"),  # AVX512-BF16 (AMD Zen 4 and later)
                ({"avx512f", "avx512_vnni"}, True, True, "float32"),  # AVX-512 without bfloat16 instructions
                (None, True, True, "float32")):  # flags unknown (not Linux)
            monkeypatch.setattr(config, "cpu_flags", lambda flags=flags: flags)
            assert set_mixed_precision(requested, cpu_bfloat16=cpu_bfloat16) == policy
            assert keras.mixed_precision.global_policy().name == policy
    finally:
        keras.mixed_precision.set_global_policy("float32")


@needs_bfloat16
def test_a_model_trained_in_bfloat16_is_saved_in_float32(tiny, tmp_path):
    from medlab.models import load_model

    keras.mixed_precision.set_global_policy("mixed_bfloat16")  # what lesson 03 gets on a CPU with bfloat16 instructions
    try:
        model, _history = _one_epoch(tiny, tmp_path / "half")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.get_layer("block1_conv").compute_dtype == "bfloat16"
    saved = load_model(tmp_path / "half" / "best.keras")
    assert {layer.compute_dtype for layer in saved.layers} == {"float32"}
    assert json.loads((tmp_path / "half" / "training.json").read_text())["devices"]["precision"] == "mixed_bfloat16"
    images = tiny.val.images.astype("float32")
    np.testing.assert_allclose(saved.predict(images, verbose=0), model.predict(images, verbose=0), atol=0.03)
    for trained, kept in zip(model.get_weights(), saved.get_weights()):
        np.testing.assert_array_equal(trained, kept)  # restore_best_weights: the checkpoint's epoch


def test_mixed_precision_is_float32_on_a_cpu_and_outputs_stay_float32():
    import tensorflow as tf

    from medlab.models import build_scratch_cnn
    from medlab.train import compile_model, devices_used, set_mixed_precision

    assert not tf.config.list_logical_devices("GPU")  # these machines have none
    images = np.random.default_rng(0).integers(0, 255, (16, 16, 16, 1)).astype("uint8")
    labels = np.arange(16) % 2
    try:
        assert set_mixed_precision(True) == "float32"  # requested, but no GPU (and bfloat16 not asked for): float32
        assert devices_used()["gpus"] == [] and devices_used()["precision"] == "float32"
        model = compile_model(build_scratch_cnn((16, 16, 1), 2, images, filters=(4,), dense_units=4), 2)
        model.fit(images.astype("float32"), labels.astype("float32"), epochs=1, verbose=0)
        assert all(weight.dtype == "float32" for weight in model.trainable_weights)
        keras.mixed_precision.set_global_policy("mixed_float16")  # what a GPU machine gets
        mixed = build_scratch_cnn((16, 16, 1), 4, images, filters=(4,), dense_units=4)
        assert mixed.get_layer("block1_conv").compute_dtype == "float16"
        assert mixed(images[:2].astype("float32")).dtype == "float32"  # the softmax stays float32
    finally:
        keras.mixed_precision.set_global_policy("float32")
