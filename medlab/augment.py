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

from dataclasses import asdict, dataclass

from medlab import config


@dataclass(frozen=True)
class AugmentationConfig:
    """Strengths of each augmentation; 0 (or False) turns one off."""

    horizontal_flip: bool = False
    rotation: float = 0.03  # fraction of a full turn: 0.03 is about +-11 degrees
    zoom: float = 0.10  # +-10% zoom
    translation: float = 0.08  # +-8% of height and width
    contrast: float = 0.15  # contrast factor drawn from [1 - 0.15, 1 + 0.15]

    def as_dict(self) -> dict:
        return asdict(self)


def build_augmentation(cfg: AugmentationConfig | None = None, seed: int = config.DEFAULT_SEED):
    """A ``keras.Sequential`` of seeded random layers; active only with ``training=True``.

    Inputs and outputs are float images in [0, 255].
    """
    import keras

    cfg = cfg or AugmentationConfig()
    for name in ("rotation", "zoom", "translation", "contrast"):
        value = getattr(cfg, name)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    layers = []
    if cfg.horizontal_flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if cfg.rotation:
        layers.append(keras.layers.RandomRotation(cfg.rotation, fill_mode="reflect", seed=seed + 1))
    if cfg.zoom:
        layers.append(keras.layers.RandomZoom(cfg.zoom, fill_mode="reflect", seed=seed + 2))
    if cfg.translation:
        layers.append(keras.layers.RandomTranslation(
            cfg.translation, cfg.translation, fill_mode="reflect", seed=seed + 3))
    if cfg.contrast:
        layers.append(keras.layers.RandomContrast(cfg.contrast, value_range=(0, 255), seed=seed + 4))
    return keras.Sequential(layers, name="augmentation")


def single_augmentations(cfg: AugmentationConfig | None = None, seed: int = config.DEFAULT_SEED):
    """Each enabled augmentation on its own, as ``{name: layer}``, for teaching figures."""
    import keras

    cfg = cfg or AugmentationConfig()
    full = build_augmentation(cfg, seed)
    return {layer.__class__.__name__.removeprefix("Random").lower(): keras.Sequential([layer])
            for layer in full.layers}
