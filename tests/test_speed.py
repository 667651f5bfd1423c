import json

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import needs_bfloat16

from medlab import speed
from medlab.models import build_scratch_cnn, global_dtype_policy
from medlab.train import onednn_enabled


def test_forward_flops_counts_convolutions_and_dense_layers():
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)  # 2 * 9 * 2 * 4 * 64 = 9216
    x = keras.layers.DepthwiseConv2D(3, strides=2, padding="same")(x)  # 2 * 9 * 4 * 16 = 1152
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3)(x)  # 2 * 4 * 3 = 24
    assert speed.forward_flops(keras.Model(inputs, outputs)) == 9216 + 1152 + 24


def test_scratch_cnn_flops_match_the_arithmetic():
    model = build_scratch_cnn((64, 64, 1), 2)
    expected = 2 * 9 * (64 * 64 * 1 * 32 + 32 * 32 * 32 * 64 + 16 * 16 * 64 * 128) + 2 * (128 * 128 + 128 * 1)
    assert speed.forward_flops(model) == expected


def test_rate_is_the_best_of_its_trials():
    import time

    pauses = iter([0.0, 0.3, 0.005, 0.3])  # warm-up, then three trials of one call: the second is fast

    def step():
        time.sleep(next(pauses))
        return 1.0

    assert 1 / 0.15 < speed._rate(step, 1.0, repeats=1, trials=3) <= 1 / 0.005  # a mean would be below 1 / 0.2


def test_attainable_rates_measure_bfloat16_only_when_asked():
    float32_only = speed.attainable_rates(repeats=1, batch_size=2, bfloat16=False)
    assert set(float32_only) == {"matmul_2048_gflops", "conv2d_train_gflops", "attainable_conv2d_gflops"}
    assert float32_only["attainable_conv2d_gflops"] == max(float32_only["conv2d_train_gflops"].values()) > 0
    both = speed.attainable_rates(repeats=1, batch_size=2)
    assert set(both["conv2d_train_gflops_bfloat16"]) == set(both["conv2d_train_gflops"])
    assert both["attainable_conv2d_gflops_bfloat16"] > 0


def test_conv_probe_returns_its_forward_pass_so_it_is_run():
    import tensorflow as tf

    rng = np.random.default_rng(0)
    inputs = tf.constant(rng.normal(size=(2, 6, 6, 3)), tf.float32)
    kernel = tf.constant(rng.normal(size=(3, 3, 3, 4)), tf.float32)
    forward = float(tf.reduce_sum(tf.nn.conv2d(inputs, kernel, 1, "SAME")))
    with tf.GradientTape() as tape:
        tape.watch([inputs, kernel])
        loss = tf.reduce_sum(tf.nn.conv2d(inputs, kernel, 1, "SAME"))
    gradients = sum(float(tf.reduce_sum(g)) for g in tape.gradient(loss, [inputs, kernel]))
    result = float(tf.function(speed.conv_training_pass)(inputs, kernel))
    # a result without the forward output would let TensorFlow skip that convolution (its gradient is all ones)
    assert abs(forward) > 1.0
    assert result == pytest.approx(forward + gradients, rel=1e-5)


@pytest.mark.parametrize("switched_off", ["fused_batchnorm", "determinism"])
def test_measure_training_runs_each_variant(switched_off, recwarn):
    build, side, channels = speed.lesson_models()["scratch_cnn_28px"]
    rate = speed.measure_training(build, side, channels, switched_off=switched_off, train_images=32, val_images=16,
                                  batch_size=16, epochs=1)
    assert rate > 0
    # fit is told the tf.data pipeline shuffles (as train_model tells it): no warning on the bench's terminal
    assert not [warning for warning in recwarn if "shuffle=True" in str(warning.message)]
    from tensorflow.python.framework import config as tf_config

    assert tf_config.is_op_determinism_enabled()  # switched back on for everything after


@pytest.mark.parametrize("precision", ["float32", pytest.param("mixed_bfloat16", marks=needs_bfloat16)])
def test_measure_step_times_a_training_step_that_learns(precision):
    build, side, channels = speed.lesson_models()["scratch_cnn_28px"]
    calls = []

    def recording_build(images, fused):
        calls.append(build(images, fused))
        return calls[-1]

    with global_dtype_policy("mixed_float16"):  # the caller's policy, whatever it is, comes back afterwards
        rate = speed.measure_step(recording_build, side, channels, batch_size=8, repeats=2, precision=precision)
        assert keras.mixed_precision.global_policy().name == "mixed_float16"
    assert rate > 0
    model = calls[0]
    assert int(model.optimizer.iterations.numpy()) == 1 + 2  # traced once, then timed: the weights moved
    assert model.get_layer("block1_conv").compute_dtype == ("float32" if precision == "float32" else "bfloat16")


