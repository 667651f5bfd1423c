"""medlab: reproducible medical image classification, taught one notebook at a time.

The package holds the small, tested helpers the notebooks call, one module per
pipeline stage:

- :mod:`medlab.config`     paths and defaults, derived in one place
- :mod:`medlab.synthetic`  the offline default: chest-radiograph-like phantoms
- :mod:`medlab.data`       datasets from MedMNIST ``.npz``, the generator and class-per-folder trees (JPEG, PNG, DICOM)
                           (one module per source, a registry, validation carving, ``tf.data`` input)
- :mod:`medlab.download`   fetching official MedMNIST files (MD5-checked)
- :mod:`medlab.audit`      duplicate detection within and across splits
- :mod:`medlab.augment`    the Keras augmentation pipeline
- :mod:`medlab.models`     scratch CNN and transfer models (flat graphs)
- :mod:`medlab.train`      determinism, compilation, callbacks, fit, predictions
- :mod:`medlab.evaluate`   validation-frozen thresholds, metrics with CIs, calibration
- :mod:`medlab.explain`    Grad-CAM, pointing game, randomisation check
- :mod:`medlab.export`     TFLite conversion and LiteRT parity checks
- :mod:`medlab.predict`    using a run's model on new images (``medlab predict``)
- :mod:`medlab.serve`      the web app (``medlab serve``)
- :mod:`medlab.plots`      figures for EDA and reports
- :mod:`medlab.reports`    running the notebooks into ``reports/`` (:mod:`medlab.execution` executes them,
                           :mod:`medlab.html` renders the index page)
- :mod:`medlab.runs`       the layout of a run folder, every file name spelled once
- :mod:`medlab.speed`, :mod:`medlab.bench`  ``make bench``: training speed against the CPU, results over seeds
- :mod:`medlab.distributed`, :mod:`medlab.tracking`  multi-worker training, MLflow tracking (both optional)
- :mod:`medlab.cli`, :mod:`medlab.smoke`, :mod:`medlab.npzio`  the ``medlab`` command, the notebooks' smoke run,
                           reproducible ``.npz`` files
"""

import logging
import os

# TensorFlow's C++ start-up chatter (CUDA probing, CPU instruction notes) buries
# what a student should read; keep warnings and errors. Set before TF loads.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# oneDNN's kernels: TensorFlow uses them by itself on Linux only on CPUs with VNNI, AVX512-BF16 or AMX
# instructions (DefaultOneDnnPolicy in tensorflow/core/util/port.cc). On an AVX2-only CPU
# (a 2-core AMD Zen 3) `model.fit` of lesson 03's 64 px CNN ran 1.3x faster (README, Training speed), with the
# same weights on every rerun. Set before TensorFlow loads; `make setup` also sets it in the medlab kernel.
# TF_ENABLE_ONEDNN_OPTS=0 in the environment keeps TensorFlow's own kernels.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


class KerasRetracingFilter(logging.Filter):
    """Drops TensorFlow's "triggered tf.function retracing" warning when it is about Keras' own training functions.

    Keras makes new train and predict functions for every model it trains, and TensorFlow counts them as one
    function (they share their code), so after five models trained or predicted with in one process (lesson 03's
    members, its written-out fit and its test-time views) TensorFlow prints "5 out of the last 5 calls ... triggered
    tf.function retracing ... please define your @tf.function outside of the loop": advice about Keras' insides
    that a reader cannot follow, in the middle of a lesson. The warning about a reader's own ``tf.function`` is kept.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("triggered tf.function retracing" in message and "<function TensorFlowTrainer." in message)


class TensorFlowInfoFilter(logging.Filter):
    """Drops the INFO lines of TensorFlow's Python logger, as ``TF_CPP_MIN_LOG_LEVEL`` above does for its C++ side.

    In a Jupyter kernel TensorFlow sets its logger to INFO and prints to stdout, so every SavedModel export
    (lessons 04, 05, 07) printed "INFO:tensorflow:Assets written to: /tmp/..." into the lesson. Warnings and
    errors pass; ``TF_CPP_MIN_LOG_LEVEL=0`` in the environment, TensorFlow's own "show everything", keeps the INFO
    lines too.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0"


logging.getLogger("tensorflow").addFilter(KerasRetracingFilter())
logging.getLogger("tensorflow").addFilter(TensorFlowInfoFilter())

__version__ = "0.1.0"
