import h5py
import keras
import numpy as np
import pytest
from conftest import needs_bfloat16
from keras.src.legacy.saving import legacy_h5_format

from medlab import models
from medlab.models import (
    BACKBONES,
    backbone_layers,
    build_scratch_cnn,
    build_transfer_model,
    count_trainable_layers,
    last_conv_layer_name,
    unfreeze_top_layers,
)


@pytest.mark.parametrize("num_classes,units,activation", [(2, 1, "sigmoid"), (4, 4, "softmax")])
def test_scratch_cnn_head(num_classes, units, activation):
    images = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 1)).astype("float32")
    model = build_scratch_cnn((32, 32, 1), num_classes, images)
    assert model.output_shape == (None, units)
    assert model.layers[-1].activation.__name__ == activation
    assert last_conv_layer_name(model) == "block3_conv"
    normalized = model.get_layer("normalization")(images).numpy()
    assert abs(normalized.mean()) < 1e-3 and abs(normalized.std() - 1) < 1e-2  # adapted to the training data
    assert [layer.filters for layer in model.layers if isinstance(layer, keras.layers.Conv2D)] == [32, 64, 128]


def test_scratch_cnn_width_and_depth_are_parameters():
    model = build_scratch_cnn((32, 32, 3), 3, filters=(8, 16), dense_units=16, dropout=0.1)
    assert [layer.filters for layer in model.layers if isinstance(layer, keras.layers.Conv2D)] == [8, 16]
    with pytest.raises(ValueError):
        build_scratch_cnn((32, 32), 2)
    with pytest.raises(ValueError):
        build_scratch_cnn((32, 32, 1), 1)


def test_scratch_cnn_pools_before_relu_and_matches_the_textbook_order_bit_for_bit():
    import tensorflow as tf

    images = np.random.default_rng(0).uniform(0, 255, (8, 16, 16, 1)).astype("float32")
    model = build_scratch_cnn((16, 16, 1), 2, images, filters=(4, 8), dense_units=8, dropout=0.0)
    names = [layer.name for layer in model.layers]
    assert names.index("block1_pool") < names.index("block1_relu")  # ReLU on a quarter of the pixels

    inputs = x = keras.Input((16, 16, 1))
    normalization = keras.layers.Normalization(axis=None)
    normalization.adapt(images)
    x = normalization(x)
    for width in (4, 8):  # the textbook block: convolution, batch norm, ReLU, then max-pooling
        x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False)(x)
        x = models.FusedBatchNormalization(momentum=0.9)(x)
        x = keras.layers.MaxPooling2D()(keras.layers.Activation("relu")(x))
    x = keras.layers.Dense(8, use_bias=False)(keras.layers.GlobalAveragePooling2D()(x))
    x = keras.layers.Activation("relu")(models.FusedBatchNormalization(momentum=0.9)(x))
    textbook = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))
    textbook.set_weights(model.get_weights())

    def outputs_and_gradients(network):
        with tf.GradientTape() as tape:
            outputs = network(images, training=True)
            loss = tf.reduce_sum(outputs)
        return [outputs.numpy()] + [g.numpy() for g in tape.gradient(loss, network.trainable_variables)]

    for ours, theirs in zip(outputs_and_gradients(model), outputs_and_gradients(textbook), strict=True):
        np.testing.assert_array_equal(ours, theirs)  # bit for bit, not just close


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_transfer_models_are_flat_frozen_and_unfreezable(backbone):
    model, info = build_transfer_model((28, 28, 1), 4, backbone=backbone, weights=None, backbone_size=32,
                                       freeze_backbone=True)
    assert not info.pretrained and info.frozen and info.backbone_size == 32
    assert model.output_shape == (None, 4) and model.layers[-1].activation.__name__ == "softmax"
    assert count_trainable_layers(model) == 1  # only the new output layer learns
    # Flat graph: the last convolution is a layer of the model itself, reachable from its input.
    conv_name = last_conv_layer_name(model)
    probe = keras.Model(model.inputs, [model.get_layer(conv_name).output, model.output])
    feature_maps, predictions = probe([np.zeros((2, 28, 28, 1), "float32")])
    assert feature_maps.shape[0] == 2 and predictions.shape == (2, 4)
    unfrozen = unfreeze_top_layers(model, 12)
    assert 0 < unfrozen <= 12
    assert count_trainable_layers(model) == 1 + unfrozen
    top = backbone_layers(model)[-12:]
    assert all(not layer.trainable for layer in top if isinstance(layer, keras.layers.BatchNormalization))
    unfreeze_top_layers(model, 0)
    assert count_trainable_layers(model) == 1


