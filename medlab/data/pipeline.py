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
    # One thread per op inside the pipeline: on a 2-core CPU, augmentation ops that each used every core
    # fought the training step for them and made some epochs twice as long (medlab bench speed).
    options = tf.data.Options()
    options.threading.max_intra_op_parallelism = 1
    return dataset.prefetch(tf.data.AUTOTUNE).with_options(options)
