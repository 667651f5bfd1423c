"""Training: seeds and determinism, compilation, callbacks, fit, predictions.

One call, :func:`train_model`, does what every training notebook needs:
class-weighted ``model.fit`` with a checkpoint of the best epoch (``.keras``),
early stopping that restores the best weights (BatchNorm statistics
included), a learning-rate schedule on plateaus, and a CSV log. Everything it
writes goes into one model folder under the run folder, where the evaluation
and export lessons find it.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from medlab import config
from medlab.data import Dataset, Split, batches_per_pass, images_dataset, make_tf_dataset
from medlab.models import keep_checkpoint_float32
from medlab.runs import ModelFolder, read_json, write_json


def set_determinism(seed: int = config.DEFAULT_SEED) -> None:
    """Seed Python, NumPy and TensorFlow, and ask TensorFlow for deterministic kernels.

    With the same seed, data and machine, two runs give the same weights.
    (Different CPUs or thread counts may still differ in the last digits.)
    Also calls :func:`skip_graph_rewrites_on_cpu`.
    """
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    skip_graph_rewrites_on_cpu()


def skip_graph_rewrites_on_cpu() -> bool:
    """On a CPU, switch off Grappler (TensorFlow's graph rewriter); return whether it was switched off.

    Grappler rewrites every traced function before its first run: for
    MobileNetV2's training step that took about 2.4 of the first step's 7.7 s,
    and a ``model.fit`` traces three or four such functions. On a 2-core CPU
    the rewritten steps were no faster (lesson 03's 64 px CNN 611 -> 665,
    MobileNetV2 149 -> 149 images/s in ``model.fit`` with the rewrites off).
    Its fusion of batch norm with ReLU into one oneDNN kernel is lost, which
    cost lesson 03's bare bfloat16 step under 1% (104.7 -> 105.4 ms).
    With a GPU the rewrites stay on (its layout and mixed-precision passes matter there).
    """
    if tf.config.list_physical_devices("GPU"):
        return False
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
    return True


def devices_used() -> dict:
    """The devices TensorFlow trains on here, as recorded in ``training.json`` and ``metrics.json``."""
    return {"gpus": [device.name for device in tf.config.list_logical_devices("GPU")],
            "cpu_count": config.cpu_count(), "precision": keras.mixed_precision.global_policy().name,
            "onednn": onednn_enabled()}


def onednn_enabled() -> bool | None:
    """Whether TensorFlow runs oneDNN's CPU kernels in this process (None if this TensorFlow cannot say).

    ``import medlab`` asks for them (``TF_ENABLE_ONEDNN_OPTS=1``) unless TensorFlow
    was loaded first; on an AVX2 CPU they change the last digits of every
    result, so a run records which kernels it had.
    """
    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:  # a TensorFlow without this (private) switch
        return None
    return bool(_pywrap_util_port.IsMklEnabled())


BFLOAT16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_trains_bfloat16() -> bool:
    """Whether this CPU has bfloat16 arithmetic, where training in bfloat16 pays.

    That is AMX-BF16 matrix tiles (``amx_bf16``: Intel Xeon Sapphire Rapids and
    later) or AVX512-BF16 dot products (``avx512_bf16``: AMD Zen 4 and later,
    Intel Cooper Lake). oneDNN runs bfloat16 convolutions on them: a 3x3
    Conv2D forward and backward ran at 2-3 times its float32 rate with AMX and
    1.6-2 times on a Zen 5 EPYC with AVX512-BF16 (``medlab bench speed``
    measures both). Other CPUs lack these instructions; lesson 03 trains
    in float32 there.
    """
    return bool(set(BFLOAT16_FLAGS) & (config.cpu_flags() or set()))


def set_mixed_precision(requested: bool, cpu_bfloat16: bool = False) -> str:
    """Set the Keras precision policy to train in, and return its name.

    When requested: ``mixed_float16`` on a GPU; ``mixed_bfloat16`` on a CPU
    with bfloat16 arithmetic if ``cpu_bfloat16`` (see :func:`cpu_trains_bfloat16`);
    otherwise ``float32``, since emulated half precision is slower. Weights
    stay float32 and the output layers compute in float32 either way, and
    :func:`train_model` saves a model trained in bfloat16 as a float32 one,
    so what is evaluated and exported does not depend on the CPU that trained
    it. Lesson 03 asks for bfloat16 (its scratch CNN trained about twice as
    fast at 64 px); lessons 04-05 do not, because MobileNetV2's depthwise
    convolutions trained about twice as slowly in bfloat16 on the same CPU.
    Call before building the model.
    """
    if requested and tf.config.list_logical_devices("GPU"):
        policy = "mixed_float16"
    elif requested and cpu_bfloat16 and cpu_trains_bfloat16():
        policy = "mixed_bfloat16"
    else:
        policy = "float32"
    keras.mixed_precision.set_global_policy(policy)
    return policy


def get_strategy(kind: str = "auto") -> tf.distribute.Strategy:
    """The distribution strategy to build and train the model under.

    ``"auto"``: ``MirroredStrategy`` when more than one GPU is visible, else the
    default (single-device) strategy. ``"mirrored"``: ``MirroredStrategy`` over
    every GPU, or over every logical CPU device when there is no GPU (how the
    tests exercise it). ``"default"``: always one device. ``"multi_worker"``:
    ``MultiWorkerMirroredStrategy`` over the machines ``TF_CONFIG`` lists
    (:mod:`medlab.distributed`; ask for it before any other TensorFlow work).
    """
    if kind == "multi_worker":
        from medlab.distributed import multi_worker_strategy

        return multi_worker_strategy()
    gpus = tf.config.list_logical_devices("GPU")
    if kind == "default" or (kind == "auto" and len(gpus) < 2):
        return tf.distribute.get_strategy()
    if kind in {"auto", "mirrored"}:
        devices = [device.name for device in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices=devices)
    raise ValueError(f"strategy must be 'auto', 'mirrored', 'default' or 'multi_worker', got {kind!r}")


def compile_model(model: keras.Model, num_classes: int, learning_rate: float = 1e-3,
                  metrics: str = "training") -> keras.Model:
    """Adam, the right cross-entropy, and the metrics that ``fit`` tracks each epoch.

    ``metrics="training"`` (the default): accuracy, recall and ROC-AUC, which
    the checkpoint, early stopping and the learning curves read;
    ``"full"`` adds precision and PR-AUC; ``"loss"``: none (what
    ``medlab bench speed`` compares against). Lesson 06 computes every
    metric, with confidence intervals, once on the chosen checkpoint.
    """
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    if metrics not in ("training", "full", "loss"):
        raise ValueError(f"metrics must be 'training', 'full' or 'loss', got {metrics!r}")
    loss = "binary_crossentropy" if num_classes == 2 else "categorical_crossentropy"
    accuracy = keras.metrics.BinaryAccuracy(name="accuracy") if num_classes == 2 else \
        keras.metrics.CategoricalAccuracy(name="accuracy")
    tracked = {
        "loss": [],
        "training": [accuracy, keras.metrics.Recall(name="recall"), keras.metrics.AUC(name="auc")],
        "full": [accuracy, keras.metrics.Precision(name="precision"), keras.metrics.Recall(name="recall"),
                 keras.metrics.AUC(name="auc"), keras.metrics.AUC(curve="PR", name="pr_auc")],
    }[metrics]
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss, metrics=tracked,
                  run_eagerly=config.run_eagerly())
    # Adam's two slots per weight, made now rather than inside the first traced train step, where Keras
    # otherwise makes them: there they cost MobileNetV2 (158 weights) 11 of the first step's 22 s, here 0.5 s.
    with model.distribute_strategy.scope():
        model.optimizer.build(model.trainable_variables)
    return model


@dataclass
class TrainConfig:
    """The knobs every training notebook exposes as parameters."""

    max_epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 1e-3
    monitor: str = "auc"  # validation metric that picks the checkpoint (val_<monitor>)
    early_stopping_patience: int = 6
    reduce_lr_patience: int = 3
    class_weighting: bool = True
    seed: int = config.DEFAULT_SEED
    schedule: str = "plateau"  # "plateau": halve the rate when val loss stalls; "cosine": warm up, then cosine to 0
    warmup_epochs: int = 1  # cosine only: epochs of linear warm-up to learning_rate

    def __post_init__(self) -> None:
        if self.max_epochs < 1 or self.batch_size < 1:
            raise ValueError("max_epochs and batch_size must be positive")
        if self.schedule not in ("plateau", "cosine"):
            raise ValueError(f"schedule must be 'plateau' or 'cosine', got {self.schedule!r}")


def cosine_learning_rate(epoch: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``cfg.warmup_epochs``, then a half cosine from ``learning_rate`` to 0 at ``max_epochs``."""
    warmup = min(cfg.warmup_epochs, cfg.max_epochs - 1)
    if epoch < warmup:
        return cfg.learning_rate * (epoch + 1) / (warmup + 1)
    progress = (epoch - warmup) / max(cfg.max_epochs - warmup, 1)
    return float(cfg.learning_rate * 0.5 * (1 + np.cos(np.pi * progress)))


class PreciseBatchNorm(keras.callbacks.Callback):
    """Re-estimate BatchNorm statistics with the current weights before each validation.

    During training, BatchNorm normalises with each batch's own statistics
    and keeps an exponential moving average for inference. On small datasets
    (tens of steps per epoch) while the weights still move fast, that average
    lags behind: here it made a scratch CNN that was 90% accurate in training
    mode only 60% accurate in inference mode, on its own training images, and
    validation swung from epoch to epoch. "Precise BN" (Wu and Johnson,
    *Rethinking "Batch" in BatchNorm*, 2021) fixes it by averaging the
    statistics of a few clean training batches under the current weights, so
    validation, checkpoints and early stopping see the model as it will be used.
    """

    def __init__(self, images: np.ndarray, batch_size: int = 64, max_batches: int = 8,
                 seed: int = config.DEFAULT_SEED):
        super().__init__()
        rng = np.random.default_rng(seed)
        count = min(len(images), batch_size * max_batches)
        chosen = np.sort(rng.choice(len(images), size=count, replace=False))
        self.batches = [images[chosen[i:i + batch_size]].astype("float32") for i in range(0, count, batch_size)]
        self._layers: list | None = None
        self._moments = None

    def recalibrate(self) -> None:
        """Set every trainable BatchNorm layer's moving mean and variance to the average over the batches.

        In training mode a BatchNorm layer normalises with its batch's own
        statistics and updates its moving averages, ``moving * momentum +
        batch * (1 - momentum)``. One compiled forward pass per batch with
        the momentum at 0 therefore leaves in each layer exactly that batch's
        mean and (biased) variance, which are averaged over the batches. (The
        statistics used to be computed again with ``tf.nn.moments`` from
        each layer's input: a third of this pass's time.)
        """
        layers = [layer for layer in self.model.layers
                  if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable and not layer.renorm]
        if not layers:
            return
        if self._moments is None or self._layers != layers:
            self._layers = layers
            self._moments = self._compile_moments(layers)
        momenta = [layer.momentum for layer in layers]
        sums = None
        try:
            for layer in layers:
                layer.momentum = 0.0  # read when the pass is traced (or, run eagerly, on every call)
            for batch in self.batches:
                moments = self._moments(batch)
                sums = moments if sums is None else [(m + mean, v + var) for (m, v), (mean, var) in zip(sums, moments)]
        finally:
            for layer, momentum in zip(layers, momenta):
                layer.momentum = momentum
        for layer, (mean_sum, variance_sum) in zip(layers, sums):
            layer.moving_mean.assign(mean_sum / len(self.batches))
            layer.moving_variance.assign(variance_sum / len(self.batches))

    def _compile_moments(self, layers):
        # Up to the BatchNorm layers' outputs only: the head's dropout would draw from its seed generator.
        up_to_layers = keras.Model(self.model.input, [layer.output for layer in layers])

        def moments(batch):
            up_to_layers(batch, training=True)
            return [(tf.identity(layer.moving_mean), tf.identity(layer.moving_variance)) for layer in layers]

        return moments if self.model.run_eagerly else tf.function(moments, reduce_retracing=True)

    def on_test_begin(self, logs=None):
        self.recalibrate()


def make_callbacks(model_dir: str | Path, cfg: TrainConfig, training_images: np.ndarray | None = None
                   ) -> list[keras.callbacks.Callback]:
    """Precise BatchNorm statistics, best-epoch checkpoint, early stopping, LR schedule, CSV log."""
    folder = ModelFolder(model_dir)
    monitor = f"val_{cfg.monitor}"
    mode = "min" if cfg.monitor == "loss" else "max"
    precise = [] if training_images is None else [
        PreciseBatchNorm(training_images, batch_size=cfg.batch_size, seed=cfg.seed)]
    return precise + [
        keras.callbacks.ModelCheckpoint(folder.checkpoint, monitor=monitor, mode=mode,
                                        save_best_only=True),
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=cfg.early_stopping_patience,
                                      restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=cfg.reduce_lr_patience,
                                          min_lr=1e-6) if cfg.schedule == "plateau" else
        keras.callbacks.LearningRateScheduler(lambda epoch: cosine_learning_rate(epoch, cfg)),
        keras.callbacks.CSVLogger(folder.history),
    ]