def test_binary_transfer_model_has_one_sigmoid():
    model, _ = build_transfer_model((32, 32, 3), 2, weights=None, backbone_size=32)
    assert model.output_shape == (None, 1) and model.layers[-1].activation.__name__ == "sigmoid"


def test_each_backbone_gets_its_own_preprocessing():
    pixels = np.full((1, 4, 4, 3), 255.0, "float32")
    mobilenet = models.BackbonePreprocessing("mobilenet_v2")(pixels).numpy()
    vgg = models.BackbonePreprocessing("vgg16")(pixels).numpy()
    np.testing.assert_allclose(mobilenet, 1.0)  # scaled to [-1, 1]
    np.testing.assert_allclose(vgg[0, 0, 0], [255 - 103.939, 255 - 116.779, 255 - 123.68], rtol=1e-5)  # BGR, means
    with pytest.raises(ValueError):
        models.BackbonePreprocessing("alexnet")


@pytest.fixture
def keras_cache(tmp_path, monkeypatch):
    """A private, empty Keras cache (what ~/.keras is on a fresh machine)."""
    monkeypatch.setattr(keras.src.backend.config, "_KERAS_DIR", str(tmp_path / "keras"))
    return tmp_path / "keras"


def test_offline_without_cached_weights_falls_back_loudly(keras_cache, monkeypatch):
    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: [Errno -2] Name or service not known")

    monkeypatch.setattr(keras.src.utils.file_utils, "get_file", offline)
    with pytest.warns(UserWarning, match="FROM RANDOM INITIALISATION"):
        model, info = build_transfer_model((32, 32, 1), 2, backbone="mobilenet_v2", weights="imagenet",
                                           backbone_size=32)
    assert info.pretrained is False and "could not be loaded" in info.message
    assert model.output_shape == (None, 1)
    # Frozen random features are useless: without pretrained weights the backbone trains.
    assert not info.frozen and count_trainable_layers(model) > 50


def test_cached_imagenet_weights_are_used_offline(keras_cache, monkeypatch):
    requested = []
    real_get_file = keras.src.utils.file_utils.get_file

    def no_network(fname=None, origin=None, **kwargs):
        requested.append(fname)
        if not (keras_cache / "models" / fname).exists():
            raise Exception("URL fetch failure (offline test)")
        return real_get_file(fname, origin, **{**kwargs, "file_hash": None})

    monkeypatch.setattr(keras.src.utils.file_utils, "get_file", no_network)
    with pytest.warns(UserWarning):
        build_transfer_model((32, 32, 1), 2, backbone="mobilenet_v2", weights="imagenet", backbone_size=32)
    # Plant "ImageNet" weights (here: a seeded random network) where Keras looks for them.
    keras.utils.set_random_seed(7)
    reference = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3))
    (keras_cache / "models").mkdir(parents=True, exist_ok=True)
    with h5py.File(keras_cache / "models" / requested[0], "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, reference)
    model, info = build_transfer_model((32, 32, 1), 2, backbone="mobilenet_v2", weights="imagenet",
                                       backbone_size=32)
    assert info.pretrained is True and info.frozen and count_trainable_layers(model) == 1
    np.testing.assert_allclose(model.get_layer("Conv1").get_weights()[0], reference.get_layer("Conv1").get_weights()[0])
    # The same file passed as a path works too.
    model, info = build_transfer_model((32, 32, 1), 2, weights=str(keras_cache / "models" / requested[0]),
                                       backbone_size=32)
    assert info.pretrained is True
    with pytest.raises(FileNotFoundError):
        build_transfer_model((32, 32, 1), 2, weights="/no/such/file.h5")


def test_saved_transfer_model_loads_with_its_custom_layer(tmp_path):
    model, _ = build_transfer_model((28, 28, 1), 2, weights=None, backbone_size=32)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    batch = np.random.default_rng(0).uniform(0, 255, (3, 28, 28, 1)).astype("float32")
    np.testing.assert_allclose(loaded.predict(batch, verbose=0), model.predict(batch, verbose=0), atol=1e-6)


@pytest.mark.parametrize("num_classes", [2, 4])
def test_average_models_averages_logits_in_one_flat_graph(num_classes, tmp_path):
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (16, 24, 24, 1)).astype("float32")
    members = []
    for seed in range(3):
        keras.utils.set_random_seed(seed)
        members.append(build_scratch_cnn((24, 24, 1), num_classes, images * (1 + seed / 10), filters=(4, 8),
                                         dense_units=8))
    averaged = models.average_models(members, name="scratch_cnn")
    assert not any(isinstance(layer, keras.Model) for layer in averaged.layers)  # flat, nothing nested
    assert models.gradcam_layer_names(averaged) == ["member1_block2_conv", "member2_block2_conv",
                                                    "member3_block2_conv"]
    assert models.gradcam_layer_names(members[0]) == ["block2_conv"]
    logits = [keras.Model(m.input, m.layers[-1].input)(images) for m in members]  # each member's head input
    logits = np.mean([m.layers[-1].kernel.numpy().T @ np.asarray(h).T + m.layers[-1].bias.numpy()[:, None]
                      for m, h in zip(members, logits)], axis=0).T
    expected = 1 / (1 + np.exp(-logits)) if num_classes == 2 else np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(averaged.predict(images, verbose=0), expected, atol=1e-5)
    averaged.save(tmp_path / "averaged.keras")  # saves and loads like any model
    np.testing.assert_allclose(keras.saving.load_model(tmp_path / "averaged.keras").predict(images, verbose=0),
                               expected, atol=1e-5)
    assert models.average_models(members[:1]) is members[0]
    with pytest.raises(ValueError, match="input shapes"):
        models.average_models([members[0], build_scratch_cnn((32, 32, 1), num_classes, filters=(4,))])
    with pytest.raises(ValueError, match="at least one"):
        models.average_models([])


