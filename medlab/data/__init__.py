"""Datasets from every source the course uses, behind one description.

``load_dataset(spec)`` accepts

- ``"synthetic"`` / ``"synthetic-4class"``: the built-in generator (the offline default);
- a MedMNIST flag such as ``"pneumoniamnist"`` or ``"pneumoniamnist_64"``, looked up
  in ``data/medmnist/`` (``make data`` puts it there);
- a path to a MedMNIST-style ``.npz`` file (any 2D single-label flag and size);
- a path to a class-per-folder image tree in the Kaggle layouts, e.g.
  ``chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}``, ``{train,valid,test}/<class>``
  or ``{Training,Testing}/<class>``.

Whatever the source, the result is a :class:`Dataset`: a :class:`DatasetInfo`
(class names, task, image size, channels, source, licence, sha256 fingerprint,
notes) and ``train``/``val``/``test`` :class:`Split` objects holding uint8 pixels
in memory. Folder images are decoded once, in parallel, by a ``tf.data``
pipeline and cached on disk, so later runs start in seconds.

The package has one module per source (:mod:`~medlab.data.synthetic`,
:mod:`~medlab.data.medmnist`, :mod:`~medlab.data.npz`, :mod:`~medlab.data.folder`),
the types they all return (:mod:`~medlab.data.types`), validation carving
(:mod:`~medlab.data.splitting`), the ``tf.data`` input pipeline
(:mod:`~medlab.data.pipeline`) and :mod:`~medlab.data.registry`, whose
``load_dataset`` hands a spec to the first source that takes it.

Images stay in [0, 255]. Scaling and normalisation belong to each model
(a ``Normalization`` layer or the backbone's ``preprocess_input``), so an
exported model takes raw pixels and cannot be fed the wrong scale.
"""

from medlab.data.pipeline import batches_per_pass, images_dataset, make_tf_dataset
from medlab.data.registry import SOURCES, LoadOptions, load_dataset
from medlab.data.splitting import carve_groups, carve_validation
from medlab.data.types import SPLITS, DataError, Dataset, DatasetInfo, Split

__all__ = [
    "SOURCES", "SPLITS", "DataError", "Dataset", "DatasetInfo", "LoadOptions", "Split",
    "carve_groups", "carve_validation", "load_dataset", "make_tf_dataset", "images_dataset", "batches_per_pass",
]
