"""Data augmentation with Keras preprocessing layers.

Augmentation shows the network plausible variations of the training images
(a slightly rotated, shifted, zoomed or differently exposed film) so that it
learns the anatomy and the disease rather than the exact pixels. It runs on
training batches only, inside the ``tf.data`` pipeline (see
:func:`medlab.data.make_tf_dataset`), so the saved model contains no random
layers and exports cleanly.

Chest films have a left and a right: the heart sits on the patient's left.
A horizontal flip makes a mirror-image anatomy that no scanner produces, so
``horizontal_flip`` is off by default; turn it on for data without handedness.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import keras

from medlab import config


@dataclass(frozen=True)
class AugmentationConfig:
    """Strengths of each augmentation; 0 (or False) turns one off."""

    horizontal_flip: bool = False
    rotation: float = 0.03  # fraction of a full turn: 0.03 is about +-11 degrees
    zoom: float = 0.10  # +-10% zoom
    translation: float = 0.08  # +-8% of height and width
    contrast: float = 0.15  # contrast factor drawn from [1 - 0.15, 1 + 0.15]
    one_resampling: bool = True  # rotation, zoom and shift in one interpolation (False: one each, blurrier)

    def as_dict(self) -> dict:
        return asdict(self)


# Lessons 04 and 05 (MobileNetV2) resample once per geometric layer. From random weights (the offline default) on
# PneumoniaMNIST, MobileNetV2 generalised worse on the sharper images of one resampling (an earlier sitting on
# another machine, 3 seeds: test ROC-AUC 0.968 -> 0.959, accuracy 0.912 -> 0.881), while lesson 03's CNN gained
# (0.979 -> 0.982); see the README, Training speed.
TRANSFER_AUGMENTATION = AugmentationConfig(one_resampling=False)


def build_augmentation(cfg: AugmentationConfig | None = None, seed: int = config.DEFAULT_SEED):
    """A ``keras.Sequential`` of seeded random layers; active only with ``training=True``.

    Inputs and outputs are float images in [0, 255].
    """
    return keras.Sequential(_augmentation_layers(cfg or AugmentationConfig(), seed), name="augmentation")


def single_augmentations(cfg: AugmentationConfig | None = None, seed: int = config.DEFAULT_SEED):
    """Each enabled augmentation on its own, as ``{name: layer}``, for teaching figures (same draws as in training)."""
    return {layer.__class__.__name__.removeprefix("Random").lower(): keras.Sequential([layer])
            for layer in _augmentation_layers(replace(cfg or AugmentationConfig(), one_resampling=False), seed)}


def _augmentation_layers(cfg: AugmentationConfig, seed: int) -> list:
    """Flip, the geometric layers (as one :class:`RandomAffine` or one by one), contrast: those turned on."""
    for name in ("rotation", "zoom", "translation", "contrast"):
        value = getattr(cfg, name)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    layers = [keras.layers.RandomFlip("horizontal", seed=seed)] if cfg.horizontal_flip else []
    geometric = geometric_layers(cfg.rotation, cfg.zoom, cfg.translation, seed + 1)
    if geometric:
        layers += [RandomAffine(cfg.rotation, cfg.zoom, cfg.translation, seed=seed + 1)] if cfg.one_resampling else geometric
    if cfg.contrast:
        layers.append(keras.layers.RandomContrast(cfg.contrast, value_range=(0, 255), seed=seed + 4))
    return layers


def geometric_layers(rotation: float, zoom: float, translation: float, seed: int) -> list:
    """Keras' ``RandomRotation``, ``RandomZoom`` and ``RandomTranslation`` (those not 0), reflecting at the edges.

    Seeds ``seed``, ``seed + 1`` and ``seed + 2``: each layer's draws do not depend on which others are on.
    """
    steps = []
    if rotation:
        steps.append(keras.layers.RandomRotation(rotation, fill_mode="reflect", seed=seed))
    if zoom:
        steps.append(keras.layers.RandomZoom(zoom, fill_mode="reflect", seed=seed + 1))
    if translation:
        steps.append(keras.layers.RandomTranslation(translation, translation, fill_mode="reflect", seed=seed + 2))
    return steps


def transform_matrices(step, images):
    """A batch of 3 x 3 matrices for one draw of Keras layer ``step``: output pixel (x, y, 1) -> input pixel."""
    ops = keras.ops
    drawn = step.get_random_transformation(images, training=True)
    if isinstance(step, keras.layers.RandomRotation):
        flat = drawn["rotation_matrix"]  # [a0 a1 a2 b0 b1 b2 0 0] per image, as the layer resamples with
    elif isinstance(step, keras.layers.RandomZoom):  # as RandomZoom builds it: zoom about the image's centre
        zoom_x, zoom_y = drawn["width_zoom"], drawn["height_zoom"]
        height, width = (ops.cast(size, "float32") for size in ops.shape(images)[1:3])
        zeros = ops.zeros_like(zoom_x)
        flat = ops.concatenate([zoom_x, zeros, (width - 1) / 2 * (1 - zoom_x),
                                zeros, zoom_y, (height - 1) / 2 * (1 - zoom_y), zeros, zeros], axis=1)
    elif isinstance(step, keras.layers.RandomTranslation):  # as RandomTranslation builds it: [1 0 -dx 0 1 -dy 0 0]
        shift = drawn["translations"]
        ones, zeros = ops.ones_like(shift[:, :1]), ops.zeros_like(shift[:, :1])
        flat = ops.concatenate([ones, zeros, -shift[:, :1], zeros, ones, -shift[:, 1:], zeros, zeros], axis=1)
    else:
        raise ValueError(f"no transform matrix for {type(step).__name__}")
    return ops.reshape(ops.concatenate([ops.cast(flat, "float32"), ops.ones_like(flat[:, :1])], axis=1), (-1, 3, 3))


@keras.saving.register_keras_serializable(package="medlab")
class RandomAffine(keras.layers.Layer):
    """Keras' random rotation, zoom and shift, drawn as those three layers draw them, in one resampling.

    ``RandomRotation``, ``RandomZoom`` and ``RandomTranslation`` one after the
    other resample every image three times (bilinear, reflecting at the edges),
    each pass blurring it a little. This layer asks each of them for its random
    draw, multiplies the three matrices (rotation x zoom x shift: the output
    pixel is mapped by the last layer's matrix first) and resamples once. The
    same geometry for less than half the work: with contrast, 60 -> 28 ms per
    batch of 64 at 128 px on one core, time the training step waits for on a
    2-core machine.
    """

    def __init__(self, rotation: float = 0.0, zoom: float = 0.0, translation: float = 0.0,
                 seed: int = config.DEFAULT_SEED, **kwargs):
        super().__init__(**kwargs)
        self.rotation, self.zoom, self.translation, self.seed = rotation, zoom, translation, seed
        self.steps = geometric_layers(rotation, zoom, translation, seed)

    def build(self, input_shape):
        for step in self.steps:  # drawn from, never called: built here
            step.build(input_shape)

    def call(self, images, training=False):
        if not training or not self.steps:
            return images
        matrix = transform_matrices(self.steps[0], images)
        for step in self.steps[1:]:
            matrix = keras.ops.matmul(matrix, transform_matrices(step, images))
        flat = keras.ops.reshape(matrix, (-1, 9))[:, :8]
        return keras.ops.image.affine_transform(images, flat, interpolation="bilinear", fill_mode="reflect")

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rotation": self.rotation, "zoom": self.zoom,
                "translation": self.translation, "seed": self.seed}

