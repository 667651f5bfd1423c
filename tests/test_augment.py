import numpy as np
import pytest

from medlab.augment import AugmentationConfig, build_augmentation, single_augmentations


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
    assert "RandomFlip" not in names and "RandomRotation" in names
    flipped = [layer.__class__.__name__ for layer in build_augmentation(AugmentationConfig(horizontal_flip=True)).layers]
    assert "RandomFlip" in flipped
    with pytest.raises(ValueError, match="zoom"):
        build_augmentation(AugmentationConfig(zoom=1.5))
    assert list(single_augmentations(AugmentationConfig(rotation=0))) == ["zoom", "translation", "contrast"]


def test_contrast_keeps_pixel_range(batch):
    layer = build_augmentation(AugmentationConfig(rotation=0, zoom=0, translation=0, contrast=0.5), seed=0)
    out = layer(batch, training=True).numpy()
    assert out.min() >= 0 and out.max() <= 255