def test_measure_training_trains_once_per_trial():
    build, side, channels = speed.lesson_models()["scratch_cnn_28px"]
    models = []

    def recording_build(images, fused):
        models.append(build(images, fused))
        return models[-1]

    rate = speed.measure_training(recording_build, side, channels, train_images=32, val_images=16, batch_size=16,
                                  epochs=1, trials=2)
    assert rate > 0
    assert int(models[0].optimizer.iterations.numpy()) == 2 + 2 * 1 * 2  # warm-up, then 2 trials of 1 epoch of 2 steps


def test_measure_training_refuses_unknown_overheads():
    build, side, channels = speed.lesson_models()["scratch_cnn_28px"]
    with pytest.raises(ValueError, match="switched_off"):
        speed.measure_training(build, side, channels, switched_off="coffee")


def test_keras_batchnorm_reference_has_no_fused_layers():
    from medlab.models import FusedBatchNormalization

    build, side, _channels = speed.lesson_models()["scratch_cnn_28px"]
    images = np.zeros((2, side, side, 1), np.uint8)
    assert any(isinstance(layer, FusedBatchNormalization) for layer in build(images, True).layers)
    assert not any(isinstance(layer, FusedBatchNormalization) for layer in build(images, False).layers)


def test_each_row_is_set_against_the_conv_rate_measured_next_to_it(monkeypatch, capsys):
    import medlab.train

    conv = iter([100.0, 150.0, 200.0, 180.0])  # before and after the first row, then the second's
    monkeypatch.setattr(speed, "conv_rates", lambda precision="float32": {"32px_32to64": next(conv)})
    monkeypatch.setattr(speed, "attainable_rates", lambda bfloat16: {
        "matmul_2048_gflops": 90.0, "conv2d_train_gflops": {"32px_32to64": 120.0}, "attainable_conv2d_gflops": 120.0})
    monkeypatch.setattr(medlab.train, "cpu_trains_bfloat16", lambda: False)
    models = speed.lesson_models()
    monkeypatch.setattr(speed, "lesson_models", lambda: {name: models[name] for name in
                                                         ("scratch_cnn_28px", "scratch_cnn_64px")})
    monkeypatch.setattr(speed, "measure_training", lambda *args, **kwargs: 1000.0)
    monkeypatch.setattr(speed, "measure_step", lambda *args, **kwargs: 2000.0)
    monkeypatch.setattr(speed, "kernel_breakdown", lambda name, precision: pytest.fail("kernels=False measures none"))
    rows = speed.speed_benchmark(overheads=False, kernels=False)["models"]
    progress = capsys.readouterr().err.splitlines()  # 15 minutes of work should say where it is
    assert progress == ["[medlab] timing the attainable rates: a matmul and 3x3 convolutions ...",
                        "[medlab] timing scratch_cnn_28px: training epochs, the bare step ...",
                        "[medlab] timing scratch_cnn_64px: training epochs, the bare step ..."]
    first, second = rows["scratch_cnn_28px"], rows["scratch_cnn_64px"]
    assert first["conv2d_gflops_before_and_after"] == [100.0, 150.0]
    assert first["percent_of_attainable"] == pytest.approx(100 * first["achieved_gflops"] / 150.0, abs=0.1)
    assert first["percent_of_first_attainable"] == pytest.approx(100 * first["achieved_gflops"] / 120.0, abs=0.1)
    assert first["step_percent_of_attainable"] == pytest.approx(200 * first["achieved_gflops"] / 150.0, abs=0.1)
    passes = (3 * speed.TRAIN_IMAGES + min(speed.TRAIN_IMAGES, 512) + speed.VAL_IMAGES) / (3 * speed.TRAIN_IMAGES)
    assert first["percent_of_attainable_all_passes"] == pytest.approx(first["percent_of_attainable"] * passes, abs=0.1)
    assert second["conv2d_gflops_before_and_after"] == [200.0, 180.0]
    assert second["percent_of_attainable"] == pytest.approx(100 * second["achieved_gflops"] / 200.0, abs=0.1)
    table = speed.markdown({"cpu_count": 2, "attainable": speed.attainable_rates(False), "models": rows})
    assert "| % of conv, all passes | conv before / after | % of first conv |" in table and "| 200 / 180 |" in table
    del rows["scratch_cnn_64px"]["percent_of_attainable_all_passes"]  # as 89c7a5c wrote its results
    assert "| - | 200 / 180 |" in speed.markdown({"cpu_count": 2, "attainable": speed.attainable_rates(False),
                                                   "models": rows})


