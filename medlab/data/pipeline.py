"""``tf.data`` pipelines over in-memory splits, for training and prediction."""

from __future__ import annotations

import math

import numpy as np

from medlab import config
from medlab.data.types import Split


def batches_per_pass(images: int, batch_size: int) -> int:
    """How many batches one pass over ``images`` images makes (the last may be smaller): an epoch's steps."""
    return math.ceil(images / batch_size)


def make_tf_dataset(split: Split, num_classes: int, batch_size: int = 32, shuffle: bool = False,
                    seed: int = config.DEFAULT_SEED, augmentation=None, repeat: bool = False):
    """A ``tf.data`` pipeline over an in-memory split: shuffle, batch, augment, prefetch.

    Yields ``(images float32 in [0, 255], labels)``. Labels are float32 0/1 for
    two classes (one sigmoid output) and one-hot float32 rows otherwise
    (softmax output), which is what the Keras precision, recall and AUC
    metrics expect. ``augmentation`` is a Keras layer (see :mod:`medlab.augment`)
    applied to training batches only; shuffling is seeded so a rerun sees the
    same order. ``repeat`` runs through the split again and again, reshuffled
    each time, with batches that never straddle two passes: train on it with
    ``steps_per_epoch=batches_per_pass(len(split), batch_size)`` and ``fit`` keeps one
    iterator for the whole run instead of starting a new one each epoch (which
    stalled some epochs for about a second).
    """
    import tensorflow as tf

    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if num_classes == 2:
        labels = split.labels.astype(np.float32)
    else:
        labels = np.eye(num_classes, dtype=np.float32)[split.labels]
    dataset = tf.data.Dataset.from_tensor_slices((split.images, labels))
    if shuffle:
        dataset = dataset.shuffle(len(split), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size).map(lambda x, y: (tf.cast(x, tf.float32), y))
    if repeat:
        dataset = dataset.repeat()
    if augmentation is not None:
        dataset = dataset.map(lambda x, y: (augmentation(x, training=True), y))
    return _without_autotuning(dataset)


def images_dataset(images: np.ndarray, batch_size: int = 256):
    """Float32 batches of ``images`` for ``model.predict``: what Keras makes of a NumPy array, without the stall.

    Given an array, Keras builds an autotuned ``tf.data`` pipeline, whose end
    can wait for up to as long again as the prediction took (see
    :func:`_without_autotuning`): 2,000 images at 64 px took 1.30 s instead of
    0.67 s in six of eight calls.
    """
    import tensorflow as tf

    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return _without_autotuning(tf.data.Dataset.from_tensor_slices(np.asarray(images, dtype=np.float32))
                               .batch(batch_size))


def _without_autotuning(dataset):
    """``dataset`` prefetching two batches, with one thread per op and no autotuning.

    One thread per op: on a 2-core CPU, augmentation ops that each used every
    core fought the training step for them and made some epochs twice as long.
    No autotuning: its background thread wakes after 10 ms, then after twice
    as long each time (20 ms, 40 ms, ... up to every 60 s), and in TensorFlow
    2.21 deleting the iterator often waits for its next wake-up. The end of
    ``model.fit`` deletes the training iterator, so a training that was done
    after 52 s returned only at 81.9 s (10 ms + 20 ms + ... + 41 s): lesson
    04's slow runs. Two batches prefetched are all that in-memory arrays need.
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.threading.max_intra_op_parallelism = 1
    options.autotune.enabled = False
    return dataset.prefetch(2).with_options(options)