def test_image_view_mirrors_and_rolls_like_numpy(tmp_path):
    images = np.arange(2 * 5 * 6 * 1, dtype="float32").reshape(2, 5, 6, 1)
    for mirror, rows, columns in [(True, 0, 0), (False, 2, 0), (False, -1, 0), (False, 0, 3), (True, -2, 1)]:
        expected = np.roll(images[:, :, ::-1] if mirror else images, (rows, columns), axis=(1, 2))
        view = models.ImageView(mirror, rows, columns)
        np.testing.assert_array_equal(np.asarray(view(images)), expected)
        assert models.ImageView.from_config(view.get_config()).get_config() == view.get_config()
    assert models.test_time_views((64, 64, 1)) == [(False, 0, 0), (True, 0, 0), (False, 2, 0), (False, -2, 0),
                                                   (False, 0, 2), (False, 0, -2)]
    assert models.test_time_views((28, 28, 1))[2] == (False, 1, 0)  # at least one pixel


@pytest.mark.parametrize("num_classes", [2, 4])
def test_average_models_over_views_averages_each_views_logits(num_classes, tmp_path):
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 255, (8, 16, 16, 1)).astype("float32")
    keras.utils.set_random_seed(0)
    member = build_scratch_cnn((16, 16, 1), num_classes, images, filters=(4, 8), dense_units=8)
    views = models.test_time_views(images.shape[1:])
    viewed = models.average_models([member], name="scratch_cnn", views=views)
    assert len(viewed.layers) > len(member.layers) and not any(isinstance(layer, keras.Model) for layer in viewed.layers)
    assert models.gradcam_layer_names(viewed) == ["member1_block2_conv"]  # the unshifted view only
    head = keras.Model(member.input, member.layers[-1].input)
    kernel, bias = member.layers[-1].kernel.numpy(), member.layers[-1].bias.numpy()
    logits = np.mean([np.asarray(head(np.roll(images[:, :, ::-1] if mirror else images, (rows, columns),
                                              axis=(1, 2)))) @ kernel + bias
                      for mirror, rows, columns in views], axis=0)
    expected = 1 / (1 + np.exp(-logits)) if num_classes == 2 else np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(viewed.predict(images, verbose=0), expected, atol=1e-5)
    assert not np.allclose(member.predict(images, verbose=0), expected, atol=1e-3)  # the views do change something
    viewed.save(tmp_path / "viewed.keras")
    np.testing.assert_allclose(models.load_model(tmp_path / "viewed.keras").predict(images, verbose=0), expected,
                               atol=1e-5)
    # One copy of the weights sees every view, stacked along the batch axis.
    assert viewed.count_params() == member.count_params()
    assert [type(layer).__name__ for layer in viewed.layers].count("Conv2D") == 2
    two = models.average_models([member, member], views=views[:2])  # members x views
    assert models.gradcam_layer_names(two) == ["member1_block2_conv", "member2_block2_conv"]
    with pytest.raises(ValueError, match="first view"):
        models.average_models([member], views=views[1:])


