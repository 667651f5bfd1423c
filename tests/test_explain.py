import keras
import numpy as np
import pytest

from medlab.explain import gradcam, pointing_game, randomisation_check
from medlab.models import build_scratch_cnn


@pytest.fixture(scope="module")
def planted():
    """Images whose class is decided by a bright square planted at a random place."""
    rng = np.random.default_rng(0)
    images = rng.normal(100, 10, (400, 32, 32, 1)).clip(0, 255).astype("float32")
    labels = np.arange(400) % 2
    masks = np.zeros((400, 32, 32), bool)
    for index in np.nonzero(labels)[0]:
        row, column = rng.integers(2, 24, 2)
        images[index, row:row + 6, column:column + 6] = 230
        masks[index, row:row + 6, column:column + 6] = True
    keras.utils.set_random_seed(0)
    # One convolution block: its feature maps keep the full 32 x 32 resolution.
    model = build_scratch_cnn((32, 32, 1), 2, images, filters=(16,), dense_units=16, dropout=0.0)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="binary_crossentropy", metrics=["accuracy"])
    model.fit(images, labels.astype("float32"), epochs=8, batch_size=32, verbose=0)
    return model, images, labels, masks


def test_gradcam_lights_up_the_planted_square(planted):
    model, images, labels, masks = planted
    positives = np.nonzero(labels)[0][:40]
    heatmaps = gradcam(model, images[positives])
    assert heatmaps.shape == (40, 32, 32) and heatmaps.max() <= 1.0 + 1e-6 and heatmaps.min() >= 0
    result = pointing_game(heatmaps, masks[positives])
    assert result["chance"] == pytest.approx(36 / 1024)
    assert result["hit_rate"] > 0.7 > 5 * result["chance"]
    inside = np.mean([h[m].mean() for h, m in zip(heatmaps, masks[positives])])
    outside = np.mean([h[~m].mean() for h, m in zip(heatmaps, masks[positives])])
    assert inside > 2 * outside


def test_randomised_model_gives_different_heatmaps(planted):
    model, images, labels, _masks = planted
    result = randomisation_check(model, images[np.nonzero(labels)[0][:20]])
    assert result["mean_spearman"] < 0.5


def test_pointing_game_tolerance_and_chance():
    masks = np.zeros((1, 10, 10), bool)
    masks[0, 4, 4] = True
    heatmap = np.zeros((1, 10, 10))
    heatmap[0, 4, 6] = 1.0  # two pixels to the right of the lesion
    assert pointing_game(heatmap, masks)["hit_rate"] == 0.0
    grown = pointing_game(heatmap, masks, tolerance=2)
    assert grown["hit_rate"] == 1.0 and grown["chance"] == pytest.approx(13 / 100)  # a diamond of radius 2


def test_pointing_game_checks_shapes():
    with pytest.raises(ValueError):
        pointing_game(np.zeros((2, 4, 4)), np.zeros((2, 5, 5), bool))
    with pytest.raises(ValueError):
        pointing_game(np.zeros((2, 4, 4)), np.zeros((2, 4, 4), bool))


def test_gradcam_of_an_averaged_model_sums_its_members(planted):
    from medlab.models import average_models

    model, images, labels, masks = planted
    positives = np.nonzero(labels)[0][:20]
    twice = average_models([model, model])  # two identical members: the same evidence as one
    assert len({layer.name for layer in twice.layers}) == len(twice.layers)
    np.testing.assert_allclose(gradcam(twice, images[positives]), gradcam(model, images[positives]), atol=1e-4)
    # One member alone explains only its own part of the average.
    alone = gradcam(twice, images[positives], layer_name="member1_block1_conv")
    np.testing.assert_allclose(alone, gradcam(model, images[positives]), atol=1e-4)


def test_gradcam_of_a_model_on_stacked_views_explains_the_image_as_it_is(planted):
    """With views stacked along the batch axis, the first rows are the image itself: the map is the model's own."""
    from medlab.models import average_models, test_time_views

    model, images, labels, _masks = planted
    positives = np.nonzero(labels)[0][:12]
    viewed = average_models([model], views=test_time_views(images.shape[1:]))
    np.testing.assert_allclose(gradcam(viewed, images[positives]), gradcam(model, images[positives]), atol=1e-4)
