"""Training speed against what this CPU can do: ``medlab bench speed`` (also inside ``make bench``).

Machines of the same kind differ by up to three times in speed, so nothing
here is judged in absolute seconds: every figure is set against a rate
measured on the same machine in the same run.

- **Attainable rate**: FLOP/s of a 2048 x 2048 float32 matmul and of 3x3
  ``Conv2D`` layers, forward plus both backward passes (the work of one
  training step), at the shapes lesson 03's network uses; the best conv rate
  is the yardstick. Also in bfloat16, the yardstick for lesson 03's models
  where the CPU has bfloat16 instructions and lesson 03 trains in bfloat16 (rows ``_bfloat16``).
- **Achieved rate** of a lesson's model: training images/s (``model.fit``
  epochs of 1,600 images, as in lesson 03's synthetic default, after an
  untimed warm-up, with validation of 400; the best of three runs of two
  epochs, as the attainable rate is the best of three) times the model's training
  FLOPs per image. FLOPs are counted from the layers' output shapes: a
  convolution costs ``2 * kh * kw * Cin / groups * Cout`` per output pixel, a
  depthwise one ``2 * kh * kw`` per output value, a dense layer
  ``2 * inputs * units``; a training step costs three times the forward pass
  (the forward pass, then gradients for the inputs and for the weights).
  Normalisation, activations, pooling and the optimizer are not counted:
  they are the overheads the percentage exposes. Only training steps count:
  the forward passes of precise BN and validation are overhead too; the
  column "all passes" counts them as well (each epoch's precise-BN images and
  validation images at one forward pass each), how busy the convolutions kept the CPU.
- **Yardstick next to each row**: a 2-core machine's speed drifts by a fifth
  within an hour, so the conv rates are measured again just before and just
  after each model's row, and its percentage is of the better of those two
  (the table also gives it against the rate measured at the start).
- **Training step alone**: the same model's forward pass, backward pass and
  Adam update on one fixed batch, repeated as one traced function: no input
  pipeline, no validation, no callbacks. Its rate against the attainable one
  is how well the kernels themselves use the CPU; the gap to the achieved
  rate is what an epoch adds around the steps.
- **Kernel by kernel**: lesson 03's bare 64 and 128 px steps again, with
  oneDNN's own timing of each kernel it runs (:mod:`medlab.kernels`): the
  convolutions' forward pass, input and weight gradients each with its
  GFLOP/s, batch norm, pooling, reorders; so a gap between the step and the
  attainable rate can be put down to the kernels that make it.
- **Overheads**: the same measurement (one run) with one thing switched off at a time
  (training metrics, precise BN, augmentation, op determinism, validation),
  and with Keras' own ``BatchNormalization`` in place of medlab's fused one,
  and with Keras' default of one training step per call into TensorFlow.
- **Lessons**: for a finished run folder, each notebook's wall time and, per
  model, epochs run, the best epoch and the first epoch within 0.005 of the
  best validation AUC.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from medlab import config
from medlab.runs import RunFolder, read_json
from medlab.synthetic import SyntheticConfig

# Conv2D shapes (side, input channels, output channels) of lesson 03's blocks 2 and 3 at 64 px, and a wider one.
CONV_SHAPES = ((32, 32, 64), (16, 64, 128), (32, 64, 64))
# Training and validation images per epoch: as many as lesson 03 trains on in the synthetic default, so that what
# an epoch adds around its steps (precise BN's fixed 512 images, the validation pass) weighs as it does there.
TRAIN_IMAGES, VAL_IMAGES = SyntheticConfig().counts[:2]
OVERHEADS = ("metrics", "precise_bn", "augmentation", "determinism", "validation", "fused_batchnorm", "step_per_call")
# Lesson 03's models whose bare step kernel_breakdown splits by oneDNN kernel in the speed table.
KERNEL_MODELS = ("scratch_cnn_64px", "scratch_cnn_128px")
# Runs of the main training rate and of the bare step, the best taken (as attainable_rates takes the best of three).
TRIALS = 3


def _rate(step, flops: float, repeats: int, trials: int = 1) -> float:
    """``flops`` x calls per second of ``step`` over ``repeats`` calls, the best of ``trials`` such runs."""
    step()  # trace and warm up
    rates = []
    for _ in range(trials):
        started = time.perf_counter()
        for _ in range(repeats):
            result = step()
        float(result)  # wait for the last step
        rates.append(flops * repeats / (time.perf_counter() - started))
    return max(rates)


def _say(message: str) -> None:
    """A progress line on stderr (the table, or ``--json``, goes to stdout)."""
    print(f"[medlab] {message} ...", file=sys.stderr, flush=True)


def attainable_rates(repeats: int = 10, batch_size: int = 64, bfloat16: bool = True, trials: int = 3) -> dict:
    """GFLOP/s of a large matmul and of 3x3 Conv2D forward+backward at :data:`CONV_SHAPES`, float32 and bfloat16.

    Each rate is the best of ``trials`` runs of ``repeats`` calls: what the CPU
    attains, not its average over moments when something else ran.

    The bfloat16 convolutions are the yardstick for a model trained under
    ``mixed_bfloat16`` (lesson 03 on a CPU with bfloat16 instructions, :func:`medlab.train.set_mixed_precision`).
    ``bfloat16=False`` leaves them out: on a CPU without those instructions they are emulated (8 GFLOP/s
    against 171 in float32 on an AVX2-only AMD EPYC), measure nothing lesson 03 uses and, at that rate, take tens of seconds.
    """
    import tensorflow as tf

    generator = tf.random.Generator.from_seed(0)
    left, right = generator.normal((2048, 2048)), generator.normal((2048, 2048))
    matmul = tf.function(lambda: tf.reduce_sum(tf.matmul(left, right)))
    results = {"matmul_2048_gflops": _rate(matmul, 2 * 2048 ** 3, repeats, trials) / 1e9}
    for precision in ("float32", "bfloat16") if bfloat16 else ("float32",):
        suffix = "" if precision == "float32" else "_" + precision
        rates = conv_rates(precision, repeats, batch_size, trials)
        results[f"conv2d_train_gflops{suffix}"] = rates
        results[f"attainable_conv2d_gflops{suffix}"] = max(rates.values())
    return results


def conv_rates(precision: str = "float32", repeats: int = 10, batch_size: int = 64, trials: int = 3) -> dict:
    """``{shape: GFLOP/s}`` of a 3x3 Conv2D's forward pass and both gradients at each of :data:`CONV_SHAPES`."""
    import tensorflow as tf

    dtype = tf.as_dtype(precision)
    generator = tf.random.Generator.from_seed(0)
    rates = {}
    for side, channels_in, channels_out in CONV_SHAPES:
        inputs = tf.Variable(tf.cast(generator.normal((batch_size, side, side, channels_in)), dtype))
        kernel = tf.Variable(tf.cast(generator.normal((3, 3, channels_in, channels_out)), dtype))
        step = tf.function(lambda inputs=inputs, kernel=kernel: conv_training_pass(inputs, kernel))
        flops = 3 * 2 * 9 * batch_size * side * side * channels_in * channels_out
        rates[f"{side}px_{channels_in}to{channels_out}"] = _rate(step, flops, repeats, trials) / 1e9
    return rates