def test_view_stack_and_view_mean_undo_each_other_and_round_trip():
    images = np.arange(3 * 4 * 5 * 1, dtype="float32").reshape(3, 4, 5, 1)
    views = [(False, 0, 0), (True, 0, 0), (False, 1, 0), (False, 0, -2)]
    stacked = np.asarray(models.ViewStack(views)(images))
    assert stacked.shape == (12, 4, 5, 1)
    for k, view in enumerate(views):  # rows k*N .. (k+1)*N - 1 are view k
        np.testing.assert_array_equal(stacked[3 * k:3 * k + 3], np.asarray(models.ImageView(*view)(images)))
    mean = np.asarray(models.ViewMean(len(views))(stacked))
    np.testing.assert_allclose(mean, stacked.reshape(4, 3, 4, 5, 1).mean(axis=0))
    for layer in (models.ViewStack(views, name="s"), models.ViewMean(4, name="m")):
        assert type(layer).from_config(layer.get_config()).get_config() == layer.get_config()
    with pytest.raises(ValueError, match="first view"):
        models.ViewStack([(True, 0, 0)])


def test_gradcam_layer_names_leave_out_shifted_members_of_older_view_models():
    """Models saved before views were stacked had one member per view (``member<k>_view``): only unshifted ones count."""
    inputs = keras.Input((8, 8, 1))
    branches = []
    for index, view in enumerate([(False, 0, 0), (True, 0, 0)], start=1):
        x = inputs if view == (False, 0, 0) else models.ImageView(*view, name=f"member{index}_view")(inputs)
        x = keras.layers.Conv2D(2, 3, name=f"member{index}_block1_conv")(x)
        branches.append(keras.layers.GlobalAveragePooling2D(name=f"member{index}_pool")(x))
    old = keras.Model(inputs, keras.layers.Average()(branches))
    assert models.gradcam_layer_names(old) == ["member1_block1_conv"]


