"""Shared fixtures: isolated data/report folders and tiny generated image trees."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import medlab  # noqa: F401  (before any test module loads TensorFlow: asks it for oneDNN, as the notebooks' kernel does)

SHARED_PNEUMONIAMNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "pneumoniamnist" / "pneumoniamnist.npz"


@pytest.fixture(scope="session")
def shared_synthetic_dir(tmp_path_factory) -> Path:
    """One folder of generated synthetic datasets for the whole session.

    Generating the 2,400 images of a synthetic set takes about 2 s at 32 px, and a dozen tests load the same one.
    Its cache is keyed by every setting and checked against its sha256 (medlab.synthetic.ensure_synthetic), so
    sharing it cannot hand a test other images than it would generate itself.
    """
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path, monkeypatch, shared_synthetic_dir):
    """Every test writes its caches, reports and MLflow runs under its own temporary folder.

    Only ``data/synthetic`` is a link to the session's shared folder (see ``shared_synthetic_dir``).
    """
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "synthetic").symlink_to(shared_synthetic_dir, target_is_directory=True)
    monkeypatch.setenv("MEDLAB_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MEDLAB_REPORTS_DIR", str(tmp_path / "reports"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    return tmp_path


def _cpu_runs_bfloat16() -> bool:
    from medlab import config

    return "avx512bw" in (config.cpu_flags() or set())  # oneDNN's bfloat16 kernels need AVX-512 (emulated without AVX512-BF16 or AMX)


# Tests that compute in bfloat16 on purpose: oneDNN runs it on AVX-512 CPUs (every machine seen here), not on AVX2.
needs_bfloat16 = pytest.mark.skipif(not _cpu_runs_bfloat16(), reason="this CPU has no AVX-512 for bfloat16 kernels")


def write_image(path: Path, value: int, size=(20, 16), mode: str = "L", fmt: str | None = None) -> Path:
    """A flat image of brightness ``value`` with a small bright square, saved in ``mode``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.full((size[1], size[0]), value, dtype=np.uint8)
    array[2:6, 2:6] = 255
    image = Image.fromarray(array)
    if mode == "I;16":
        image = Image.fromarray(array.astype(np.uint16) * 257)
    elif mode != "L":
        image = image.convert(mode)
    image.save(path, format=fmt)
    return path


def make_tree(root: Path, splits: dict[str, str], classes: dict[str, int], per_class: int = 6,
              names: str = "img{index}.png") -> Path:
    """A class-per-folder tree: ``splits`` maps folder name to anything, ``classes`` folder name to brightness."""
    for split_folder in splits:
        for class_folder, value in classes.items():
            for index in range(per_class):
                write_image(root / split_folder / class_folder / names.format(index=index, split=split_folder),
                            value + index)
    return root


@pytest.fixture
def tiny_npz(tmp_path) -> Path:
    """A MedMNIST-layout file: 28x28 grayscale, two classes, labels shaped (N, 1)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in (("train", 40), ("val", 10), ("test", 12)):
        labels = np.arange(count) % 2
        images = rng.integers(0, 100, (count, 28, 28), dtype=np.uint8) + (labels * 100)[:, None, None].astype(np.uint8)
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = labels.reshape(-1, 1).astype(np.uint8)
    path = tmp_path / "pneumoniamnist.npz"
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run folder like `make reports` writes: a small trained model, its records and an int8 export."""
    return _tiny_run(tmp_path_factory.mktemp("tiny_run"), "binary")


@pytest.fixture(scope="session")
def tiny_run_four_class(tmp_path_factory):
    """The same for a four-class task (softmax output, argmax decisions, no threshold)."""
    return _tiny_run(tmp_path_factory.mktemp("tiny_run_four_class"), "four_class")


def _tiny_run(root, task):

    from medlab.data import load_dataset
    from medlab.evaluate import evaluate_model, load_model_predictions
    from medlab.export import export_variant, model_metadata
    from medlab.models import build_scratch_cnn
    from medlab.runs import RunFolder, write_json
    from medlab.synthetic import SyntheticConfig, generate
    from medlab.train import (
        TrainConfig,
        compile_model,
        set_determinism,
        summarise_model,
        train_model,
    )

    np.savez(root / "tiny.npz", **generate(SyntheticConfig(task=task, image_size=32, counts=(160, 60, 60), seed=3,
                                                           difficulty=0.0)))
    dataset = load_dataset(root / "tiny.npz", progress=False)
    run = RunFolder(root / "run")
    set_determinism(0)
    classes = dataset.info.num_classes
    model = compile_model(build_scratch_cnn((32, 32, 1), classes, dataset.train.images, filters=(8, 16),
                                            dense_units=8), classes, learning_rate=3e-3)
    model_dir = run.model("scratch_cnn")
    train_model(model, dataset, model_dir, TrainConfig(max_epochs=6, batch_size=32), verbose=0)
    summarise_model(model_dir, dataset, {"pretrained": None})
    write_json(run.record("dataset"), dataset.describe())
    (evaluated,) = [evaluate_model(m, n_resamples=10) for m in load_model_predictions(run)]
    write_json(run.record("evaluation"), {
        "best_model_by_val_auc": "scratch_cnn", "models": {"scratch_cnn": {"threshold": evaluated.get("threshold")}}})
    import keras

    import medlab.models  # noqa: F401

    best = keras.saving.load_model(model_dir.checkpoint)
    export_variant(best, "int8", run.tflite("scratch_cnn", "int8"),
                   model_metadata(dataset.info.class_names, (32, 32, 1), evaluated.get("threshold"), "scratch_cnn"),
                   dataset.train.images[:32])
    return run.root, dataset