@contextmanager
def one_call_per_epoch(model: keras.Model, steps_per_epoch: int):
    """Within the block, ``model.fit`` runs each epoch's training steps in one call into TensorFlow.

    By default Keras' ``fit`` comes back to Python after every step
    (``steps_per_execution=1``) to run callbacks, update logs and hand over
    the next batch. On a 2-core Xeon, one call per epoch trained lesson 03's
    64 px CNN in bfloat16 on 5-8% more images per second, measured alone
    (alternating processes; ``medlab bench speed`` has a "one step per call"
    column). Keras' ``fit`` always runs
    ``steps_per_execution`` steps per call, so on a repeated dataset a count
    that does not divide the epoch would overrun it; a whole epoch per call
    never does. The steps are the same ops in the same order: the trained
    weights are bit for bit those of one step per call
    (``tests/test_train.py``). Per-batch callback hooks and ``verbose=1``'s
    progress bar then move once per epoch; validation runs in one call too.
    Afterwards the model takes one step per call again (its next ``fit``,
    ``evaluate`` or ``predict`` is traced anew). Under a distribution strategy
    (e.g. ``MirroredStrategy``) the model keeps one step per call: there
    Keras 3.15's multi-step loop fails ("You must feed a value for
    placeholder tensor").
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    if tf.distribute.has_strategy() or model.distribute_strategy is not tf.distribute.get_strategy():
        yield model
        return

    def take(steps):
        if model.steps_per_execution != steps:
            model.steps_per_execution = steps
            model.train_function = model.test_function = model.predict_function = None  # traced for the new count

    previous = model.steps_per_execution
    take(steps_per_epoch)
    try:
        yield model
    finally:
        take(previous)


def train_model(model: keras.Model, dataset: Dataset, model_dir: str | Path, cfg: TrainConfig,
                augmentation=None, verbose: int = 2, callbacks: list | None = None) -> pd.DataFrame:
    """Fit ``model`` (already compiled) on ``dataset``; return the history as a table.

    Writes ``best.keras`` (the checkpoint of the best validation epoch),
    ``history.csv`` and ``training.json`` (configuration, epochs, wall time)
    into ``model_dir``. ``verbose=2`` prints one line per epoch. ``callbacks``
    run after medlab's own (e.g. :meth:`medlab.tracking.Tracker.callbacks`).
    A model built under a multi-worker strategy trains with
    :func:`medlab.distributed.train_distributed` instead (Keras' fit fails there).
    """
    from medlab.distributed import is_multi_worker, train_distributed

    if is_multi_worker(model):
        return train_distributed(model, dataset, model_dir, cfg, lambda epoch: cosine_learning_rate(epoch, cfg),
                                 augmentation=augmentation, verbose=verbose, callbacks=callbacks)
    folder = ModelFolder(Path(model_dir)).create()
    num_classes = dataset.info.num_classes
    train_data = make_tf_dataset(dataset.train, num_classes, cfg.batch_size, shuffle=True, seed=cfg.seed,
                                 augmentation=augmentation, repeat=True)  # one iterator for every epoch
    val_data = make_tf_dataset(dataset.val, num_classes, cfg.batch_size)
    class_weight = dataset.class_weights() if cfg.class_weighting else None
    steps = batches_per_pass(len(dataset.train), cfg.batch_size)
    started = time.perf_counter()
    with one_call_per_epoch(model, steps):
        history = model.fit(train_data, validation_data=val_data, epochs=cfg.max_epochs, steps_per_epoch=steps,
                            callbacks=make_callbacks(folder, cfg, dataset.train.images) + list(callbacks or []),
                            class_weight=class_weight,
                            verbose=verbose,
                            shuffle=False)  # the tf.data pipeline shuffles, seeded
    seconds = time.perf_counter() - started
    table = pd.DataFrame(history.history)
    table.index = pd.RangeIndex(1, len(table) + 1, name="epoch")
    monitor = f"val_{cfg.monitor}"
    best_epoch = int(table[monitor].idxmin() if cfg.monitor == "loss" else table[monitor].idxmax())
    summary = {
        "config": asdict(cfg),
        "class_weight": class_weight,
        "epochs_run": len(table),
        "best_epoch": best_epoch,
        f"best_{monitor}": float(table.loc[best_epoch, monitor]),
        "train_seconds": round(seconds, 1),
        "parameters": int(model.count_params()),
        "devices": devices_used(),
    }
    write_json(folder.training, summary)
    keep_checkpoint_float32(model, folder.checkpoint)
    return table


def feature_extractor(model: keras.Model) -> keras.Model:
    """A transfer model's frozen part as a model of its own: images in, pooled backbone features (N, D) out.

    Reuse one extractor for several batches of images: each new one traces its prediction graph again
    (with one extractor instead of four, the frozen-head unit test took 8.6 s instead of 13.2 s in make test).
    """
    from medlab.models import HEAD_PREFIX

    return keras.Model(model.input, model.get_layer(f"{HEAD_PREFIX}pool").output)


def frozen_features(extractor: keras.Model, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The pooled backbone features (N, D) that ``extractor`` (from :func:`feature_extractor`) makes of ``images``."""
    return extractor.predict(images_dataset(images, batch_size), verbose=0)


def train_frozen_head(model: keras.Model, dataset: Dataset, model_dir: str | Path, cfg: TrainConfig,
                      augmentation=None, augmented_copies: int = 2, learning_rate: float = 1e-3,
                      verbose: int = 2, callbacks: list | None = None) -> pd.DataFrame:
    """Train only the head of a transfer model whose backbone is frozen, on features computed once.

    A frozen backbone gives the same features every epoch, so running it
    every epoch (the expensive part of the network) is waste: the training
    images go through it once, plus ``augmented_copies`` randomly augmented
    copies (each copy one more pass), the validation images once; the head
    (dropout and the output layer) is then trained on those features by
    :func:`train_model`, with the same callbacks. The best head's weights are
    put back into ``model``, which is saved as ``model_dir/best.keras``: one
    flat model, as for every other lesson.
    """
    from medlab.models import HEAD_PREFIX, backbone_layers

    if any(layer.trainable for layer in backbone_layers(model)):
        raise ValueError("train_frozen_head needs a frozen backbone; use train_model to train the whole network")
    if augmented_copies < 0:
        raise ValueError(f"augmented_copies must be non-negative, got {augmented_copies}")
    folder = ModelFolder(Path(model_dir))
    train, started = dataset.train, time.perf_counter()
    extractor = feature_extractor(model)  # one for every pass below: its prediction graph is traced once
    features = [frozen_features(extractor, train.images)]
    for _copy in range(augmented_copies if augmentation is not None else 0):
        augmented = np.concatenate([
            augmentation(train.images[start:start + 256].astype("float32"), training=True).numpy()
            for start in range(0, len(train), 256)])
        features.append(frozen_features(extractor, augmented))
    copies = len(features)
    feature_splits = {
        "train": Split(np.concatenate(features), np.tile(train.labels, copies), train.ids * copies,
                       train.hashes * copies),
        "val": Split(frozen_features(extractor, dataset.val.images), dataset.val.labels, dataset.val.ids,
                     dataset.val.hashes),
        "test": dataset.test,  # not used for training
    }
    feature_seconds = time.perf_counter() - started
    # A flat functional model lists its layers in graph order: after the pooling come the head's.
    head_layers = model.layers[model.layers.index(model.get_layer(f"{HEAD_PREFIX}pool")) + 1:]
    head_input = keras.Input(shape=features[0].shape[1:], name="features")
    x = head_input
    for layer in head_layers:
        x = layer.__class__.from_config(layer.get_config())(x)
    head = compile_model(keras.Model(head_input, x, name="head"), dataset.info.num_classes, learning_rate)
    history = train_model(head, Dataset(dataset.info, feature_splits), folder.path, cfg, verbose=verbose,
                          callbacks=callbacks)
    best_head = keras.saving.load_model(folder.checkpoint)  # the head alone: Keras layers only
    for layer in head_layers:
        layer.set_weights(best_head.get_layer(layer.name).get_weights())
    model.save(folder.checkpoint)
    keep_checkpoint_float32(model, folder.checkpoint)
    training = read_json(folder.training)
    training.update({"head_on_cached_features": True, "augmented_copies": copies - 1,
                     "feature_seconds": round(feature_seconds, 1), "parameters": int(model.count_params()),
                     "train_seconds": round(training["train_seconds"] + feature_seconds, 1)})
    write_json(folder.training, training)
    return history


def member_seeds(seed: int, members: int) -> list[int]:
    """Seeds of an ensemble's members: ``seed``, ``seed + 1000``, ... (runs with nearby seeds share none)."""
    if members < 1:
        raise ValueError(f"members must be at least 1, got {members}")
    return [seed + 1000 * index for index in range(members)]


def default_members(image_shape: tuple[int, ...]) -> int:
    """How many scratch CNNs lesson 03 averages when not told: 3 for images up to 32 px, else 1.

    A 28 px model trains in a few minutes on two CPU cores, so three fit in
    the time one 64 px model takes; on PneumoniaMNIST the average of three was
    more accurate than one member (``make bench`` prints the figures; the
    README's Results quote them with their commit).
    """
    return 3 if max(image_shape[:2]) <= 32 else 1


def train_members(build_model, dataset: Dataset, model_dir: str | Path, cfg: TrainConfig, members: int = 1,
                  augmentation=None, verbose: int = 2, test_time_views: bool = False,
                  callbacks: list | None = None) -> pd.DataFrame:
    """Train ``members`` models from different seeds and save their average as ``model_dir/best.keras``.

    ``build_model()`` returns a new compiled model; ``augmentation(seed)``
    returns the augmentation layer for a member (or ``None``). With one member
    this is :func:`train_model` with ``cfg.seed``. With several, each is
    trained into ``model_dir/members/seed<N>/`` and
    :func:`medlab.models.average_models` makes one flat model of their
    averaged logits, so evaluation, export and prediction see one model.
    With ``test_time_views`` the saved model also averages over
    :func:`medlab.models.test_time_views` of each image, if that raises the
    validation AUC (:func:`keep_better_on_validation`).
    Returns the histories, with a ``member`` column (the member's seed).
    """
    from dataclasses import replace

    from medlab.models import average_models, load_model

    folder = ModelFolder(Path(model_dir))
    seeds = member_seeds(cfg.seed, members)
    histories, summaries = [], []
    for number, seed in enumerate(seeds, start=1):
        set_determinism(seed)
        member = folder if members == 1 else folder.member(seed)
        if members > 1:
            print(f"member {number} of {members}, seed {seed}")
        history = train_model(build_model(), dataset, member.path, replace(cfg, seed=seed),
                              augmentation=augmentation(seed) if augmentation else None, verbose=verbose,
                              callbacks=callbacks)
        histories.append(history.assign(member=seed))
        summaries.append(read_json(member.training))
    if members > 1:
        trained = [load_model(folder.member(seed).checkpoint) for seed in seeds]
        average_models(trained, name=trained[0].name).save(folder.checkpoint)
        write_json(folder.training, {
            "config": asdict(cfg),
            "members": summaries,
            "member_seeds": seeds,
            "epochs_run": sum(member["epochs_run"] for member in summaries),
            "train_seconds": round(sum(member["train_seconds"] for member in summaries), 1),
            "parameters": sum(member["parameters"] for member in summaries),
            "devices": summaries[0].get("devices"),
        })
    if test_time_views:
        trained = [load_model((folder if members == 1 else folder.member(seed)).checkpoint) for seed in seeds]
        keep_better_on_validation(folder, dataset, trained)
    return pd.concat(histories)


def keep_better_on_validation(folder: ModelFolder, dataset: Dataset, trained: list[keras.Model]) -> dict:
    """Replace ``folder``'s checkpoint by the average over test-time views if its validation AUC is higher.

    Test-time views (the image, its mirror and four small shifts, see
    :func:`medlab.models.test_time_views`) average out some of a model's
    sensitivity to exactly where and which way round the anatomy lies, at
    six times the inference cost. Whether that helps is decided on the
    validation split only; the single-view model is kept as
    ``single_view.keras`` when it is replaced. The comparison is added to
    ``training.json`` under ``test_time_views`` and returned.
    """
    from medlab.models import average_models, load_model, test_time_views

    single = load_model(folder.checkpoint)
    views = test_time_views(dataset.val.images.shape[1:])
    viewed = average_models(trained, name=single.name, views=views)
    single_auc = evaluate_auc(dataset.val.labels, predict(single, dataset.val))
    viewed_auc = evaluate_auc(dataset.val.labels, predict(viewed, dataset.val))
    decision = {"views": [list(view) for view in views], "val_auc_single_view": round(single_auc, 4),
                "val_auc_with_views": round(viewed_auc, 4), "kept": bool(viewed_auc > single_auc)}
    folder.single_view_checkpoint.unlink(missing_ok=True)  # from an earlier run into this folder
    if decision["kept"]:
        folder.checkpoint.replace(folder.single_view_checkpoint)
        viewed.save(folder.checkpoint)
    training = read_json(folder.training, {})
    write_json(folder.training, {**training, "test_time_views": decision})
    print(f"test-time views: validation AUC {single_auc:.4f} on the image alone, {viewed_auc:.4f} averaged over "
          f"{len(views)} views: {'kept' if decision['kept'] else 'not kept'}")
    return decision


def predict(model: keras.Model, split: Split, batch_size: int = 256) -> np.ndarray:
    """Probabilities for a split: shape (N,) of the positive class for binary models, (N, C) otherwise."""
    return predict_images(model, split.images, batch_size)


def predict_images(model: keras.Model, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Probabilities for uint8 images: (N,) of the positive class for binary models, (N, C) otherwise."""
    probabilities = model.predict(images_dataset(images, batch_size), verbose=0)
    return probabilities[:, 0] if probabilities.shape[1] == 1 else probabilities


def save_predictions(model_dir: str | Path, split_name: str, split: Split, probabilities: np.ndarray,
                     class_names: list[str]) -> Path:
    """``predictions_<split>.csv``: id, true label, and one probability column per class."""
    table = pd.DataFrame({"id": split.ids, "label": split.labels})
    if probabilities.ndim == 1:
        table[f"p_{class_names[0]}"] = 1.0 - probabilities
        table[f"p_{class_names[1]}"] = probabilities
    else:
        for index, name in enumerate(class_names):
            table[f"p_{name}"] = probabilities[:, index]
    path = ModelFolder(Path(model_dir)).predictions(split_name)
    table.to_csv(path, index=False, float_format="%.6f")
    return path


def evaluate_auc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """ROC-AUC with scikit-learn (one-vs-rest macro average for multi-class)."""
    from sklearn.metrics import roc_auc_score

    if probabilities.ndim == 1:
        return float(roc_auc_score(labels, probabilities))
    return float(roc_auc_score(labels, probabilities, multi_class="ovr"))


def summarise_model(model_dir: str | Path, dataset: Dataset, extra: dict | None = None) -> dict:
    """Load the best checkpoint, save validation/test predictions, and summarise them.

    The returned dict (also written as ``summary.json``) holds validation and
    test ROC-AUC, validation recall at 0.5, the training summary and
    ``extra`` (e.g. whether ImageNet weights were used). Decision thresholds
    are chosen later, on validation data only (lesson 06).
    """
    from medlab.models import load_model

    folder = ModelFolder(Path(model_dir))
    model = load_model(folder.checkpoint)
    summary = {"model": model.name, **(extra or {})}
    for split_name in ("val", "test"):
        split = dataset.splits[split_name]
        probabilities = predict(model, split)
        save_predictions(folder.path, split_name, split, probabilities, dataset.info.class_names)
        summary[f"{split_name}_auc"] = round(evaluate_auc(split.labels, probabilities), 4)
        predicted = (probabilities >= 0.5).astype(int) if probabilities.ndim == 1 else probabilities.argmax(axis=1)
        summary[f"{split_name}_accuracy_at_0.5"] = round(float((predicted == split.labels).mean()), 4)
        if probabilities.ndim == 1:
            positives = split.labels == 1
            summary[f"{split_name}_recall_at_0.5"] = round(float(predicted[positives].mean()), 4)
    if folder.training.exists():
        summary["training"] = read_json(folder.training)
    write_json(folder.summary, summary)
    return summary