def conv_training_pass(inputs, kernel):
    """A 3x3 Conv2D's forward pass and both gradients: the sum of the output, the input gradient and the kernel gradient.

    The forward output is part of what it returns. A loss that is the sum of
    the output has a gradient of ones whatever the output is, so when only
    the gradients were returned (before 2026-12-06) TensorFlow skipped the
    forward convolution and the probe timed two of the three passes it
    counted: the attainable rate read high (on a Xeon with AMX, bfloat16,
    about 1,300 GFLOP/s against about 1,000 with the forward pass run).
    """
    import tensorflow as tf

    with tf.GradientTape() as tape:
        tape.watch([inputs, kernel])
        loss = tf.reduce_sum(tf.cast(tf.nn.conv2d(inputs, kernel, 1, "SAME"), tf.float32))
    input_gradient, kernel_gradient = tape.gradient(loss, [inputs, kernel])
    return loss + tf.reduce_sum(tf.cast(input_gradient, tf.float32)) + tf.reduce_sum(
        tf.cast(kernel_gradient, tf.float32))


def forward_flops(model) -> int:
    """Multiply-adds x 2 of the convolutions and dense layers of one image's forward pass."""
    from keras import layers

    total = 0
    for layer in model.layers:
        if not hasattr(layer, "output") or not layer._inbound_nodes:
            continue
        output = layer.output.shape
        pixels = int(np.prod(output[1:-1])) if len(output) > 2 else 1
        if isinstance(layer, layers.DepthwiseConv2D):
            kernel_h, kernel_w = layer.kernel_size
            total += 2 * kernel_h * kernel_w * pixels * int(output[-1])
        elif isinstance(layer, layers.Conv2D):
            kernel_h, kernel_w = layer.kernel_size
            channels_in = int(layer.input.shape[-1]) // layer.groups
            total += 2 * kernel_h * kernel_w * channels_in * int(output[-1]) * pixels
        elif isinstance(layer, layers.Dense):
            total += 2 * int(layer.input.shape[-1]) * int(output[-1]) * pixels
    return total