def test_bfloat16_rows_are_also_set_against_the_float32_conv_rate(monkeypatch):
    import medlab.train

    rates = {"float32": iter([100.0, 150.0]), "bfloat16": iter([600.0, 500.0])}
    monkeypatch.setattr(speed, "conv_rates", lambda precision="float32": {"32px_32to64": next(rates[precision])})
    monkeypatch.setattr(speed, "attainable_rates", lambda bfloat16: {
        "matmul_2048_gflops": 90.0, "conv2d_train_gflops": {"32px_32to64": 120.0}, "attainable_conv2d_gflops": 120.0,
        "conv2d_train_gflops_bfloat16": {"32px_32to64": 550.0}, "attainable_conv2d_gflops_bfloat16": 550.0})
    monkeypatch.setattr(medlab.train, "cpu_trains_bfloat16", lambda: True)
    models = speed.lesson_models()
    monkeypatch.setattr(speed, "lesson_models", lambda: {"scratch_cnn_64px": models["scratch_cnn_64px"]})
    monkeypatch.setattr(speed, "measure_training",
                        lambda *args, precision="float32", **kwargs: 1000.0 if precision == "float32" else 2000.0)
    monkeypatch.setattr(speed, "measure_step", lambda *args, **kwargs: 3000.0)
    monkeypatch.setattr(medlab.train, "onednn_enabled", lambda: True)
    breakdown = {"batch_size": 64, "step_wall_ms": 40.0, "onednn_ms": 30.0, "kernels": {},
                 "convolutions": {"ms": 20.0, "gflops": 800.0}}
    monkeypatch.setattr(speed, "kernel_breakdown",
                        lambda name, precision: {"model": name, "precision": precision, **breakdown})
    result = speed.speed_benchmark(overheads=False)
    assert [(b["model"], b["precision"]) for b in result["kernels"]] == [
        (name, precision) for precision in ("float32", "mixed_bfloat16") for name in speed.KERNEL_MODELS]
    assert "| scratch_cnn_64px float32 | scratch_cnn_128px float32 | scratch_cnn_64px bfloat16 |" in speed.markdown(result)
    float32, bfloat16 = result["models"]["scratch_cnn_64px"], result["models"]["scratch_cnn_64px_bfloat16"]
    assert "percent_of_float32_conv" not in float32
    assert bfloat16["percent_of_attainable"] == pytest.approx(100 * bfloat16["achieved_gflops"] / 600.0, abs=0.1)
    assert bfloat16["percent_of_float32_conv"] == pytest.approx(100 * bfloat16["achieved_gflops"] / 150.0, abs=0.1)
    assert f"scratch_cnn_64px_bfloat16 {bfloat16['percent_of_float32_conv']:.0f}%." in speed.markdown(result)


