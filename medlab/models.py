"""Model builders: a CNN from scratch, and transfer models on ImageNet backbones.

Every model takes raw pixels (float, 0-255, with the dataset's own channels)
and does its own preprocessing, so an exported model cannot be fed the wrong
scale. Binary tasks end in one sigmoid unit (the probability of the positive,
diseased class); multi-class tasks in a softmax.

Transfer models are built as **one flat functional graph**: the backbone's
layers sit directly in ``model.layers`` instead of inside a nested sub-model,
so Grad-CAM can reach the last convolution from the model's input, and
fine-tuning can unfreeze individual backbone layers.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from keras import layers

# Each backbone: its keras.applications constructor, its own preprocess_input
# module, the smallest input it accepts, and the default size small images are
# enlarged to (MobileNetV2's ImageNet weights come for 96 px and up).
BACKBONES = {
    "mobilenet_v2": ("MobileNetV2", "mobilenet_v2", 32, 96),
    "vgg16": ("VGG16", "vgg16", 32, 64),
    "resnet50": ("ResNet50", "resnet", 32, 64),
    "efficientnet_b0": ("EfficientNetB0", "efficientnet", 32, 64),
    "densenet121": ("DenseNet121", "densenet", 32, 64),
}
HEAD_PREFIX = "medlab_"  # every layer medlab adds around a backbone starts with this
# MobileNetV2's width when trained from random weights. Narrower is faster per step, but on the synthetic set
# width 0.35 learned far less in 15 epochs than 1.0 (and at 32 px instead of 64 barely at all), so the fallback
# keeps ImageNet's width and the input's size.
SCRATCH_WIDTH = 1.0


@keras.saving.register_keras_serializable(package="medlab")
class BackbonePreprocessing(layers.Layer):
    """Applies a backbone's own ``keras.applications.<module>.preprocess_input``.

    MobileNetV2 wants [-1, 1], VGG16/ResNet50 BGR with ImageNet means removed,
    DenseNet121 ImageNet-standardised RGB, EfficientNet raw 0-255: feeding the
    wrong one silently ruins pretrained features, so the model carries its own.
    """

    def __init__(self, backbone: str, **kwargs):
        super().__init__(**kwargs)
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; choose from {sorted(BACKBONES)}")
        self.backbone = backbone

    def call(self, inputs):
        module = getattr(keras.applications, BACKBONES[self.backbone][1])
        return module.preprocess_input(inputs)

    def get_config(self):
        return {**super().get_config(), "backbone": self.backbone}


@keras.saving.register_keras_serializable(package="medlab")
class FusedBatchNormalization(layers.BatchNormalization):
    """``BatchNormalization`` whose training step runs TensorFlow's fused kernel.

    Keras 3 computes a training batch's statistics and the normalisation as
    separate elementwise ops (``moments``, then ``batch_normalization``); on
    a CPU that made the batch-norm layers half of the scratch CNN's training
    step (``medlab bench speed`` measures it). TensorFlow's
    ``FusedBatchNormV3`` does the same arithmetic in one pass, forward and
    backward. The moving averages are updated exactly as Keras does, with the
    batch's biased variance; float32 inference, masks, channels-first inputs
    and ``synchronized=True`` (statistics over every worker of a multi-worker
    run, see :mod:`medlab.distributed`) use Keras' own code, so a saved model
    (float32) predicts and exports as before.

    Inference on bfloat16 activations (validation while lesson 03 trains
    under ``mixed_bfloat16``) runs the fused kernel too, with the moving
    statistics: Keras casts every activation to float32, normalises in two
    elementwise passes and casts back.
    """

    def call(self, inputs, training=None, mask=None):
        import tensorflow as tf

        fusable = mask is None and not self.renorm and len(inputs.shape) == 4 and self.axis in (-1, 3)
        if fusable and training and self.trainable and not self.synchronized:
            return self._fused(inputs, training=True)
        if fusable and not (training and self.trainable) and inputs.dtype == tf.bfloat16:
            return self._fused(inputs, training=False)
        return super().call(inputs, training=training, mask=mask)

    def _fused(self, inputs, training: bool):
        """``FusedBatchNormV3`` on NHWC ``inputs``: batch statistics (and moving averages updated) or moving ones."""
        import tensorflow as tf

        # bfloat16 (lesson 03 under mixed_bfloat16 on a CPU with bfloat16 instructions) goes to the kernel as it is, with float32
        # statistics: a cast to float32 and back cost more than the bfloat16 convolutions saved. float16 (a GPU)
        # is cast as before.
        x = inputs if inputs.dtype in (tf.float32, tf.bfloat16) else tf.cast(inputs, tf.float32)
        channels = x.shape[-1]
        gamma = tf.convert_to_tensor(self.gamma) if self.scale else tf.ones([channels])
        beta = tf.convert_to_tensor(self.beta) if self.center else tf.zeros([channels])
        if not training:
            outputs, *_ = tf.raw_ops.FusedBatchNormV3(
                x=x, scale=gamma, offset=beta, mean=tf.convert_to_tensor(self.moving_mean),
                variance=tf.convert_to_tensor(self.moving_variance), epsilon=self.epsilon, data_format="NHWC",
                is_training=False)
            return outputs
        outputs, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
            x=x, scale=gamma, offset=beta, mean=tf.constant([], tf.float32), variance=tf.constant([], tf.float32),
            epsilon=self.epsilon, data_format="NHWC", is_training=True)
        count = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), tf.float32)
        variance = variance * (count - 1.0) / count  # the kernel returns the unbiased variance; Keras tracks the biased one
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        return tf.cast(outputs, self.compute_dtype)


def with_fused_batchnorm(model: keras.Model) -> keras.Model:
    """A copy of a functional ``model`` whose ``BatchNormalization`` layers are :class:`FusedBatchNormalization`.

    Weights (moving statistics included), names and ``trainable`` flags are kept.
    """
    def clone(layer):
        if type(layer) is layers.BatchNormalization:
            fused = FusedBatchNormalization.from_config(layer.get_config())
            fused.trainable = layer.trainable
            return fused
        return layer.__class__.from_config(layer.get_config())

    return clone_with_weights(model, clone)


def as_float32(model: keras.Model) -> keras.Model:
    """A copy of a functional ``model`` whose every layer computes in float32 (e.g. one trained in bfloat16).

    Weights (float32 under any mixed-precision policy), names and ``trainable`` flags are kept.
    """
    def clone(layer):
        return layer.__class__.from_config({**layer.get_config(), "dtype": "float32"})

    with global_dtype_policy("float32"):  # for the input layer, which clone_model makes itself
        return clone_with_weights(model, clone)


def computes_in_bfloat16(model: keras.Model) -> bool:
    """Whether any of ``model``'s layers computes in bfloat16 (built under ``mixed_bfloat16``)."""
    return any(layer.compute_dtype == "bfloat16" for layer in model.layers)


