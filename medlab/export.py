"""TFLite export: float32, float16, dynamic-range and full-integer models, checked against Keras.

Keras 3 models are exported as a SavedModel (``model.export``) and converted
from there; ``TFLiteConverter.from_keras_model`` does not work with Keras 3.
Random augmentation layers, if a model has any, are replaced by identities
first. Each ``.tflite`` file gets a JSON sidecar with everything a program
needs to use it correctly on its own: class names, input size and channels,
pixel scale, quantisation parameters and the decision threshold frozen on
validation data.

Files are run with LiteRT (``ai_edge_litert``), batched over whole splits.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from medlab import config
from medlab.runs import RunFolder

VARIANTS = ("float32", "float16", "dynamic_range", "int8")

# Status lines that TensorFlow's converter and LiteRT write from C++ straight to the process's stderr, whatever
# TF_CPP_MIN_LOG_LEVEL says: the quantiser's settings echoed on every int8 conversion, and the interpreter's note
# that it uses XNNPACK. In a lesson they read like warnings; :func:`native_stderr_without` drops them.
NATIVE_CHATTER = (re.compile(r"^fully_quantize: \d+, inference_type: \d+, "),
                  re.compile(r"^INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.$"))


_NATIVE_STDERR_LOCK = threading.RLock()  # file descriptor 2 is the process's: one holder at a time


@contextlib.contextmanager
def native_stderr_without(chatter: tuple[re.Pattern, ...] = NATIVE_CHATTER):
    """Run the block with the process's stderr (file descriptor 2, where C++ writes) held back, then write back
    every line that none of ``chatter`` matches, in order. If the block raises, every line is written back.
    Threads take turns (two at once would each restore the other's temporary file as stderr)."""
    with _NATIVE_STDERR_LOCK, tempfile.TemporaryFile() as held:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(held.fileno(), 2)
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines = held.read().decode(errors="replace").splitlines(keepends=True)
            text = "".join(line for line in lines
                           if failed or not any(pattern.search(line.rstrip("\n")) for pattern in chatter))
            if text:
                os.write(2, text.encode())


def strip_augmentation(model: keras.Model) -> keras.Model:
    """A copy of ``model`` with every Keras random preprocessing layer replaced by an identity."""
    random_layers = [layer for layer in model.layers if type(layer).__name__.startswith("Random")]
    if not random_layers:
        return model

    def clone(layer):  # every other layer is reused as it is, weights and all
        return keras.layers.Identity(name=layer.name) if layer in random_layers else layer

    return keras.models.clone_model(model, clone_function=clone)


def logit_model(model: keras.Model) -> tuple[keras.Model, str | None]:
    """The same model ending in logits, and the activation ("sigmoid"/"softmax") it took off.

    Full-integer models quantise their output to 256 levels: a sigmoid output
    with scale 1/256 turns most confident predictions into ties (all 255/256),
    which costs ROC-AUC and hides ranking differences. Logits spread the 256
    levels over their own range; the last activation is then applied in
    float by whoever reads the output (:class:`LiteModel` does).
    """
    last = model.layers[-1]
    activation = getattr(getattr(last, "activation", None), "__name__", None)
    if isinstance(last, keras.layers.Activation) and activation in {"sigmoid", "softmax"}:
        # an averaged model (medlab.models.average_models): its logits are the layer's input
        return keras.Model(model.inputs, last.input, name=f"{model.name}_logits"), activation
    if not isinstance(last, keras.layers.Dense) or activation not in {"sigmoid", "softmax"}:
        return model, None
    dense = keras.layers.Dense(last.units, dtype=last.dtype_policy, name=f"{last.name}_logits")  # its precision too
    logits = dense(last.input)
    dense.set_weights(last.get_weights())
    return keras.Model(model.inputs, logits, name=f"{model.name}_logits"), activation


def convert(model: keras.Model, variant: str, representative_images: np.ndarray | None = None,
            saved_model: str | Path | None = None) -> bytes:
    """Convert a Keras model to TFLite bytes through a SavedModel export.

    ``int8`` is full-integer quantisation: uint8 pixels in, uint8 out, int8
    weights and activations calibrated on ``representative_images`` (drawn
    from the training split). Raw 0-255 pixels fit uint8 with a scale near 1.
    :func:`export_variant` gives the int8 model logits as output (see
    :func:`logit_model`). ``saved_model``: a folder where
    :func:`export_saved_model` already wrote ``model``, so that several
    variants share one export (each export of a test-time-view model costs
    seconds); by default the model is exported here.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "int8" and (representative_images is None or len(representative_images) == 0):
        raise ValueError("int8 conversion needs representative images from the training split")
    if saved_model is not None:
        return _convert_saved_model(Path(saved_model), variant, representative_images)
    with tempfile.TemporaryDirectory(prefix="medlab-savedmodel-") as directory:
        export_saved_model(model, directory)
        return _convert_saved_model(Path(directory), variant, representative_images)


def export_saved_model(model: keras.Model, directory: str | Path) -> Path:
    """Write ``model`` without its augmentation layers as a TensorFlow SavedModel (what the converter reads)."""
    strip_augmentation(model).export(str(directory), format="tf_saved_model", verbose=False)
    return Path(directory)


def _convert_saved_model(directory: Path, variant: str, representative_images: np.ndarray | None) -> bytes:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(directory))
    if variant != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if variant == "int8":
        images = np.asarray(representative_images, dtype=np.float32)

        def representative_dataset():
            for image in images:
                yield [image[None]]

        converter.representative_dataset = representative_dataset
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.uint8
    with native_stderr_without():
        return converter.convert()


def export_variant(model: keras.Model, variant: str, path: str | Path, metadata: dict,
                   representative_images: np.ndarray | None = None,
                   saved_model: str | Path | None = None) -> LiteModel:
    """Convert, write ``<name>.tflite`` and its ``<name>.json`` sidecar, and return it loaded.

    The sidecar is ``metadata`` plus the variant and the input/output tensor
    types and quantisation parameters read back from the written file.
    ``saved_model`` (see :func:`convert`) is used for every variant but
    ``int8``, which converts the logit model instead.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    activation = None
    if variant == "int8":
        model, activation = logit_model(model)
        saved_model = None
    path.write_bytes(convert(model, variant, representative_images, saved_model=saved_model))
    metadata = {**metadata, "variant": variant, "output_activation": activation}
    if activation:
        metadata["output"] = f"logits: apply {activation} in float to get probabilities"
    metadata["io"] = LiteModel(path, metadata).io_details()
    path.with_suffix(".json").write_text(json.dumps(metadata, indent=2) + "\n")
    return LiteModel.load(path)


def model_metadata(class_names: list[str], image_shape: tuple[int, int, int], threshold: float | None,
                   source: str, pretrained: bool | None = None) -> dict:
    """What a program needs to use an exported model correctly on its own."""
    height, width, channels = image_shape
    return {
        "format": "medlab-tflite-v1",
        "source_model": source,
        "class_names": list(class_names),
        "task": "binary" if len(class_names) == 2 else "multiclass",
        "output": ("probability of the positive class" if len(class_names) == 2
                   else "probability of each class (softmax)"),
        "positive_class": class_names[1] if len(class_names) == 2 else None,
        "preprocessing": {
            "height": height, "width": width, "channels": channels,
            "pixels": "raw 0-255 values (the model normalises internally)",
            "color": "grayscale" if channels == 1 else "RGB",
            "resize": "antialiased (area) when shrinking, bilinear when enlarging, as in medlab.data",
        },
        "threshold": threshold,
        "threshold_rule": "chosen on validation data for the target recall, frozen before test" if threshold else None,
        "pretrained": pretrained,
    }


@dataclass
class LiteModel:
    """A ``.tflite`` file with its sidecar, run by LiteRT over whole batches."""

    path: Path
    metadata: dict

    @classmethod
    def load(cls, path: str | Path) -> LiteModel:
        path = Path(path)
        sidecar = path.with_suffix(".json")
        if not sidecar.exists():
            raise FileNotFoundError(f"{sidecar} is missing: a .tflite file needs its metadata to be used safely")
        return cls(path, json.loads(sidecar.read_text()))

    def _interpreter(self, batch: int, xnnpack: bool = True, threads: int | None = None):
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        # LiteRT applies the XNNPACK delegate (fast float and int8 CPU kernels) by default; without it every op
        # runs TFLite's built-in kernels, which is how to see what the delegate is worth. ``threads=None`` is
        # LiteRT's default: one thread.
        resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        with native_stderr_without():
            interpreter = Interpreter(model_path=str(self.path), experimental_op_resolver_type=resolver,
                                      num_threads=threads)
            input_index = interpreter.get_input_details()[0]["index"]
            interpreter.resize_tensor_input(input_index, [batch, *self.input_shape])
            interpreter.allocate_tensors()
        return interpreter

    @property
    def input_shape(self) -> list[int]:
        pre = self.metadata["preprocessing"]
        return [pre["height"], pre["width"], pre["channels"]]

    def predict(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Probabilities in the same shape as :func:`medlab.train.predict` gives for the Keras model.

        Batches run on every core this process may use (the single-image latency stays on LiteRT's default,
        one thread). Batches of 64 rather than 256, because a larger batch makes a slower interpreter to
        set up: on the synthetic 64 px six-view scratch CNN, float32 over 400 images took 1.40 s in batches
        of 256 and 0.77 s in batches of 64 (setting one up for 400 images alone: 0.4-0.9 s).
        """
        images = np.asarray(images, dtype=np.float32)
        if list(images.shape[1:]) != self.input_shape:
            raise ValueError(f"{self.path.name} expects images of shape {self.input_shape}, got {list(images.shape[1:])}")
        outputs = []
        interpreter, size = None, None
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            if len(batch) != size:  # resize the input tensor only when the batch size changes
                interpreter, size = self._interpreter(len(batch), threads=config.cpu_count()), len(batch)
            input_detail = interpreter.get_input_details()[0]
            output_detail = interpreter.get_output_details()[0]
            interpreter.set_tensor(input_detail["index"], self._quantize(batch, input_detail))
            interpreter.invoke()
            outputs.append(self._dequantize(interpreter.get_tensor(output_detail["index"]), output_detail))
        probabilities = self._activate(np.concatenate(outputs))
        return probabilities[:, 0] if probabilities.shape[1] == 1 else probabilities

    def _activate(self, outputs: np.ndarray) -> np.ndarray:
        activation = self.metadata.get("output_activation")
        if activation == "sigmoid":
            return 1.0 / (1.0 + np.exp(-outputs))
        if activation == "softmax":
            shifted = np.exp(outputs - outputs.max(axis=1, keepdims=True))
            return shifted / shifted.sum(axis=1, keepdims=True)
        return outputs

    def _quantize(self, batch: np.ndarray, detail: dict) -> np.ndarray:
        if detail["dtype"] == np.float32:
            return batch
        scale, zero_point = detail["quantization"]
        info = np.iinfo(detail["dtype"])
        return np.clip(np.round(batch / scale + zero_point), info.min, info.max).astype(detail["dtype"])

    @staticmethod
    def _dequantize(values: np.ndarray, detail: dict) -> np.ndarray:
        if detail["dtype"] == np.float32:
            return values
        scale, zero_point = detail["quantization"]
        return (values.astype(np.float32) - zero_point) * scale

    def io_details(self) -> dict:
        interpreter = self._interpreter(1)
        describe = lambda d: {"dtype": np.dtype(d["dtype"]).name, "quantization": list(d["quantization"])}  # noqa: E731
        return {"input": describe(interpreter.get_input_details()[0]),
                "output": describe(interpreter.get_output_details()[0])}

    def median_latency_ms(self, image: np.ndarray, repeats: int = 50, xnnpack: bool = True) -> float:
        """Median wall time of one single-image inference on this CPU (after a warm-up).

        ``xnnpack=False`` runs TFLite's built-in kernels instead of the XNNPACK delegate.
        """
        interpreter = self._interpreter(1, xnnpack)
        detail = interpreter.get_input_details()[0]
        tensor = self._quantize(np.asarray(image, dtype=np.float32)[None], detail)
        interpreter.set_tensor(detail["index"], tensor)
        interpreter.invoke()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            interpreter.set_tensor(detail["index"], tensor)
            interpreter.invoke()
            times.append((time.perf_counter() - started) * 1000.0)
        return statistics.median(times)


def cpu_int8_features() -> list[str] | None:
    """The int8 dot-product instruction sets this CPU reports (Linux), e.g. ``["avx512_vnni"]``; None if unknown.

    XNNPACK's int8 kernels multiply four int8 pairs per instruction with VNNI
    (Intel Cascade Lake and later, AMD Zen 4) or ARM's dot-product
    instructions; without them int8 convolutions need extra widening steps and
    can be slower than float32.
    """
    flags = config.cpu_flags()
    return None if flags is None else sorted(flags & {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"})


def latency_table(lite_models: dict[str, LiteModel], image: np.ndarray, repeats: int = 50):
    """Per variant: median single-image latency with XNNPACK (LiteRT's default) and with built-in kernels only."""
    import pandas as pd

    rows = {name: {"XNNPACK (default), ms": lite.median_latency_ms(image, repeats),
                   "built-in kernels, ms": lite.median_latency_ms(image, repeats, xnnpack=False)}
            for name, lite in lite_models.items()}
    table = pd.DataFrame(rows).T
    if "float32" in table.index:
        table["vs float32 with XNNPACK"] = table["XNNPACK (default), ms"] / table.loc["float32", "XNNPACK (default), ms"]
    return table


def cost_of_test_time_views(run: RunFolder, name: str, image: np.ndarray, metadata: dict,
                             calibration_images: np.ndarray, repeats: int = 50):
    """What model ``name``'s test-time views cost per prediction, beside what they gained on validation.

    Lesson 03 replaces its model by the average over test-time views (the image, its mirror, four small
    shifts) when that raises the validation AUC, and keeps the plain model as ``single_view.keras``
    (:func:`medlab.train.keep_better_on_validation`). Every prediction then runs the network once per view.
    This converts the single-view model to float32 and int8 (in a temporary folder: it has no threshold
    frozen on validation of its own) and times both beside the run's files of the kept model, which
    :func:`compare_variants` wrote and timed once already: timed again here, next to the single view, so that
    both figures come from the same moment of the machine. Returns a table with one row per model, empty when
    the model has no single-view checkpoint (the views were not kept, or the model never had them).
    """
    import pandas as pd

    from medlab.models import load_model
    from medlab.runs import read_json

    folder = run.model(name)
    if not folder.single_view_checkpoint.exists():
        return pd.DataFrame()
    decision = read_json(folder.training, {}).get("test_time_views")
    if not decision:
        raise ValueError(f"{folder.training} does not record the test-time views that {folder.single_view_checkpoint} "
                         "was kept beside; rerun lesson 03")
    kept = {variant: run.tflite(name, variant) for variant in ("float32", "int8")}
    missing = [str(path) for path in kept.values() if not path.exists()]
    if missing:
        raise FileNotFoundError(f"convert the kept model first (compare_variants): missing {', '.join(missing)}")
    single_view = load_model(folder.single_view_checkpoint)
    rows = {f"{name} with {len(decision['views'])} views (kept)": {
        "views": len(decision["views"]), "validation_auc": decision["val_auc_with_views"],
        **{f"{variant}_ms": LiteModel.load(path).median_latency_ms(image, repeats) for variant, path in kept.items()}}}
    with tempfile.TemporaryDirectory(prefix="medlab-single-view-") as directory:
        single_metadata = {**metadata, "source_model": f"{name} (single view)", "threshold": None,
                           "threshold_rule": None}
        rows[f"{name}, single view"] = {
            "views": 1, "validation_auc": decision["val_auc_single_view"],
            **{f"{variant}_ms": export_variant(single_view, variant, Path(directory) / f"{variant}.tflite",
                                               single_metadata, calibration_images).median_latency_ms(image, repeats)
               for variant in kept}}
    table = pd.DataFrame(rows).T.infer_objects()
    table["views"] = table["views"].astype(int)
    return table


def parity(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray, threshold: float | None,
           max_recall_drop: float = 0.01, class_names: list[str] | None = None) -> dict:
    """How a converted model compares with the Keras model it came from, on the same images.

    ``recall_drop_flag`` is True when recall at the frozen threshold falls by
    more than ``max_recall_drop`` (1 point): quantisation must not silently
    change the clinical picture. Multi-class models decide by argmax:
    ``recall`` is the macro recall, ``recall_change`` the largest drop of any
    one class's recall, and ``agreement_<class>`` the share of that class's
    images on which both models pick the same class.
    """
    from medlab.evaluate import binary_metrics
    from medlab.train import evaluate_auc

    result = {
        "roc_auc": evaluate_auc(labels, candidate),
        "max_abs_probability_difference": float(np.max(np.abs(reference - candidate))),
    }
    if reference.ndim == 1:
        threshold = 0.5 if threshold is None else threshold
        ours, theirs = binary_metrics(labels, candidate, threshold), binary_metrics(labels, reference, threshold)
        result.update({
            "recall": ours["recall"], "specificity": ours["specificity"],
            "decision_agreement": float(np.mean((reference >= threshold) == (candidate >= threshold))),
            "recall_change": ours["recall"] - theirs["recall"],
        })
    else:
        from sklearn.metrics import recall_score

        names = class_names or [str(index) for index in range(reference.shape[1])]
        ours, theirs = candidate.argmax(axis=1), reference.argmax(axis=1)
        every = list(range(len(names)))
        recall_ours = recall_score(labels, ours, labels=every, average=None, zero_division=0)
        recall_theirs = recall_score(labels, theirs, labels=every, average=None, zero_division=0)
        result.update({"recall": float(recall_ours.mean()), "decision_agreement": float(np.mean(ours == theirs)),
                       "recall_change": float(np.min(recall_ours - recall_theirs))})
        for index, name in enumerate(names):
            of_class = np.asarray(labels) == index
            result[f"agreement_{name}"] = float(np.mean(ours[of_class] == theirs[of_class])) if of_class.any() \
                else float("nan")
    result["recall_drop_flag"] = bool(result["recall_change"] < -max_recall_drop)
    return result


def keras_latency_ms(model: keras.Model, image: np.ndarray, repeats: int = 50) -> float:
    """Median wall time of one single-image call of the model as a traced graph on this CPU (after a warm-up).

    Traced with ``tf.function``, as ``model.predict`` and a served model run it
    (and as the TFLite files run): an eager call would time Python's layer-by-
    layer dispatch instead (synthetic six-view scratch CNN: 109 ms eager, 6 ms
    as a graph).
    """
    import tensorflow as tf

    single = tf.constant(np.asarray(image, dtype=np.float32)[None])
    call = tf.function(lambda batch: model(batch, training=False))
    call(single)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call(single).numpy()
        times.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(times)


def compare_variants(model: keras.Model, keras_file: Path, images: np.ndarray, labels: np.ndarray,
                     run: RunFolder, name: str, metadata: dict, calibration_images: np.ndarray,
                     threshold: float | None, latency_repeats: int = 50):
    """Export every variant, run each on ``images`` and compare with Keras: one row per model, as a table.

    The files go where ``run`` keeps them (``tflite/<name>_<variant>.tflite``).

    Columns: size (KiB and relative to float32), median single-image latency,
    ROC-AUC, recall and specificity at ``threshold``, decision agreement,
    largest probability difference, and the recall-drop flag.
    """
    import pandas as pd

    from medlab.train import predict_images

    reference = predict_images(model, images)
    class_names = metadata.get("class_names")
    rows = {"keras": {"size_kb": Path(keras_file).stat().st_size / 1024,
                      "latency_ms": keras_latency_ms(model, images[0], latency_repeats),
                      **parity(reference, reference, labels, threshold, class_names=class_names)}}
    with tempfile.TemporaryDirectory(prefix="medlab-savedmodel-") as exported:
        export_saved_model(model, exported)  # once for float32, float16 and dynamic range
        for variant in VARIANTS:
            lite = export_variant(model, variant, run.tflite(name, variant), metadata, calibration_images,
                                  saved_model=exported)
            rows[variant] = {"size_kb": lite.path.stat().st_size / 1024,
                             "latency_ms": lite.median_latency_ms(images[0], latency_repeats),
                             **parity(reference, lite.predict(images), labels, threshold, class_names=class_names)}
    table = pd.DataFrame(rows).T.infer_objects()
    table["size_vs_float32"] = table["size_kb"] / table.loc["float32", "size_kb"]
    columns = ["size_kb", "size_vs_float32", "latency_ms", "roc_auc", "recall", "specificity",
               "decision_agreement", "max_abs_probability_difference", "recall_drop_flag"]
    per_class = [column for column in table if column.startswith("agreement_")]
    return table[[column for column in columns if column in table] + per_class]
