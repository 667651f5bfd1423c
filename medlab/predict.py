"""Use a trained model: load it from a run folder and predict images with training's own preprocessing.

``medlab predict IMAGE... --run reports/<run>`` and the web app
(:mod:`medlab.serve`) both go through :class:`Predictor`: the model the run's
evaluation chose (or one named), its class names, and the decision threshold
frozen on validation data. Images are decoded and resized by
:func:`medlab.data.folder.decode_files`, the same ``tf.data`` code that prepared
the training data, so a prediction sees exactly what the model was trained on.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medlab.data import dicom, images_dataset
from medlab.data.folder import (
    IMAGE_SUFFIXES,
    TF_DECODABLE,
    decode_error,
    decode_files,
    decode_image_file,
    read_header,
)
from medlab.evaluate import chosen_model
from medlab.runs import RunFolder, read_json

MODEL_KINDS = ("keras", "tflite-float32", "tflite-float16", "tflite-dynamic_range", "tflite-int8")


class PredictError(ValueError):
    """A run folder or model that cannot be used; the message says what is missing."""


@dataclass
class Prediction:
    source: str
    predicted_class: str | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    crossed_threshold: bool | None = None
    error: str | None = None

    def as_dict(self) -> dict:
        return {"file": self.source, "predicted_class": self.predicted_class, "probabilities": self.probabilities,
                "crossed_threshold": self.crossed_threshold, "error": self.error}


class Predictor:
    """A run's trained model with its class names, input shape and frozen threshold."""

    def __init__(self, run_dir: str | Path, kind: str = "keras", model_name: str | None = None):
        if kind not in MODEL_KINDS:
            raise PredictError(f"--model must be one of {', '.join(MODEL_KINDS)}, got {kind!r}")
        self.run_dir = Path(run_dir)
        run = RunFolder(self.run_dir)
        if not run.models_dir.is_dir():
            raise PredictError(f"{self.run_dir} has no models/ folder: run `make reports` first "
                               "(or pass --run reports/<run>)")
        try:
            self.model_name, self.threshold = chosen_model(self.run_dir, model_name)
        except FileNotFoundError as error:
            raise PredictError(str(error)) from None
        model = run.model(self.model_name)
        if not model.path.is_dir():
            available = [folder.name for folder in run.models()]
            raise PredictError(f"no model {self.model_name!r} in {run.models_dir} (available: {available})")
        dataset = read_json(run.record("dataset"))
        self.class_names: list[str] = dataset["class_names"]
        height, width = dataset["image_size"]
        self.image_shape = (height, width, dataset["channels"])
        self.synthetic = bool(dataset.get("synthetic"))
        self.kind = kind
        self.keras_model = None
        self.lite_model = None
        if kind == "keras":

            from medlab.models import load_model

            self.keras_model = load_model(model.checkpoint)
        else:
            from medlab.export import LiteModel

            variant = kind.removeprefix("tflite-")
            path = run.tflite(self.model_name, variant)
            if not path.exists():
                raise PredictError(f"{path} does not exist: run notebook 07 (make reports) to export it")
            self.lite_model = LiteModel.load(path)

    @property
    def binary(self) -> bool:
        return len(self.class_names) == 2

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """(N, C) class probabilities for uint8 images already at the model's input shape."""
        if self.lite_model is not None:
            output = self.lite_model.predict(images)
        else:
            batch = np.asarray(images, dtype="float32")
            output = (self.keras_model(batch, training=False).numpy() if len(batch) <= 64
                      else self.keras_model.predict(images_dataset(batch, 64), verbose=0))
            output = output[:, 0] if output.shape[1] == 1 else output
        return np.stack([1.0 - output, output], axis=1) if output.ndim == 1 else output

    def describe(self, probabilities: np.ndarray, source: str) -> Prediction:
        """Turn one row of class probabilities into a decision, using the frozen threshold for binary tasks."""
        if self.binary:
            threshold = 0.5 if self.threshold is None else self.threshold
            crossed = bool(probabilities[1] >= threshold)
            predicted = self.class_names[int(crossed)]
        else:
            crossed = None
            predicted = self.class_names[int(np.argmax(probabilities))]
        return Prediction(source, predicted, {name: round(float(p), 6) for name, p in
                                              zip(self.class_names, probabilities)}, crossed)

    def decode(self, paths: list[Path]) -> tuple[np.ndarray, list[int], dict[int, str]]:
        """Decode and resize like training; return (images, indices of those images, {index: error})."""
        errors: dict[int, str] = {}
        readable, use_pillow = [], []
        for index, path in enumerate(paths):
            header = read_header(Path(path)) if Path(path).is_file() else "no such file"
            if isinstance(header, str):
                errors[index] = header
                continue
            readable.append(index)
            use_pillow.append(header[1] not in TF_DECODABLE.get(header[0], set()))
        height, _width, channels = self.image_shape
        if not readable:
            return np.zeros((0, *self.image_shape), np.uint8), [], errors
        if len(readable) <= 16:  # a few files (the web app): decode eagerly, no pipeline to build
            images, failed = [], []
            for position, (index, pillow) in enumerate(zip(readable, use_pillow)):
                try:
                    images.append(decode_image_file(str(paths[index]), pillow, height, channels).numpy())
                except Exception:  # TensorFlow and Pillow decode errors alike
                    images.append(np.zeros(self.image_shape, np.uint8))
                    failed.append(position)
            images = np.stack(images)
        else:
            images, failed = decode_files([Path(paths[i]) for i in readable], use_pillow, height, channels,
                                          progress=False)
        for position in failed:
            errors[readable[position]] = f"could not be decoded ({decode_error(Path(paths[readable[position]]))})"
        keep = [position for position in range(len(readable)) if position not in set(failed)]
        return images[keep], [readable[position] for position in keep], errors

    def predict_files(self, paths: list[Path]) -> list[Prediction]:
        """Predict every readable image; unreadable ones come back with ``error`` set."""
        images, indices, errors = self.decode(paths)
        results = {index: Prediction(str(paths[index]), error=reason) for index, reason in errors.items()}
        if indices:
            for index, row in zip(indices, self.probabilities(images)):
                results[index] = self.describe(row, str(paths[index]))
        return [results[index] for index in range(len(paths))]

    def gradcam(self, images: np.ndarray) -> np.ndarray | None:
        """Grad-CAM heatmaps for the decision (Keras models only; None for TFLite)."""
        if self.keras_model is None:
            return None
        from medlab.explain import gradcam

        return gradcam(self.keras_model, images)


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given; folders expanded to the images inside them; shell-style globs expanded."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths += sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
                            and (p.suffix.lower() in IMAGE_SUFFIXES or dicom.is_dicom(p)))
        elif any(character in item for character in "*?[") and not path.exists():
            paths += sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
        else:
            paths.append(path)
    return paths


def default_run(reports_dir: Path) -> Path:
    """The most recently written complete run under ``reports/``."""
    runs = [RunFolder(p) for p in reports_dir.glob("*") if not p.name.endswith(".failed")]
    runs = [run for run in runs if run.models_dir.is_dir()]
    if not runs:
        raise PredictError(f"no run with trained models under {reports_dir}: run `make reports` first")
    return max(runs, key=lambda run: run.metrics.stat().st_mtime if run.metrics.exists() else 0).root