def test_lesson_summary_and_markdown(tmp_path):
    run = tmp_path / "run"
    (run / "models" / "scratch_cnn").mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"notebook_wall_time_s": {"01_eda": 10.0, "03_scratch_cnn": 90.0},
                                                  "total_wall_time_s": 100.0}))
    pd.DataFrame({"epoch": [0, 1, 2, 3], "val_auc": [0.80, 0.951, 0.954, 0.953]}).to_csv(
        run / "models" / "scratch_cnn" / "history.csv", index=False)
    lessons = speed.lesson_summary(run)
    assert lessons["models"]["scratch_cnn"] == {"epochs_run": 4, "best_epoch": 3, "best_val_auc": 0.954,
                                                "epochs_to_within_0.005": 2}
    result = {"cpu_count": 2, "lessons": lessons,
              "attainable": {"matmul_2048_gflops": 200.0, "conv2d_train_gflops": {"32px_32to64": 250.0},
                             "attainable_conv2d_gflops": 250.0},
              "models": {"scratch_cnn_64px": {"side": 64, "train_gflop_per_image": 0.233, "images_per_s": 500.0,
                                              "achieved_gflops": 116.5, "percent_of_attainable": 46.6,
                                              "without_metrics_images_per_s": 510.0,
                                              "step_images_per_s": 700.0, "step_percent_of_attainable": 65.2}}}
    table = speed.markdown(result)
    assert "| scratch_cnn_64px | 0.233 | 500 | 116 | 47% | 700 | 65% | 510 |" in table
    assert "bfloat16" not in table  # a CPU without bfloat16 instructions: float32 only
    assert "(2 cores):" in table  # results from before oneDNN was recorded say nothing about it
    assert "(2 cores, TensorFlow's own kernels (oneDNN off)):" in speed.markdown({**result, "onednn": False})
    result["onednn"] = True
    result["attainable"].update({"conv2d_train_gflops_bfloat16": {"32px_32to64": 800.0},
                                 "attainable_conv2d_gflops_bfloat16": 800.0})
    result["models"]["scratch_cnn_64px_bfloat16"] = {
        "side": 64, "precision": "mixed_bfloat16", "train_gflop_per_image": 0.233, "images_per_s": 1000.0,
        "achieved_gflops": 233.0, "percent_of_attainable": 29.1, "step_images_per_s": 1500.0,
        "step_percent_of_attainable": 43.7}
    with_bfloat16 = speed.markdown(result)
    assert "In bfloat16: 32px_32to64 800 GFLOP/s (best 800)" in with_bfloat16
    assert "Lesson 03 trains in bfloat16 on this CPU" in with_bfloat16 and "Lesson 03 trains" not in table
    assert "(2 cores, oneDNN kernels):" in with_bfloat16
    assert "| scratch_cnn_64px_bfloat16 | 0.233 | 1000 | 233 | 29% | 1500 | 44% | - |" in with_bfloat16
    assert "no metrics images/s" in table and "03_scratch_cnn 90 s" in table and "at a time" not in table
    json_path, markdown_path = speed.write_results(result, tmp_path / "bench")
    assert json.loads(json_path.read_text())["models"]["scratch_cnn_64px"]["images_per_s"] == 500.0
    assert markdown_path.read_text().strip() == with_bfloat16
    lessons["notebooks_at_once"] = 2
    assert "total 100 s (up to 2 notebooks at a time: their times overlap)" in speed.markdown(result)


@pytest.mark.skipif(not onednn_enabled(), reason="TensorFlow runs without oneDNN here")
def test_kernel_breakdown_counts_the_models_own_convolutions():
    build, side, channels = speed.lesson_models()["scratch_cnn_28px"]
    breakdown = speed.kernel_breakdown("scratch_cnn_28px", "float32", steps=2, batch_size=16)
    model = build(np.zeros((2, side, side, channels), np.uint8), True)
    dense = sum(2 * int(layer.input.shape[-1]) * layer.units for layer in model.layers
                if isinstance(layer, keras.layers.Dense))  # these run as matrix products
    expected = (speed.forward_flops(model) - dense) * 16 / 1e9  # the batch the child process stepped on
    forward = breakdown["kernels"]["convolution forward"]
    assert forward["calls"] == sum(isinstance(layer, keras.layers.Conv2D) for layer in model.layers)
    assert forward["gflop"] == pytest.approx(expected, rel=1e-9)
    assert {"convolution backward weights", "batch norm forward", "batch norm backward"} <= set(breakdown["kernels"])
    assert breakdown["step_wall_ms"] > 0 and breakdown["steps"] == 2 and breakdown["batch_size"] == 16
    with pytest.raises(ValueError, match="unknown model 'scratch_cnn_32px'"):
        speed.kernel_breakdown("scratch_cnn_32px")


def test_a_step_oneDNN_did_not_log_is_a_line_in_the_table_not_the_end_of_the_bench(monkeypatch):
    from medlab import kernels

    monkeypatch.setattr(kernels, "run_logged", lambda code: (["not a kernel line"], {"step_wall_ms": 1.0}))
    with pytest.raises(kernels.LogError, match="oneDNN logged no kernel in scratch_cnn_64px's training step"):
        speed.kernel_breakdown("scratch_cnn_64px")
    why = speed._breakdown_or_why("scratch_cnn_64px", "float32")
    assert why["model"] == "scratch_cnn_64px" and "oneDNN logged no kernel" in why["error"]
