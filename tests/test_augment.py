import keras
import numpy as np
import pytest

from medlab.augment import (
    TRANSFER_AUGMENTATION,
    AugmentationConfig,
    RandomAffine,
    build_augmentation,
    geometric_layers,
    single_augmentations,
)


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    return rng.uniform(0, 255, (4, 32, 32, 1)).astype("float32")


def test_only_active_in_training(batch):
    layer = build_augmentation(seed=1)
    np.testing.assert_array_equal(layer(batch, training=False).numpy(), batch)
    assert not np.allclose(layer(batch, training=True).numpy(), batch)


def test_same_seed_same_draws(batch):
    first = build_augmentation(seed=3)(batch, training=True).numpy()
    second = build_augmentation(seed=3)(batch, training=True).numpy()
    np.testing.assert_allclose(first, second)


def test_flip_is_off_by_default_and_values_are_checked():
    names = [layer.__class__.__name__ for layer in build_augmentation().layers]
    assert names == ["RandomAffine", "RandomContrast"]
    per_layer = [layer.__class__.__name__ for layer in build_augmentation(TRANSFER_AUGMENTATION).layers]
    assert per_layer == ["RandomRotation", "RandomZoom", "RandomTranslation", "RandomContrast"]  # lessons 04-05
    flipped = [layer.__class__.__name__ for layer in build_augmentation(AugmentationConfig(horizontal_flip=True)).layers]
    assert "RandomFlip" in flipped
    with pytest.raises(ValueError, match="zoom"):
        build_augmentation(AugmentationConfig(zoom=1.5))
    assert list(single_augmentations(AugmentationConfig(rotation=0))) == ["zoom", "translation", "contrast"]
    with pytest.raises(ValueError, match="rotation"):
        build_augmentation(AugmentationConfig(rotation=-0.1))


def test_contrast_keeps_pixel_range(batch):
    layer = build_augmentation(AugmentationConfig(rotation=0, zoom=0, translation=0, contrast=0.5), seed=0)
    out = layer(batch, training=True).numpy()
    assert out.min() >= 0 and out.max() <= 255


def test_one_resampling_is_the_three_keras_layers_composed():
    """Same draws as RandomRotation, RandomZoom and RandomTranslation one after the other, one resampling.

    On a linear ramp bilinear interpolation is exact, so away from the edges (where each of the three layers
    reflects on its own) one resampling and three agree to float rounding.
    """
    rows, columns = np.mgrid[0:48, 0:48].astype("float32")
    ramp = np.repeat((2 * columns + 3 * rows)[None, :, :, None], 6, axis=0)
    for seed in (0, 7):
        once = RandomAffine(0.03, 0.1, 0.08, seed=seed)(ramp, training=True).numpy()
        three_times = keras.Sequential(geometric_layers(0.03, 0.1, 0.08, seed))(ramp, training=True).numpy()
        assert np.abs(once - ramp).max() > 5  # it moved the images
        np.testing.assert_allclose(once[:, 12:36, 12:36], three_times[:, 12:36, 12:36], atol=1e-3)


@pytest.mark.parametrize("rotation,zoom,translation", [(0.05, 0, 0), (0, 0.2, 0), (0, 0, 0.1)])
def test_one_geometric_layer_alone_is_exactly_that_keras_layer(batch, rotation, zoom, translation):
    (keras_layer,) = geometric_layers(rotation, zoom, translation, seed=3)
    ours = RandomAffine(rotation, zoom, translation, seed=3)(batch, training=True).numpy()
    np.testing.assert_allclose(ours, keras_layer(batch, training=True).numpy(), atol=1e-4)


def test_random_affine_is_saved_and_loaded_with_its_settings(batch):
    layer = RandomAffine(0.03, 0.1, 0.08, seed=9)
    restored = RandomAffine.from_config(layer.get_config())
    assert (restored.rotation, restored.zoom, restored.translation, restored.seed) == (0.03, 0.1, 0.08, 9)
    np.testing.assert_array_equal(restored(batch, training=True).numpy(), layer(batch, training=True).numpy())
    np.testing.assert_array_equal(layer(batch).numpy(), batch)  # inference: unchanged