def keep_checkpoint_float32(model: keras.Model, checkpoint: str | Path) -> None:
    """If ``model`` trained in bfloat16, rewrite its saved ``checkpoint`` as a float32 model (same weights).

    bfloat16 speeds up training on CPUs with AMX or AVX512-BF16 (:func:`medlab.train.set_mixed_precision`);
    the saved model computes in float32, so it predicts the same on every CPU
    and exports to TFLite as any other.
    """
    if computes_in_bfloat16(model):
        as_float32(load_model(checkpoint)).save(checkpoint)


@contextlib.contextmanager
def global_dtype_policy(policy: str):
    """Set Keras' global dtype policy (e.g. ``"float32"``) inside a ``with`` block, and put the previous one back."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def clone_with_weights(model: keras.Model, clone_function) -> keras.Model:
    """``keras.models.clone_model(model, clone_function)`` with ``model``'s weights and ``trainable`` flags.

    ``set_weights`` fills an adapted ``Normalization`` layer's variables but
    not the mean and variance its ``call`` reads, so those are finalised too.
    """
    copy = keras.models.clone_model(model, clone_function=clone_function)
    copy.set_weights(model.get_weights())
    for original, cloned in zip(model.layers, copy.layers):
        cloned.trainable = original.trainable
        if isinstance(cloned, layers.Normalization):
            cloned.finalize_state()
    return copy


def _multi_worker() -> bool:
    """Whether models are being built under ``tf.distribute.MultiWorkerMirroredStrategy`` (see medlab.distributed)."""
    import tensorflow as tf

    return isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy)


def _output_layer(x, num_classes: int):
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if num_classes == 2:
        return layers.Dense(1, activation="sigmoid", dtype="float32", name=f"{HEAD_PREFIX}output")(x)
    return layers.Dense(num_classes, activation="softmax", dtype="float32", name=f"{HEAD_PREFIX}output")(x)


def build_scratch_cnn(input_shape: tuple[int, int, int], num_classes: int,
                      training_images: np.ndarray | None = None,
                      filters: tuple[int, ...] = (32, 64, 128), dense_units: int = 128,
                      dropout: float = 0.3, block_dropout: float = 0.0, bn_momentum: float = 0.9,
                      stem_stride: int = 1) -> keras.Model:
    """Conv-BatchNorm-MaxPool-ReLU-Dropout blocks, global average pooling, a Dense-BN-Dropout head.

    Max-pooling comes before the ReLU, not after as usually drawn: the two
    commute (``max(relu(a), relu(b)) == relu(max(a, b))``, and the gradients
    agree too), so the model computes exactly the same numbers, but the ReLU
    and its gradient run on a quarter of the pixels: on a 2-core Xeon, one
    run of each order alternating, training up to 1.2x faster at 28 px and up to 1.35x in bfloat16 at 128 px,
    about the same in float32 at 64-128 px (README, Training speed), with
    bit-identical trained weights.

    ``stem_stride=2`` halves the image in block 1's convolution instead of
    its max-pooling (a strided "stem", as in ResNet): the same output size,
    but block 1's batch norm and ReLU run on a quarter of the pixels, which
    makes a training step about a fifth faster (``medlab bench speed``).
    :func:`default_stem_stride` picks it for images larger than 32 px.

    ``training_images`` (uint8 or float, 0-255) adapt the input ``Normalization``
    layer to the training mean and variance: BatchNorm networks fed raw
    pixels can collapse to predicting one class. ``bn_momentum`` is 0.9
    rather than Keras' 0.99 because small datasets give few steps per epoch:
    with 0.99 the moving statistics that validation uses lag far behind the
    batch statistics that training sees, and validation predictions collapse
    to one class for many epochs.
    """
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (height, width, channels), got {input_shape}")
    if not filters:
        raise ValueError("filters needs at least one block")
    if not 0 <= dropout < 1 or not 0 <= block_dropout < 1:
        raise ValueError("dropout rates must be in [0, 1)")
    if stem_stride not in (1, 2):
        raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
    synchronized = _multi_worker()  # one batch's statistics over every worker, so all end with the same averages
    inputs = keras.Input(shape=input_shape, name="image")
    normalization = layers.Normalization(axis=None, name="normalization")
    if training_images is not None:
        normalization.adapt(np.asarray(training_images, dtype="float32"))
    else:  # a neutral start when no data is at hand (e.g. building for inspection)
        normalization.adapt(np.array([0.0, 255.0], dtype="float32"))
    x = normalization(inputs)
    for block, width in enumerate(filters, start=1):
        stride = stem_stride if block == 1 else 1
        x = layers.Conv2D(width, 3, strides=stride, padding="same", use_bias=False, name=f"block{block}_conv")(x)
        x = FusedBatchNormalization(momentum=bn_momentum, synchronized=synchronized, name=f"block{block}_bn")(x)
        if stride == 1:  # pool, then ReLU: the same numbers as ReLU then pool, with ReLU on a quarter of the pixels
            x = layers.MaxPooling2D(name=f"block{block}_pool")(x)
        x = layers.Activation("relu", name=f"block{block}_relu")(x)
        x = layers.Dropout(block_dropout, name=f"block{block}_dropout")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dense(dense_units, use_bias=False, name="head_dense")(x)
    x = FusedBatchNormalization(momentum=bn_momentum, synchronized=synchronized, name="head_bn")(x)
    x = layers.Activation("relu", name="head_relu")(x)
    x = layers.Dropout(dropout, name="head_dropout")(x)
    return keras.Model(inputs, _output_layer(x, num_classes), name="scratch_cnn")


def load_model(path) -> keras.Model:
    """A saved ``.keras`` model, medlab's own layers included (importing this module registers them)."""
    return keras.saving.load_model(path)