def _toy_split(count: int, side: int, channels: int, num_classes: int, seed: int):
    """Smooth random images (blurred noise, 0-255) with random labels: the cost of a step does not depend on content."""
    from medlab.data import Split

    rng = np.random.default_rng(seed)
    cells = -(-side // 8)  # 8 x 8 px blocks covering the image
    coarse = rng.uniform(0, 255, size=(count, cells, cells, channels))
    images = np.kron(coarse, np.ones((1, 8, 8, 1)))[:, :side, :side].astype(np.uint8)
    labels = rng.integers(0, num_classes, size=count)
    return Split(images, labels, [f"toy[{i}]" for i in range(count)], [""] * count)


def measure_training(build_model, side: int, channels: int = 1, num_classes: int = 2, switched_off: str = "",
                     train_images: int = TRAIN_IMAGES, val_images: int = VAL_IMAGES, batch_size: int = 64, epochs: int = 2,
                     seed: int = config.DEFAULT_SEED, precision: str = "float32", augmentation_config=None,
                     trials: int = 1) -> float:
    """Training images/s of ``build_model(training_images, fused)`` as lesson 03/04 train it, one overhead off.

    ``switched_off`` is one of :data:`OVERHEADS` or empty (``"fused_batchnorm"``:
    Keras' own batch norm; ``"step_per_call"``: Keras' default of one training
    step per call into TensorFlow rather than :func:`medlab.train.one_call_per_epoch`).
    A warm-up epoch (two steps when one step per call) and one validation,
    which trace every function, are not timed; then ``epochs`` epochs are,
    validation included, ``trials`` times over (training on): the best of
    them, as :func:`attainable_rates` takes its best.
    ``precision`` is the Keras policy to build and train in (e.g. ``"mixed_bfloat16"``);
    ``augmentation_config`` the lesson's :class:`medlab.augment.AugmentationConfig` (default: lesson 03's).
    """
    import keras
    from tensorflow.python.framework import config as tf_config

    from medlab.augment import build_augmentation
    from medlab.data import batches_per_pass, make_tf_dataset
    from medlab.models import global_dtype_policy
    from medlab.train import PreciseBatchNorm, compile_model, one_call_per_epoch, set_determinism

    if switched_off and switched_off not in OVERHEADS:
        raise ValueError(f"switched_off must be one of {OVERHEADS}, got {switched_off!r}")
    set_determinism(seed)
    if switched_off == "determinism":
        tf_config.disable_op_determinism()
    with global_dtype_policy(precision):  # back to the caller's policy afterwards
        try:
            train = _toy_split(train_images, side, channels, num_classes, seed)
            val = _toy_split(val_images, side, channels, num_classes, seed + 1)
            model = build_model(train.images, switched_off != "fused_batchnorm")
            compile_model(model, num_classes, metrics="loss" if switched_off == "metrics" else "training")
            augmentation = None if switched_off == "augmentation" else build_augmentation(augmentation_config, seed=seed)
            train_data = make_tf_dataset(train, num_classes, batch_size, shuffle=True, seed=seed,
                                         augmentation=augmentation, repeat=True)  # as train_model
            steps = batches_per_pass(train_images, batch_size)
            val_data = None if switched_off == "validation" else make_tf_dataset(val, num_classes, batch_size)
            callbacks = [] if switched_off in ("precise_bn", "validation") else [
                PreciseBatchNorm(train.images, batch_size=batch_size, seed=seed)]
            per_call = 1 if switched_off == "step_per_call" else steps  # as train_model runs an epoch
            with one_call_per_epoch(model, per_call):
                warm_up = min(2, steps) if per_call == 1 else steps  # traces the function the timed epochs call
                model.fit(train_data, validation_data=val_data, epochs=1, steps_per_epoch=warm_up,
                          callbacks=callbacks, verbose=0, shuffle=False)  # tf.data shuffles, as train_model
                seconds = []
                for _ in range(trials):
                    started = time.perf_counter()
                    model.fit(train_data, validation_data=val_data, epochs=epochs, steps_per_epoch=steps,
                              callbacks=callbacks, verbose=0, shuffle=False)
                    seconds.append(time.perf_counter() - started)
        finally:
            tf_config.enable_op_determinism()
            keras.backend.clear_session()
    return train_images * epochs / min(seconds)


def measure_step(build_model, side: int, channels: int = 1, num_classes: int = 2, batch_size: int = 64,
                 repeats: int = 20, seed: int = config.DEFAULT_SEED, precision: str = "float32",
                 trials: int = 1) -> float:
    """Training images/s of ``build_model``'s bare training step (forward, backward, Adam) on one fixed batch.

    The best of ``trials`` runs of ``repeats`` steps.
    """
    with bare_step(build_model, side, channels, num_classes, batch_size, seed, precision) as step:
        return batch_size * _rate(step, 1.0, repeats, trials)  # _rate traces with one untimed call


@contextlib.contextmanager
def bare_step(build_model, side: int, channels: int = 1, num_classes: int = 2, batch_size: int = 64,
              seed: int = config.DEFAULT_SEED, precision: str = "float32"):
    """``build_model``'s training step (forward, backward, Adam) on one fixed batch, as a traced function.

    Not yet called (the first call traces it); the caller's precision policy is back afterwards.
    """
    import keras
    import tensorflow as tf

    from medlab.data import make_tf_dataset
    from medlab.models import global_dtype_policy
    from medlab.train import compile_model, set_determinism

    set_determinism(seed)
    with global_dtype_policy(precision):  # back to the caller's policy afterwards
        try:
            batch = _toy_split(batch_size, side, channels, num_classes, seed)
            model = compile_model(build_model(batch.images, True), num_classes, metrics="loss")
            images, labels = next(iter(make_tf_dataset(batch, num_classes, batch_size)))  # as training sees them
            optimizer = model.optimizer  # compile_model has made its slots: the step's trace does not

            @tf.function
            def step():
                with tf.GradientTape() as tape:
                    loss = model.compute_loss(x=images, y=labels, y_pred=model(images, training=True))
                optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
                return loss

            yield step
        finally:
            keras.backend.clear_session()


def kernel_breakdown(name: str, precision: str = "float32", steps: int = 3, batch_size: int = 64) -> dict:
    """oneDNN's time per kernel in the bare training step of :func:`lesson_models`' ``name`` (:mod:`medlab.kernels`).

    The step runs in a fresh process (oneDNN reads its log switch when it loads): three untimed steps, then
    ``steps`` logged ones. :class:`medlab.kernels.LogError` when that process fails or oneDNN logs no kernel
    (TensorFlow without oneDNN: check :func:`medlab.train.onednn_enabled` first).
    """
    from medlab import kernels

    if name not in lesson_models():
        raise ValueError(f"unknown model {name!r}: one of {sorted(lesson_models())}")
    code = (f"from medlab.speed import _logged_steps; "
            f"_logged_steps({name!r}, {precision!r}, {int(steps)}, {int(batch_size)})")
    _say(f"logging oneDNN's kernels in {name}'s training step ({precision.removeprefix('mixed_')})")
    lines, measured = kernels.run_logged(code)
    records = kernels.parse_verbose(lines)
    if not records:
        raise kernels.LogError(f"oneDNN logged no kernel in {name}'s training step: is TensorFlow running oneDNN's "
                               "kernels here (TF_ENABLE_ONEDNN_OPTS=1), built with its verbose mode?")
    return {"model": name, "precision": precision, "batch_size": batch_size, "steps": steps,
            **kernels.summarise(records, steps), **measured}


def _breakdown_or_why(name: str, precision: str) -> dict:
    """:func:`kernel_breakdown`, or why there is none: the speed table measured before it is not lost."""
    from medlab.kernels import LogError

    try:
        return kernel_breakdown(name, precision)
    except LogError as error:
        return {"model": name, "precision": precision, "error": str(error)}


def _logged_steps(name: str, precision: str, steps: int, batch_size: int) -> None:
    """In :func:`kernel_breakdown`'s process: warm up, then ``steps`` steps between the markers oneDNN's log is cut at."""
    from medlab import kernels

    build, side, channels = lesson_models()[name]
    with bare_step(build, side, channels, batch_size=batch_size, precision=precision) as step:
        for _ in range(3):  # the first traces; oneDNN builds its kernels on the first runs
            float(step())
        print(kernels.START, flush=True)
        started = time.perf_counter()
        for _ in range(steps):
            result = step()
        float(result)
        wall_ms = (time.perf_counter() - started) / steps * 1e3
        print(kernels.END + json.dumps({"step_wall_ms": round(wall_ms, 2)}), flush=True)


def lesson_models(num_classes: int = 2) -> dict:
    """``{name: (build_model(training_images, fused), side, channels)}``: lesson 03 at 28/64/128 px, lesson 04.

    Each as its lesson builds it by default (lesson 03's block-1 stride, lesson 04 without ImageNet weights).
    """
    from medlab.models import (
        build_scratch_cnn,
        build_transfer_model,
        default_filters,
        default_stem_stride,
    )

    def scratch(side):
        def build(images, fused):
            model = build_scratch_cnn((side, side, 1), num_classes, images, filters=default_filters((side, side)),
                                      stem_stride=default_stem_stride((side, side)))
            return model if fused else _keras_batchnorm(model)
        return build, side, 1

    def transfer(images, fused):  # without ImageNet weights, as on a machine without internet: trained whole
        model, _info = build_transfer_model((64, 64, 1), num_classes, weights=None)
        return model if fused else _keras_batchnorm(model)

    return {"scratch_cnn_28px": scratch(28), "scratch_cnn_64px": scratch(64), "scratch_cnn_128px": scratch(128),
            "transfer_mobilenet_v2_64px": (transfer, 64, 1)}


def _keras_batchnorm(model):
    """The same model with Keras' own BatchNormalization layers (the reference for the fused ones)."""
    import keras

    from medlab.models import FusedBatchNormalization, clone_with_weights

    def clone(layer):
        if isinstance(layer, FusedBatchNormalization):
            return keras.layers.BatchNormalization.from_config(layer.get_config())
        return layer.__class__.from_config(layer.get_config())

    return clone_with_weights(model, clone)


def lesson_summary(run_dir: str | Path) -> dict:
    """Wall time per notebook and, per model, epochs run and epochs to the final validation AUC."""
    import pandas as pd

    run = RunFolder(run_dir)
    metrics = read_json(run.metrics)
    if metrics is None:
        return {}
    models = {}
    folders = [folder for model in run.models() for folder in (model, *model.members())]
    for folder in folders:
        if not folder.history.exists():
            continue
        table = pd.read_csv(folder.history)
        if "val_auc" not in table or table.empty:
            continue
        best = table["val_auc"].max()
        name = str(folder.path.relative_to(run.models_dir))
        models[name] = {"epochs_run": len(table), "best_epoch": int(table["val_auc"].idxmax()) + 1,
                        "best_val_auc": round(float(best), 4),
                        "epochs_to_within_0.005": int((table["val_auc"] >= best - 0.005).idxmax()) + 1}
    return {"run": str(run.root), "notebook_wall_time_s": metrics.get("notebook_wall_time_s", {}),
            "total_wall_time_s": metrics.get("total_wall_time_s"),
            "notebooks_at_once": metrics.get("notebooks_at_once", 1), "models": models}


def speed_benchmark(run_dir: str | Path | None = None, overheads: bool = True, epochs: int = 2,
                    kernels: bool = True) -> dict:
    """The whole speed table: attainable rates, each lesson model's rate and overheads, lesson wall times.

    Every model is measured in float32, with the overheads; where lesson 03
    trains in bfloat16 (a CPU with AMX or AVX512-BF16), its models are measured in bfloat16
    too (rows ``..._bfloat16``), against the bfloat16 convolution rate. With ``kernels``
    and oneDNN on, :func:`kernel_breakdown` of lesson 03's 64 and 128 px steps in each precision.
    """
    from medlab.augment import TRANSFER_AUGMENTATION
    from medlab.train import PreciseBatchNorm, cpu_trains_bfloat16, onednn_enabled

    bfloat16 = cpu_trains_bfloat16()
    _say("timing the attainable rates: a matmul and 3x3 convolutions")
    peak = attainable_rates(bfloat16=bfloat16)
    variants = [("float32", "", peak["attainable_conv2d_gflops"])]
    if bfloat16:
        variants.append(("mixed_bfloat16", "_bfloat16", peak["attainable_conv2d_gflops_bfloat16"]))
    rows = {}
    # the images measure_training's PreciseBatchNorm runs forward once per epoch, before validation
    precise_bn_images = sum(len(batch) for batch in PreciseBatchNorm(np.zeros((TRAIN_IMAGES, 1, 1, 1), np.uint8)).batches)
    all_passes = (3 * TRAIN_IMAGES + precise_bn_images + VAL_IMAGES) / (3 * TRAIN_IMAGES)
    for name, (build, side, channels) in lesson_models().items():
        train_gflop = 3 * forward_flops(build(np.zeros((2, side, side, channels), np.uint8), True)) / 1e9
        lesson = {"augmentation_config": TRANSFER_AUGMENTATION if name.startswith("transfer") else None}
        for precision, suffix, attainable in variants:
            if suffix and not name.startswith("scratch_cnn"):
                continue  # lessons 04-05 train MobileNetV2 in float32: slower in bfloat16 (its depthwise convolutions)
            _say(f"timing {name}{suffix}: training epochs, the bare step"
                 + (", each overhead off" if overheads and not suffix else ""))
            before = max(conv_rates(precision.removeprefix("mixed_")).values())
            rate = measure_training(build, side, channels, epochs=epochs, precision=precision, trials=TRIALS, **lesson)
            step_rate = measure_step(build, side, channels, precision=precision, trials=TRIALS)
            after = max(conv_rates(precision.removeprefix("mixed_")).values())
            adjacent = max(before, after)  # the yardstick in the machine's state of the moment
            row = {"side": side, "precision": precision, "train_gflop_per_image": round(train_gflop, 4),
                   "images_per_s": round(rate, 1), "achieved_gflops": round(rate * train_gflop, 1),
                   "conv2d_gflops_before_and_after": [round(before, 1), round(after, 1)],
                   "percent_of_attainable": round(100 * rate * train_gflop / adjacent, 1),
                   "percent_of_attainable_all_passes": round(100 * rate * train_gflop * all_passes / adjacent, 1),
                   "percent_of_first_attainable": round(100 * rate * train_gflop / attainable, 1),
                   "step_images_per_s": round(step_rate, 1),
                   "step_percent_of_attainable": round(100 * step_rate * train_gflop / adjacent, 1)}
            for overhead in OVERHEADS if overheads and not suffix else ():
                without = measure_training(build, side, channels, switched_off=overhead, epochs=epochs, **lesson)
                row[f"without_{overhead}_images_per_s"] = round(without, 1)
            if suffix:  # the same FLOP/s against the float32 conv rate measured next to the float32 row
                float32_conv = max(rows[name]["conv2d_gflops_before_and_after"])
                row["percent_of_float32_conv"] = round(100 * rate * train_gflop / float32_conv, 1)
            rows[name + suffix] = row
    breakdowns = [_breakdown_or_why(name, precision) for precision, _suffix, _rate in variants
                  for name in KERNEL_MODELS] if kernels and onednn_enabled() else []
    return {"cpu_count": config.cpu_count(), "onednn": onednn_enabled(), "attainable": peak, "models": rows,
            "kernels": breakdowns, "lessons": lesson_summary(run_dir) if run_dir else {}}


def markdown(result: dict) -> str:
    """The speed table (what ``medlab bench speed`` prints)."""
    peak = result["attainable"]
    kernel_note = {True: ", oneDNN kernels", False: ", TensorFlow's own kernels (oneDNN off)"}.get(result.get("onednn"), "")
    lines = [f"Attainable on this machine ({result['cpu_count']} cores{kernel_note}): matmul {peak['matmul_2048_gflops']:.0f} GFLOP/s; "
             "3x3 Conv2D forward+backward " + ", ".join(f"{k} {v:.0f}" for k, v in peak["conv2d_train_gflops"].items())
             + f" GFLOP/s (best {peak['attainable_conv2d_gflops']:.0f})."]
    if "conv2d_train_gflops_bfloat16" in peak:
        lines[0] += " In bfloat16: " + ", ".join(f"{k} {v:.0f}" for k, v in peak["conv2d_train_gflops_bfloat16"].items()) \
            + f" GFLOP/s (best {peak['attainable_conv2d_gflops_bfloat16']:.0f}); the `_bfloat16` rows' % is of that." \
            + " Lesson 03 trains in bfloat16 on this CPU by default (`mixed_precision=True`): its `_bfloat16` rows apply here."
    lines.append("")
    steps = all("step_images_per_s" in row for row in result["models"].values())
    adjacent = all("conv2d_gflops_before_and_after" in row for row in result["models"].values())
    header = ["model", "GFLOP/image (train)", "images/s", "GFLOP/s", "% of conv"]
    header += ["% of conv, all passes", "conv before / after", "% of first conv"] if adjacent else []
    header += ["step alone images/s", "step alone % of conv"] if steps else []
    overheads = [o for o in OVERHEADS if any(f"without_{o}_images_per_s" in r for r in result["models"].values())]
    names = {"fused_batchnorm": "Keras BN", "step_per_call": "one step per call"}
    header += [names.get(o, f"no {o.replace('_', ' ')}") + " images/s" for o in overheads]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in result["models"].items():
        cells = [name, f"{row['train_gflop_per_image']:.3f}", f"{row['images_per_s']:.0f}",
                 f"{row['achieved_gflops']:.0f}", f"{row['percent_of_attainable']:.0f}%"]
        all_passes = row.get("percent_of_attainable_all_passes")  # not in results written by 89c7a5c
        cells += [f"{all_passes:.0f}%" if all_passes is not None else "-",
                  "{:.0f} / {:.0f}".format(*row["conv2d_gflops_before_and_after"]),
                  f"{row['percent_of_first_attainable']:.0f}%"] if adjacent else []
        cells += [f"{row['step_images_per_s']:.0f}", f"{row['step_percent_of_attainable']:.0f}%"] if steps else []
        cells += [f"{row[f'without_{o}_images_per_s']:.0f}" if f"without_{o}_images_per_s" in row else "-"
                  for o in overheads]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", ("% of conv: training steps' FLOP/s against the better conv rate measured just before and just"
                   " after the row; all passes: with each epoch's precise-BN and validation forward passes counted"
                   " too; % of first conv: against the rate at the start. " if adjacent else "")
              + f"images/s and step alone: the best of {TRIALS} runs, as the attainable rates"
              + ("; each overhead column one run (differences of 15% or less there can be noise)." if overheads else ".")]
    against_float32 = {name: row["percent_of_float32_conv"] for name, row in result["models"].items()
                       if "percent_of_float32_conv" in row}
    if against_float32:
        lines += ["", "The `_bfloat16` rows' GFLOP/s against the float32 conv rate measured next to their float32 rows"
                  " (what the same training would be held to on a CPU without bfloat16 instructions): "
                  + ", ".join(f"{name} {percent:.0f}%" for name, percent in against_float32.items()) + "."]
    if result.get("kernels"):
        from medlab import kernels

        lines += ["", "Where lesson 03's bare training step goes, kernel by kernel, as oneDNN times it (`medlab bench"
                  " kernels` alone):", "", kernels.markdown(result["kernels"])]
    lessons = result.get("lessons") or {}
    if lessons:
        at_once = lessons.get("notebooks_at_once", 1)
        side_by_side = f" (up to {at_once} notebooks at a time: their times overlap)" if at_once > 1 else ""
        lines += ["", f"Run `{lessons['run']}`: total {lessons['total_wall_time_s']:.0f} s{side_by_side}; "
                  + ", ".join(f"{k} {v:.0f} s" for k, v in lessons["notebook_wall_time_s"].items()), "",
                  "| model | epochs run | best epoch | first epoch within 0.005 of the best val AUC | best val AUC |",
                  "|---|---|---|---|---|"]
        lines += [f"| {name} | {m['epochs_run']} | {m['best_epoch']} | {m['epochs_to_within_0.005']} | "
                  f"{m['best_val_auc']:.4f} |" for name, m in lessons["models"].items()]
    return "\n".join(lines)


def write_results(result: dict, folder: Path) -> tuple[Path, Path]:
    """``speed.json`` and ``speed.md`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = folder / "speed.json", folder / "speed.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    markdown_path.write_text(markdown(result) + "\n")
    return json_path, markdown_path