def test_fused_batchnorm_trains_like_keras_batchnorm():
    """Same outputs, gradients and moving statistics as Keras' BatchNormalization; inference is Keras' own."""
    import tensorflow as tf

    inputs = np.random.default_rng(0).normal(2.0, 3.0, (8, 5, 5, 4)).astype("float32")
    keras_bn = keras.layers.BatchNormalization(momentum=0.9)
    fused_bn = models.FusedBatchNormalization(momentum=0.9)
    for layer in (keras_bn, fused_bn):
        layer.build(inputs.shape)
        layer.gamma.assign(np.linspace(0.5, 2.0, 4))
        layer.beta.assign(np.linspace(-1.0, 1.0, 4))
    outputs, gradients = [], []
    weights = tf.constant(np.random.default_rng(1).normal(size=inputs.shape).astype("float32"))
    for layer in (keras_bn, fused_bn):
        with tf.GradientTape() as tape:
            x = tf.constant(inputs)
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(tf.sin(y) * weights)  # a loss whose gradients are far from zero
        outputs.append(y.numpy())
        gradients.append([g.numpy() for g in tape.gradient(loss, [x, layer.gamma, layer.beta])])
    np.testing.assert_allclose(outputs[1], outputs[0], atol=1e-4)
    for fused, reference in zip(gradients[1], gradients[0]):
        assert np.abs(reference).max() > 0.1
        np.testing.assert_allclose(fused, reference, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(fused_bn.moving_mean.numpy(), keras_bn.moving_mean.numpy(), rtol=1e-5)
    np.testing.assert_allclose(fused_bn.moving_variance.numpy(), keras_bn.moving_variance.numpy(), rtol=1e-4)
    np.testing.assert_allclose(fused_bn(inputs, training=False), keras_bn(inputs, training=False), atol=1e-5)


@needs_bfloat16
def test_fused_batchnorm_takes_bfloat16_without_casting_it():
    """Under mixed_bfloat16 the fused kernel normalises bfloat16 activations as they are, with float32 statistics."""
    import tensorflow as tf

    inputs = np.random.default_rng(0).normal(2.0, 3.0, (8, 5, 5, 4)).astype("float32")
    reference = models.FusedBatchNormalization(momentum=0.9)
    half = models.FusedBatchNormalization(momentum=0.9, dtype="mixed_bfloat16")
    outputs = [layer(tf.cast(inputs, layer.compute_dtype), training=True) for layer in (reference, half)]
    assert outputs[1].dtype == tf.bfloat16 and half.moving_mean.dtype == "float32"
    np.testing.assert_allclose(tf.cast(outputs[1], tf.float32), outputs[0], atol=0.05)  # bfloat16: 8 bits
    np.testing.assert_allclose(half.moving_mean.numpy(), reference.moving_mean.numpy(), rtol=0.02, atol=0.01)
    np.testing.assert_allclose(half.moving_variance.numpy(), reference.moving_variance.numpy(), rtol=0.02)
    graph = tf.function(lambda x: half(x, training=True)).get_concrete_function(
        tf.TensorSpec(inputs.shape, tf.bfloat16)).graph
    casts = [op for op in graph.get_operations() if op.type == "Cast"]
    assert casts and not [op for op in casts if tf.bfloat16 in (op.get_attr("SrcT"), op.get_attr("DstT"))]


@needs_bfloat16
def test_fused_batchnorm_infers_on_bfloat16_without_casting_it():
    """Validation under mixed_bfloat16: the moving statistics applied by the fused kernel, no float32 round trip."""
    import tensorflow as tf

    inputs = np.random.default_rng(0).normal(2.0, 3.0, (8, 5, 5, 4)).astype("float32")
    reference = keras.layers.BatchNormalization(momentum=0.9, dtype="mixed_bfloat16")
    half = models.FusedBatchNormalization(momentum=0.9, dtype="mixed_bfloat16")
    for layer in (reference, half):
        layer.build(inputs.shape)
        layer.gamma.assign(np.linspace(0.5, 2.0, 4))
        layer.beta.assign(np.linspace(-1.0, 1.0, 4))
        layer.moving_mean.assign(np.linspace(1.0, 3.0, 4))
        layer.moving_variance.assign(np.linspace(4.0, 16.0, 4))
    outputs = [layer(tf.cast(inputs, tf.bfloat16), training=False) for layer in (reference, half)]
    assert outputs[1].dtype == tf.bfloat16
    # the same normalisation to bfloat16's 8 bits; the outputs reach about 5 in size
    np.testing.assert_allclose(tf.cast(outputs[1], tf.float32), tf.cast(outputs[0], tf.float32), atol=0.04)
    assert np.abs(tf.cast(outputs[0], tf.float32).numpy()).max() > 3.0
    graph = tf.function(lambda x: half(x, training=False)).get_concrete_function(
        tf.TensorSpec(inputs.shape, tf.bfloat16)).graph
    assert not [op for op in graph.get_operations() if op.type == "Cast"]
    assert [op for op in graph.get_operations() if op.type == "FusedBatchNormV3"]


@needs_bfloat16
def test_as_float32_makes_a_bfloat16_model_compute_in_float32():
    images = np.random.default_rng(0).integers(0, 255, (8, 32, 32, 1)).astype("uint8")
    with models.global_dtype_policy("mixed_bfloat16"):
        half = models.build_scratch_cnn((32, 32, 1), 4, images, filters=(4, 8), dense_units=8)
        full = models.as_float32(half)
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"  # restored
    assert keras.mixed_precision.global_policy().name == "float32"
    assert half.get_layer("block1_conv").compute_dtype == "bfloat16"
    assert {layer.compute_dtype for layer in full.layers} == {"float32"}
    assert [layer.name for layer in full.layers] == [layer.name for layer in half.layers]
    batch = images.astype("float32")
    np.testing.assert_allclose(full.predict(batch, verbose=0), half.predict(batch, verbose=0), atol=0.03)
    same = models.as_float32(full)
    np.testing.assert_array_equal(same.predict(batch, verbose=0), full.predict(batch, verbose=0))


def test_averaged_views_of_float32_models_stay_float32_under_a_bfloat16_policy():
    """Lesson 03 trains in bfloat16 on a CPU with bfloat16 instructions and then builds the test-time-view model from float32 members."""
    from medlab.export import logit_model

    images = np.random.default_rng(0).integers(0, 255, (8, 32, 32, 1)).astype("uint8")
    members = [models.build_scratch_cnn((32, 32, 1), 2, images, filters=(4,), dense_units=4) for _ in range(2)]
    reference = models.average_models(members, views=models.test_time_views((32, 32, 1)))
    with models.global_dtype_policy("mixed_bfloat16"):
        averaged = models.average_models(members, views=models.test_time_views((32, 32, 1)))
        logits, _activation = logit_model(members[0])
    assert {layer.compute_dtype for layer in averaged.layers} == {"float32"}
    assert {layer.compute_dtype for layer in logits.layers} == {"float32"}
    batch = images.astype("float32")
    np.testing.assert_array_equal(averaged.predict(batch, verbose=0), reference.predict(batch, verbose=0))


def test_clone_with_weights_keeps_an_adapted_normalization():
    """set_weights alone leaves a cloned Normalization layer at mean 0: the clone would see raw pixels."""
    images = np.random.default_rng(0).integers(0, 255, (8, 32, 32, 1)).astype("uint8")
    model = models.build_scratch_cnn((32, 32, 1), 2, images, filters=(4,), dense_units=4)
    copy = models.clone_with_weights(model, lambda layer: layer.__class__.from_config(layer.get_config()))
    assert float(copy.get_layer("normalization").mean.numpy().ravel()[0]) == pytest.approx(images.mean(), rel=1e-4)
    batch = images.astype("float32")
    np.testing.assert_array_equal(copy.predict(batch, verbose=0), model.predict(batch, verbose=0))


def test_with_fused_batchnorm_keeps_weights_names_and_predictions():
    model, _ = build_transfer_model((32, 32, 1), 2, weights=None, backbone_size=32)
    fused = models.with_fused_batchnorm(model)
    kinds = {type(layer) for layer in fused.layers}
    assert models.FusedBatchNormalization in kinds and keras.layers.BatchNormalization not in kinds
    assert [layer.name for layer in fused.layers] == [layer.name for layer in model.layers]
    assert [layer.trainable for layer in fused.layers] == [layer.trainable for layer in model.layers]
    images = np.random.default_rng(1).uniform(0, 255, (3, 32, 32, 1)).astype("float32")
    np.testing.assert_allclose(fused.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-5)


def test_mobilenet_from_scratch_is_fused_and_its_width_is_a_parameter():
    model, info = build_transfer_model((64, 64, 1), 2, weights=None)
    assert info.backbone_size == 64 and info.width == models.SCRATCH_WIDTH and not info.frozen
    assert "Trained from scratch at 64 px" in info.message
    assert any(isinstance(layer, models.FusedBatchNormalization) for layer in model.layers)
    narrow, narrow_info = build_transfer_model((64, 64, 1), 2, weights=None, scratch_width=0.35)
    assert narrow.get_layer("Conv1").filters == 16 and "width 0.35" in narrow_info.message  # 32 filters at 1.0
    frozen, frozen_info = build_transfer_model((64, 64, 1), 2, weights=None, freeze_backbone=True)
    assert frozen_info.frozen and not any(isinstance(layer, models.FusedBatchNormalization) for layer in frozen.layers)


@pytest.mark.parametrize("backbone, identity_blocks", [("mobilenet_v2", 10), ("efficientnet_b0", 9), ("resnet50", 12)])
def test_a_backbone_trained_from_scratch_starts_each_residual_block_as_the_identity(backbone, identity_blocks):
    model, info = build_transfer_model((32, 32, 1), 2, backbone=backbone, weights=None, backbone_size=32)
    assert f"Its {identity_blocks} residual blocks start as the identity" in info.message
    adds = [layer for layer in model.layers if isinstance(layer, keras.layers.Add)]
    probe = keras.Model(model.inputs, [[*layer.input, layer.output] for layer in adds])
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 1)).astype("float32")
    passed_through = sum(any(np.array_equal(output, shortcut) for shortcut in (first, second))
                         for first, second, output in probe(images, training=False))
    assert passed_through == identity_blocks  # ResNet50's 4 projection shortcuts are left alone
    # A frozen backbone (pretrained, or frozen on request) keeps its scales.
    frozen, frozen_info = build_transfer_model((32, 32, 1), 2, backbone=backbone, weights=None, backbone_size=32,
                                               freeze_backbone=True)
    assert "identity" not in frozen_info.message
    assert all(np.any(layer.gamma.numpy() != 0) for layer in frozen.layers
               if isinstance(layer, keras.layers.BatchNormalization) and layer.scale)


def test_default_filters_add_a_block_above_32_px():
    from medlab.models import default_filters

    assert default_filters((28, 28, 1)) == (32, 64, 128)
    assert default_filters((64, 64, 3)) == (32, 64, 128, 256)
    model = build_scratch_cnn((64, 64, 1), 4, filters=default_filters((64, 64)), stem_stride=2)
    assert model.get_layer("block4_conv").filters == 256 and model.output_shape == (None, 4)