def default_filters(image_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Filters per block for :func:`build_scratch_cnn`: three blocks up to 32 px, a fourth (256) above.

    The fourth block widens what the last convolution sees for an epoch about
    1.5x slower; on the 64 px brain MRI set it was what lifted the scratch CNN
    to the accuracy `make bench` reports there (README, Results).
    """
    return (32, 64, 128) if max(image_shape[:2]) <= 32 else (32, 64, 128, 256)


def default_stem_stride(image_shape: tuple[int, ...]) -> int:
    """Block 1's stride for :func:`build_scratch_cnn`: 1 up to 32 px (every pixel counts), else 2."""
    return 1 if max(image_shape[:2]) <= 32 else 2


MEMBER_PREFIX = "member"  # layers of the k-th member of an averaged model are named member<k>_<name>
IDENTITY_VIEW = (False, 0, 0)  # (mirrored left-right, rows rolled, columns rolled)


@keras.saving.register_keras_serializable(package="medlab")
class ImageView(layers.Layer):
    """A fixed view of the input for test-time averaging: mirrored left-right and/or rolled by a few pixels.

    Models saved before 3c2c4a8 hold one of these per view; :func:`average_models`
    now stacks all views in one :class:`ViewStack` (the same arithmetic).

    Rolled, not padded: the rows (or columns) that leave one edge come back
    at the other, so the image keeps its size and content. Made of flips,
    slices and concatenations, which TFLite runs natively.
    """

    def __init__(self, mirror: bool = False, rows: int = 0, columns: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.mirror, self.rows, self.columns = bool(mirror), int(rows), int(columns)

    def call(self, images):
        return _image_view(images, self.mirror, self.rows, self.columns)

    def get_config(self):
        return {**super().get_config(), "mirror": self.mirror, "rows": self.rows, "columns": self.columns}


def _image_view(images, mirror: bool, rows: int, columns: int):
    x = keras.ops.flip(images, axis=2) if mirror else images
    if rows:
        x = keras.ops.concatenate([x[:, -rows:], x[:, :-rows]], axis=1)
    if columns:
        x = keras.ops.concatenate([x[:, :, -columns:], x[:, :, :-columns]], axis=2)
    return x


@keras.saving.register_keras_serializable(package="medlab")
class ViewStack(layers.Layer):
    """Several :class:`ImageView` views of a batch stacked along the batch axis: N images in, ``len(views) * N`` out.

    One copy of a network then sees every view in one pass (rows ``k*N`` to
    ``(k+1)*N - 1`` are view ``k``), and :class:`ViewMean` averages its
    outputs back to N rows. The first view must be the image as it is:
    Grad-CAM reads the first N rows (:func:`medlab.explain.gradcam`).
    """

    def __init__(self, views: list, **kwargs):
        super().__init__(**kwargs)
        self.views = [(bool(mirror), int(rows), int(columns)) for mirror, rows, columns in views]
        if not self.views or self.views[0] != IDENTITY_VIEW:
            raise ValueError(f"the first view must be the image as it is {IDENTITY_VIEW}, got {views}")

    def call(self, images):
        return keras.ops.concatenate([_image_view(images, *view) for view in self.views], axis=0)

    def compute_output_shape(self, input_shape):
        return (None, *input_shape[1:])

    def get_config(self):
        return {**super().get_config(), "views": [list(view) for view in self.views]}


@keras.saving.register_keras_serializable(package="medlab")
class ViewMean(layers.Layer):
    """The mean over the ``views`` blocks of rows that :class:`ViewStack` stacked: ``views * N`` rows in, N out."""

    def __init__(self, views: int, **kwargs):
        super().__init__(**kwargs)
        self.views = int(views)

    def call(self, x):
        return keras.ops.mean(keras.ops.reshape(x, (self.views, -1, *x.shape[1:])), axis=0)

    def compute_output_shape(self, input_shape):
        return (None, *input_shape[1:])

    def get_config(self):
        return {**super().get_config(), "views": self.views}


def test_time_views(image_shape: tuple[int, ...]) -> list[tuple[bool, int, int]]:
    """The views :func:`average_models` averages at test time: the image, its mirror, and four small rolls.

    Each roll moves the image by 1/32 of its shorter side (at least one
    pixel) up, down, left or right: within the shifts lesson 02's
    augmentation trains on. The mirror is a view a chest film never shows
    (the heart is on the left); lesson 03 keeps the views only when they
    raise the validation AUC.
    """
    step = max(1, round(min(image_shape[:2]) / 32))
    return [IDENTITY_VIEW, (True, 0, 0), (False, step, 0), (False, -step, 0), (False, 0, step), (False, 0, -step)]


def average_models(members: list[keras.Model], name: str = "ensemble",
                   views: list[tuple[bool, int, int]] | None = None) -> keras.Model:
    """One flat model that averages the logits of several trained models, each on one or more views of the input.

    Each member must be a single chain of layers (as :func:`build_scratch_cnn`
    makes) ending in a sigmoid or softmax ``Dense`` layer. Its layers are
    rebuilt side by side on one shared input, renamed ``member<k>_<name>``,
    with their trained weights; the logits are averaged and the activation
    applied once. With several ``views`` (see :func:`test_time_views`; the
    first must be the image as it is) a member's one copy sees all of them
    stacked along the batch axis (:class:`ViewStack`) and its logits are
    averaged over them (:class:`ViewMean`): one set of weights and one graph
    per member, however many views. Flat, not nested, so Grad-CAM reaches
    every member's convolutions (:func:`gradcam_layer_names`) and export and
    prediction treat it like any other model. One member on one view comes
    back as it is.
    """
    views = [tuple(view) for view in (views or [IDENTITY_VIEW])]
    if not members:
        raise ValueError("average_models needs at least one model")
    if views[0] != IDENTITY_VIEW:
        raise ValueError(f"the first view must be the image as it is {IDENTITY_VIEW}, got {views[0]}")
    if len(members) == 1 and views == [IDENTITY_VIEW]:
        return members[0]
    shapes = {tuple(member.input_shape[1:]) for member in members}
    if len(shapes) != 1:
        raise ValueError(f"members take different input shapes: {sorted(shapes)}")
    # The views, averages and input are float32 whatever the global policy (lesson 03 may train in bfloat16):
    # the members' own layers keep the precision they were saved with.
    with global_dtype_policy("float32"):
        inputs = keras.Input(shape=shapes.pop(), name="image")
        logits = [_rebuilt_member(member, views, index, inputs) for index, member in enumerate(members, start=1)]
        activations = {activation for _, activation in logits}
        logits = [x for x, _ in logits]
        if len(activations) != 1 or len({tuple(x.shape) for x in logits}) != 1:
            raise ValueError("members must have the same outputs")
        averaged = layers.Average(name="average_logits")(logits) if len(logits) > 1 else logits[0]
        outputs = layers.Activation(activations.pop(), dtype="float32", name=f"{HEAD_PREFIX}output")(averaged)
        return keras.Model(inputs, outputs, name=name)


def _rebuilt_member(member: keras.Model, views: list[tuple[bool, int, int]], index: int, inputs):
    """``member``'s chain rebuilt on ``views`` of ``inputs`` with its weights, up to its view-averaged logits; and its activation."""
    prefix = f"{MEMBER_PREFIX}{index}_"
    x = inputs if views == [IDENTITY_VIEW] else ViewStack(views, name=f"{prefix}views")(inputs)
    chain = [layer for layer in member.layers if not isinstance(layer, layers.InputLayer)]
    activation = None
    for layer in chain:
        if len(layer._inbound_nodes) != 1:
            raise ValueError(f"{member.name}: layer {layer.name} is used more than once; members must be chains")
        config = {**layer.get_config(), "name": f"{prefix}{layer.name}"}
        if layer is chain[-1]:
            activation = config.get("activation")
            if not isinstance(layer, layers.Dense) or activation not in {"sigmoid", "softmax"}:
                raise ValueError(f"{member.name} must end in a sigmoid or softmax Dense layer")
            config["activation"] = "linear"
        rebuilt = layer.__class__.from_config(config)
        x = rebuilt(x)
        rebuilt.set_weights(layer.get_weights())
        if isinstance(rebuilt, layers.Normalization):
            rebuilt.finalize_state()  # its adapted mean and variance, as loading a saved model does
    if views != [IDENTITY_VIEW]:
        x = ViewMean(len(views), name=f"{prefix}view_mean")(x)
    return x, activation


def gradcam_layer_names(model: keras.Model) -> list[str]:
    """Grad-CAM's target layers: the last convolution, or of an averaged model each member's last one.

    A member that sees stacked views (:class:`ViewStack`) is explained on the
    image as it is (its first rows). In models saved before views were
    stacked, members that see only a mirrored or rolled view are left out:
    their maps would be in the view's coordinates, not the image's.
    """
    names = {layer.name for layer in model.layers}
    prefixes = sorted({layer.name.split("_", 1)[0] for layer in model.layers
                       if layer.name.split("_", 1)[0].removeprefix(MEMBER_PREFIX).isdigit()})
    prefixes = [prefix for prefix in prefixes if f"{prefix}_view" not in names]
    if not prefixes:
        return [last_conv_layer_name(model)]
    return [last_conv_layer_name(model, prefix=f"{prefix}_") for prefix in prefixes]


@dataclass
class TransferInfo:
    """What happened to the pretrained weights: reports must say so when they are missing."""

    backbone: str
    weights_requested: str | None
    pretrained: bool
    frozen: bool
    backbone_size: int
    message: str
    width: float = 1.0  # MobileNetV2's width multiplier (alpha); below 1 only when trained from scratch


def build_transfer_model(input_shape: tuple[int, int, int], num_classes: int,
                         backbone: str = "mobilenet_v2", weights: str | None = "imagenet",
                         backbone_size: int | None = None, dropout: float = 0.2,
                         freeze_backbone: bool | None = None,
                         scratch_width: float = SCRATCH_WIDTH) -> tuple[keras.Model, TransferInfo]:
    """A pretrained backbone with a pooling-dropout-dense head, as one flat graph.

    Args:
        input_shape: the dataset's (height, width, channels); grayscale inputs
            are repeated to three channels inside the model.
        backbone: one of :data:`BACKBONES`.
        weights: ``"imagenet"`` (Keras downloads into its cache when online and
            reuses the cache offline), a path to a weights file, or ``None``.
        backbone_size: side the images are resized to before the backbone
            (default: the backbone's preferred size for pretrained weights,
            e.g. 96 px for MobileNetV2; the input's side, at least 32 px, otherwise).
        freeze_backbone: default (None) freezes a pretrained backbone and
            trains a randomly initialised one, since frozen random features
            are useless.
        scratch_width: MobileNetV2's width multiplier (alpha) when it starts
            from random weights (requested, or because ImageNet weights could
            not be loaded); see :data:`SCRATCH_WIDTH` for why the default is 1.

    A backbone that will be trained (random initialisation, or
    ``freeze_backbone=False``) gets :class:`FusedBatchNormalization` layers.

    When ImageNet weights cannot be loaded the model is built from random
    weights, a warning says so, and ``TransferInfo.pretrained`` is False:
    every report must carry that flag.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose from {sorted(BACKBONES)}")
    if weights not in (None, "imagenet") and not Path(weights).exists():
        raise FileNotFoundError(f"weights file {weights} does not exist")
    width = scratch_width if backbone == "mobilenet_v2" else 1.0
    try:
        model, size = _assemble(input_shape, num_classes, backbone, weights, backbone_size, dropout,
                                1.0 if weights else width)
        pretrained = weights is not None
        message = f"{backbone}: weights {weights!r} loaded" if weights else f"{backbone}: weights=None"
    except Exception as error:  # offline download, corrupt cache, HTTP error ...
        if weights != "imagenet":
            raise
        model, size = _assemble(input_shape, num_classes, backbone, None, backbone_size, dropout, width)
        pretrained, message = False, _no_weights_message(backbone, error)
        warnings.warn(message, stacklevel=2)
    frozen = pretrained if freeze_backbone is None else freeze_backbone
    for layer in backbone_layers(model):
        layer.trainable = not frozen
    identity_blocks = zero_init_residual_branches(model) if not (pretrained or frozen) else []
    if not frozen:
        model = with_fused_batchnorm(model)
    if not pretrained and weights is None:
        message += " (random initialisation requested)"
    if not pretrained:
        message += f" Trained from scratch at {size} px" + (f", width {width} (alpha)." if width != 1.0 else ".")
    if identity_blocks:
        message += f" Its {len(identity_blocks)} residual blocks start as the identity (zero-gamma)."
    info = TransferInfo(backbone, weights, pretrained, frozen, size, message, width if not pretrained else 1.0)
    return model, info


def _no_weights_message(backbone: str, error: Exception) -> str:
    return (
        f"ImageNet weights for {backbone} could not be loaded ({type(error).__name__}: "
        f"{str(error).splitlines()[0][:160]}). The backbone starts FROM RANDOM INITIALISATION and is "
        "trained from scratch: this is NOT transfer learning. Put the weights file in the Keras cache "
        "(~/.keras/models/) or pass its path as `weights`."
    )


def _assemble(input_shape, num_classes, backbone, weights, backbone_size, dropout,
              width: float = 1.0) -> tuple[keras.Model, int]:
    """Inputs -> gray-to-RGB -> resize -> preprocess_input -> backbone -> head; returns (model, backbone size)."""
    constructor_name, _module, minimum, preferred = BACKBONES[backbone]
    if backbone_size:
        size = backbone_size
    elif weights is not None:
        size = max(preferred, input_shape[0])
    else:
        size = max(minimum, input_shape[0])
    if size < minimum:
        raise ValueError(f"{backbone} needs images of at least {minimum} px, got backbone_size={size}")
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    if input_shape[-1] == 1:
        x = layers.Concatenate(name=f"{HEAD_PREFIX}gray_to_rgb")([x, x, x])
    if (input_shape[0], input_shape[1]) != (size, size):
        x = layers.Resizing(size, size, interpolation="bilinear", name=f"{HEAD_PREFIX}resize")(x)
    x = BackbonePreprocessing(backbone, name=f"{HEAD_PREFIX}preprocess")(x)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input_shape.*")  # MobileNetV2 size notes
        extra = {"alpha": width} if backbone == "mobilenet_v2" else {}
        base = getattr(keras.applications, constructor_name)(include_top=False, weights=weights, input_tensor=x,
                                                             **extra)
    features = layers.GlobalAveragePooling2D(name=f"{HEAD_PREFIX}pool")(base.output)
    features = layers.Dropout(dropout, name=f"{HEAD_PREFIX}dropout")(features)
    model = keras.Model(inputs, _output_layer(features, num_classes), name=f"transfer_{backbone}")
    return model, size


def _parents(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    """The layers whose outputs feed ``layer`` (in the model it was first called in)."""
    return [tensor._keras_history.operation for tensor in layer._inbound_nodes[0].input_tensors]


def _descends_from(layer: keras.layers.Layer, ancestor: keras.layers.Layer) -> bool:
    pending, seen = [layer], set()
    while pending:
        current = pending.pop()
        if current is ancestor:
            return True
        if id(current) not in seen:
            seen.add(id(current))
            pending.extend(_parents(current))
    return False


def zero_init_residual_branches(model: keras.Model) -> list[str]:
    """Start each residual block as the identity: zero the scale of the batch norm that ends its branch.

    A residual block adds ``shortcut + branch(shortcut)``; with the branch's
    last ``BatchNormalization`` gamma at 0 the block passes its input through
    unchanged, so a randomly initialised network starts shallow and deepens as
    those scales grow (Goyal et al., *Accurate, Large Minibatch SGD*, 2017:
    "zero-gamma"). MobileNetV2 from random weights on the synthetic set,
    three seeds: mean validation AUC 0.94 after 10 epochs with it, 0.84 after 15 without (Adam at 0.001),
    and 0.94 after 6 epochs with it at 0.003 (what lesson 04 uses).
    Only blocks whose shortcut is the identity are changed (the branch must
    descend from the other input of the ``Add``); dropout between the batch
    norm and the ``Add`` (EfficientNet) is looked through. Returns the names of
    the batch norm layers set to zero.
    """
    zeroed = []
    for layer in model.layers:
        if not isinstance(layer, layers.Add) or len(_parents(layer)) != 2:
            continue
        first, second = _parents(layer)
        for shortcut, branch in ((first, second), (second, first)):
            norm = branch
            while isinstance(norm, layers.Dropout):
                norm = _parents(norm)[0]
            if isinstance(norm, layers.BatchNormalization) and norm.scale and _descends_from(norm, shortcut):
                norm.gamma.assign(np.zeros(norm.gamma.shape, dtype="float32"))
                zeroed.append(norm.name)
    return zeroed


def backbone_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers that came from the pretrained backbone, input to output."""
    return [layer for layer in model.layers
            if not layer.name.startswith(HEAD_PREFIX) and not isinstance(layer, keras.layers.InputLayer)]


def unfreeze_top_layers(model: keras.Model, count: int) -> int:
    """Make the top ``count`` backbone layers trainable, keeping BatchNorm frozen.

    Frozen BatchNormalization layers run in inference mode in Keras 3, so
    their ImageNet statistics are not overwritten by small fine-tuning
    batches. Returns the number of layers with weights that became trainable; recompile
    the model (with a low learning rate) afterwards.
    """
    if count < 0:
        raise ValueError(f"count must be non-negative, got {count}")
    candidates = backbone_layers(model)
    for layer in candidates:
        layer.trainable = False
    unfrozen = 0
    for layer in candidates[len(candidates) - count:] if count else []:
        if isinstance(layer, layers.BatchNormalization):
            continue
        layer.trainable = True
        unfrozen += bool(layer.weights)
    return unfrozen


def last_conv_layer_name(model: keras.Model, prefix: str = "") -> str:
    """The last convolution layer (whose name starts with ``prefix``): Grad-CAM's default target."""
    for layer in reversed(model.layers):
        if layer.name.startswith(prefix) and isinstance(
                layer, (layers.Conv2D, layers.DepthwiseConv2D, layers.SeparableConv2D)):
            return layer.name
    raise ValueError(f"model {model.name} has no convolution layer" + (f" named {prefix}*" if prefix else ""))


def count_trainable_layers(model: keras.Model) -> int:
    return sum(1 for layer in model.layers if layer.trainable and layer.weights)
