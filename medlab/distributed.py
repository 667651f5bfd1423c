"""Training on more than one machine: ``tf.distribute.MultiWorkerMirroredStrategy``.

Every machine (a *worker*) runs the same program with its own ``TF_CONFIG``
environment variable, the standard way TensorFlow describes a cluster::

    TF_CONFIG='{"cluster": {"worker": ["host0:12345", "host1:12345"]}, "task": {"type": "worker", "index": 0}}'

Worker 0 is the *chief*: it alone writes the report; lesson 03 gives the
other workers a temporary run folder (:func:`is_chief`). Each step, every worker takes its
own shard of the training batches (``AutoShardPolicy.DATA``), computes
gradients, and the gradients are summed across workers before the same
update is applied everywhere, so all workers hold the same weights. Batch
normalisation is synchronised (one batch's statistics over all workers,
:func:`medlab.models.build_scratch_cnn` does it under this strategy), so the
moving averages agree too.

Keras 3.15's ``model.fit`` fails under this strategy ("Attempt to convert a
value (PerReplica ...) to a Tensor", keras-team/keras#20585), so
:func:`train_distributed` is a plain custom training loop with the same
behaviour as :func:`medlab.train.train_model`: class weights, the learning-rate
schedule, the checkpoint with the best validation metric, early stopping on
the validation loss that restores the best weights, and ``history.csv``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from medlab.data import Dataset, make_tf_dataset
from medlab.models import keep_checkpoint_float32
from medlab.runs import ModelFolder, write_json


def multi_worker_strategy() -> tf.distribute.MultiWorkerMirroredStrategy:
    """The strategy for the cluster ``TF_CONFIG`` describes; a clear error when it is missing or malformed.

    Create it first thing in the program, before any other TensorFlow work.
    """
    text = os.environ.get("TF_CONFIG")
    if not text:
        raise ValueError('strategy "multi_worker" needs the TF_CONFIG environment variable on every machine, e.g. '
                         'TF_CONFIG=\'{"cluster": {"worker": ["host0:12345", "host1:12345"]}, '
                         '"task": {"type": "worker", "index": 0}}\' (see the README, "More than one machine")')
    try:
        cluster = json.loads(text)
        workers, task = cluster["cluster"]["worker"], cluster["task"]
        if task["type"] != "worker" or not 0 <= int(task["index"]) < len(workers):
            raise ValueError(f"task {task} is not one of the {len(workers)} workers")
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"TF_CONFIG is not a valid cluster description ({error}): {text[:200]}") from None
    return tf.distribute.MultiWorkerMirroredStrategy()


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True on the worker that writes files: worker 0, or the only process without a cluster."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (resolver.task_type == "worker" and resolver.task_id == 0)


def is_multi_worker(model: keras.Model) -> bool:
    """Whether ``model`` was built under a multi-worker strategy (and so must train with :func:`train_distributed`)."""
    return isinstance(model.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy)


def _per_example_loss(num_classes: int):
    if num_classes == 2:
        return keras.losses.BinaryCrossentropy(reduction=None)
    return keras.losses.CategoricalCrossentropy(reduction=None)


def train_distributed(model: keras.Model, dataset: Dataset, model_dir: str | Path, cfg, cosine_schedule,
                      augmentation=None, verbose: int = 2, callbacks: list | None = None) -> pd.DataFrame:
    """:func:`medlab.train.train_model` as a custom loop for a model built under a multi-worker strategy.

    ``cfg.batch_size`` is each worker's batch; one step updates the weights
    once with the gradients of ``workers x batch_size`` images. Validation
    runs on the whole validation split on every worker (the same numbers
    everywhere, so every worker takes the same early-stopping decisions).
    ``cosine_schedule(epoch)`` gives the rate when ``cfg.schedule`` is
    ``"cosine"``; ``"plateau"`` halves it as ``ReduceLROnPlateau`` would.
    ``callbacks`` get ``on_epoch_end`` with the epoch's metrics. Every worker
    writes ``best.keras``, ``history.csv`` and ``training.json`` into its own
    ``model_dir``.
    """
    strategy = model.distribute_strategy
    folder = ModelFolder(Path(model_dir)).create()
    num_classes = dataset.info.num_classes
    training = make_tf_dataset(dataset.train, num_classes, cfg.batch_size, shuffle=True, seed=cfg.seed,
                               augmentation=augmentation)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    training = strategy.experimental_distribute_dataset(training.with_options(options))
    class_weight = dataset.class_weights() if cfg.class_weighting else None
    weights = tf.constant([class_weight[c] if class_weight else 1.0 for c in range(num_classes)], tf.float32)
    step = _train_step(model, strategy, _per_example_loss(num_classes), weights, num_classes)
    history, best, best_loss, waited, started = [], None, np.inf, 0, time.perf_counter()
    for epoch in range(cfg.max_epochs):
        rate = cosine_schedule(epoch) if cfg.schedule == "cosine" else _plateau_rate(cfg, history)
        model.optimizer.learning_rate.assign(rate)
        losses = [float(step(batch)) for batch in training]
        row = {"epoch": epoch + 1, "loss": float(np.mean(losses)), **_validate(model, dataset, num_classes),
               "learning_rate": float(model.optimizer.learning_rate.numpy())}
        history.append(row)
        for callback in callbacks or []:
            callback.set_model(model)
            callback.on_epoch_end(epoch, {k: v for k, v in row.items() if k != "epoch"})
        if verbose:
            print(" - ".join(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                  flush=True)
        if _improved(row, history[:-1], cfg.monitor):
            best = [np.array(w) for w in model.get_weights()]
            model.save(folder.checkpoint)
        if row["val_loss"] < best_loss:
            best_loss, waited = row["val_loss"], 0
        else:
            waited += 1
            if waited >= cfg.early_stopping_patience:
                break
    model.set_weights(best)
    keep_checkpoint_float32(model, folder.checkpoint)
    table = pd.DataFrame(history).set_index("epoch")
    table.to_csv(folder.history)
    monitor = f"val_{cfg.monitor}"
    best_epoch = int(table[monitor].idxmin() if cfg.monitor == "loss" else table[monitor].idxmax())
    write_json(folder.training, {
        "config": asdict(cfg), "class_weight": class_weight, "epochs_run": len(table), "best_epoch": best_epoch,
        f"best_{monitor}": float(table.loc[best_epoch, monitor]),
        "train_seconds": round(time.perf_counter() - started, 1), "parameters": int(model.count_params()),
        "workers": strategy.num_replicas_in_sync, "strategy": "multi_worker", "chief": is_chief(strategy)})
    return table


def _train_step(model, strategy, per_example_loss, class_weights, num_classes):
    with strategy.scope():
        model.optimizer.build(model.trainable_variables)

    def replica_step(images, labels):
        indices = tf.cast(labels, tf.int32) if num_classes == 2 else tf.argmax(labels, axis=-1, output_type=tf.int32)
        with tf.GradientTape() as tape:
            predictions = model(images, training=True)
            targets = labels[:, None] if num_classes == 2 else labels
            losses = per_example_loss(targets, predictions) * tf.gather(class_weights, indices)
            loss = tf.nn.compute_average_loss(losses)  # divided by the global batch: gradients sum across workers
        gradients = tape.gradient(loss, model.trainable_variables)
        model.optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss

    @tf.function
    def step(batch):
        per_replica = strategy.run(replica_step, args=batch)
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    return step


def _validate(model, dataset: Dataset, num_classes: int, batch_size: int = 256) -> dict:
    from sklearn.metrics import accuracy_score, roc_auc_score

    images = dataset.val.images
    probabilities = np.concatenate([  # model.predict, like model.fit, fails under this strategy
        np.asarray(model(images[start:start + batch_size].astype("float32"), training=False))
        for start in range(0, len(images), batch_size)])
    probabilities = probabilities[:, 0] if num_classes == 2 else probabilities
    labels = dataset.val.labels
    if num_classes == 2:
        clipped = np.clip(probabilities, 1e-7, 1 - 1e-7)
        loss = -np.mean(labels * np.log(clipped) + (1 - labels) * np.log(1 - clipped))
        predicted = (probabilities >= 0.5).astype(int)
    else:
        loss = -np.mean(np.log(np.clip(probabilities[np.arange(len(labels)), labels], 1e-7, 1)))
        predicted = probabilities.argmax(axis=1)
    auc = roc_auc_score(labels, probabilities) if num_classes == 2 else roc_auc_score(labels, probabilities,
                                                                                       multi_class="ovr")
    return {"val_loss": float(loss), "val_accuracy": float(accuracy_score(labels, predicted)), "val_auc": float(auc)}


def _improved(row: dict, earlier: list[dict], monitor: str) -> bool:
    key = f"val_{monitor}"
    if not earlier:
        return True
    values = [r[key] for r in earlier]
    return row[key] < min(values) if monitor == "loss" else row[key] > max(values)


def _plateau_rate(cfg, history: list[dict]) -> float:
    """``ReduceLROnPlateau(factor=0.5, patience=cfg.reduce_lr_patience, min_lr=1e-6)`` on the validation loss."""
    if not history:
        return cfg.learning_rate
    losses, rates = [row["val_loss"] for row in history], [row["learning_rate"] for row in history]
    last_reduction = max([index for index in range(1, len(rates)) if rates[index] < rates[index - 1]], default=0)
    waited = len(history) - 1 - max(int(np.argmin(losses)), last_reduction - 1)
    return max(rates[-1] * 0.5, 1e-6) if waited >= cfg.reduce_lr_patience else rates[-1]
