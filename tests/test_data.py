
import numpy as np
import pytest

from medlab.data import DataError, batches_per_pass, images_dataset, load_dataset, make_tf_dataset

CHEST = {"NORMAL": 40, "PNEUMONIA": 160}


# ----------------------------------------------------------------- .npz files

def test_medmnist_npz_layout(tiny_npz):
    dataset = load_dataset(tiny_npz)
    assert dataset.info.class_names == ["normal", "pneumonia"]  # from MedMNIST's labels, by file name
    assert dataset.info.task == "binary" and dataset.info.channels == 1
    assert dataset.train.images.shape == (40, 28, 28, 1)
    assert dataset.train.labels.shape == (40,)
    assert dataset.counts().loc["test", "total"] == 12
    assert len(dataset.info.fingerprint) == 64


def test_npz_resize_and_rgb(tiny_npz):
    dataset = load_dataset(tiny_npz, image_size=40, channels=3)
    assert dataset.val.images.shape == (10, 40, 40, 3)
    assert dataset.val.images.dtype == np.uint8
    np.testing.assert_array_equal(dataset.val.images[..., 0], dataset.val.images[..., 2])


def _write(path, **arrays):
    np.savez(path, **arrays)
    return path


def _arrays(count=8):
    return {"images": np.zeros((count, 8, 8), np.uint8), "labels": (np.arange(count) % 2).reshape(-1, 1)}


def test_npz_missing_key_is_named(tmp_path):
    parts = _arrays()
    path = _write(tmp_path / "broken.npz", train_images=parts["images"], train_labels=parts["labels"],
                  test_images=parts["images"])
    with pytest.raises(DataError, match="test_labels"):
        load_dataset(path)


def test_npz_mismatched_lengths_are_named(tmp_path):
    parts = _arrays()
    path = _write(tmp_path / "broken.npz", train_images=parts["images"], train_labels=parts["labels"][:5],
                  test_images=parts["images"], test_labels=parts["labels"])
    with pytest.raises(DataError, match=r"'train_images' has 8 images but 'train_labels' has 5"):
        load_dataset(path)


def test_npz_multilabel_is_refused(tmp_path):
    parts = _arrays()
    multi = np.zeros((8, 14), np.uint8)
    path = _write(tmp_path / "chestmnist.npz", train_images=parts["images"], train_labels=multi,
                  test_images=parts["images"], test_labels=multi)
    with pytest.raises(DataError, match="multi-label"):
        load_dataset(path)


def test_not_an_npz_is_named(tmp_path):
    path = tmp_path / "fake.npz"
    path.write_text("hello")
    with pytest.raises(DataError, match="fake.npz: not a readable .npz"):
        load_dataset(path)


def test_npz_without_val_gets_a_stratified_carve_out(tmp_path):
    rng = np.random.default_rng(1)
    labels = (np.arange(100) % 2).reshape(-1, 1)
    path = _write(tmp_path / "noval.npz", train_images=rng.integers(0, 255, (100, 8, 8), dtype=np.uint8),
                  train_labels=labels, test_images=np.zeros((4, 8, 8), np.uint8), test_labels=labels[:4])
    dataset = load_dataset(path, validation_fraction=0.2)
    assert len(dataset.val) == 20 and len(dataset.train) == 80
    assert sorted(np.bincount(dataset.val.labels)) == [10, 10]
    assert not set(dataset.train.hashes) & set(dataset.val.hashes)
    assert any("moved to 'val'" in note for note in dataset.info.notes)


def test_unknown_dataset_name_explains_the_options():
    with pytest.raises(DataError, match="synthetic"):
        load_dataset("no/such/place")


def test_medmnist_flag_not_downloaded_says_how_to_get_it():
    with pytest.raises(DataError, match="make data"):
        load_dataset("pneumoniamnist")


# ----------------------------------------------------------------- synthetic

def test_synthetic_default_is_marked_synthetic():
    dataset = load_dataset("synthetic", image_size=32, max_images_per_split=30, progress=False)
    assert dataset.info.synthetic and dataset.info.kind == "synthetic"
    assert dataset.train.masks is not None and dataset.train.masks.shape == (30, 32, 32)
    assert all(len(split) == 30 for split in dataset.splits.values())
    assert dataset.describe()["synthetic"] is True


def test_synthetic_four_class():
    dataset = load_dataset("synthetic-4class", image_size=32, max_images_per_split=40, progress=False)
    assert dataset.info.task == "multiclass" and dataset.info.num_classes == 4


def test_class_weights_balance_the_loss():
    dataset = load_dataset("synthetic", image_size=32, progress=False)
    weights = dataset.class_weights()
    counts = np.bincount(dataset.train.labels)
    assert weights[0] * counts[0] == pytest.approx(weights[1] * counts[1])
    assert weights[0] > weights[1]  # normal is the rarer class


# ----------------------------------------------------------------- tf.data

def test_tf_dataset_batches_and_labels(tiny_npz):
    dataset = load_dataset(tiny_npz)
    batches = list(make_tf_dataset(dataset.train, 2, batch_size=16))
    images, labels = batches[0]
    assert images.shape == (16, 28, 28, 1) and images.dtype.name == "float32"
    assert labels.shape == (16,) and labels.dtype.name == "float32"
    assert float(images.numpy().max()) > 1.0  # pixels stay in [0, 255]; models normalise
    assert sum(int(b[0].shape[0]) for b in batches) == 40
    one_hot = next(iter(make_tf_dataset(dataset.train, 3, batch_size=4)))[1].numpy()
    np.testing.assert_array_equal(one_hot.argmax(axis=1), dataset.train.labels[:4])
    np.testing.assert_array_equal(one_hot.sum(axis=1), 1.0)


def test_tf_dataset_shuffle_is_seeded(tiny_npz):
    dataset = load_dataset(tiny_npz)

    def first_pixels(seed):
        return np.concatenate([x.numpy()[:, 0, 0, 0] for x, _y in make_tf_dataset(dataset.train, 2, 8, True, seed)])

    np.testing.assert_array_equal(first_pixels(3), first_pixels(3))
    assert not np.array_equal(first_pixels(3), first_pixels(4))
    assert sorted(first_pixels(3)) == sorted(first_pixels(4))


def test_repeated_tf_dataset_reshuffles_each_pass_in_whole_batches(tiny_npz):
    dataset = load_dataset(tiny_npz)  # 40 training images: batches of 16, 16 and 8 in each pass
    passes = make_tf_dataset(dataset.train, 2, 16, shuffle=True, seed=3)
    expected = [x.numpy()[:, 0, 0, 0] for _ in range(3) for x, _y in passes]
    repeated = iter(make_tf_dataset(dataset.train, 2, 16, shuffle=True, seed=3, repeat=True))
    got = [next(repeated)[0].numpy()[:, 0, 0, 0] for _ in range(9)]
    assert [len(batch) for batch in got] == [16, 16, 8] * 3 and batches_per_pass(40, 16) == 3
    for ours, theirs in zip(got, expected):
        np.testing.assert_array_equal(ours, theirs)
    assert not np.array_equal(np.concatenate(got[:3]), np.concatenate(got[3:6]))  # reshuffled each pass


def test_pipelines_do_not_autotune(tiny_npz):
    """An autotuned iterator's deletion waited for tf.data's next tuning wake-up: up to as long again as it ran."""
    dataset = load_dataset(tiny_npz)
    for pipeline in (make_tf_dataset(dataset.train, 2, 16, shuffle=True, augmentation=lambda x, training: x,
                                     repeat=True), images_dataset(dataset.test.images, 16)):
        options = pipeline.options()
        assert options.autotune.enabled is False and options.threading.max_intra_op_parallelism == 1


def test_images_dataset_batches_the_images_as_float32(tiny_npz):
    images = load_dataset(tiny_npz).test.images
    batches = [batch.numpy() for batch in images_dataset(images, batch_size=5)]
    assert [len(batch) for batch in batches] == [5, 5, 2] and batches[0].dtype == np.float32
    np.testing.assert_array_equal(np.concatenate(batches), images.astype(np.float32))
    with pytest.raises(ValueError):
        images_dataset(images, batch_size=0)


def test_bad_arguments_raise_value_error(tiny_npz):
    with pytest.raises(ValueError):
        load_dataset(tiny_npz, on_error="ignore")
    with pytest.raises(ValueError):
        load_dataset(tiny_npz, channels=2)
    dataset = load_dataset(tiny_npz)
    with pytest.raises(ValueError):
        make_tf_dataset(dataset.train, 1)


def test_a_new_source_is_one_module_and_one_registry_entry(monkeypatch, tiny_npz):
    """load_dataset asks each registered source in turn and uses the first that matches."""
    import types

    from medlab.data import SOURCES, npz
    from medlab.data.registry import LoadOptions

    calls = []

    def load(spec, options):
        calls.append((spec, options))
        return npz.load_npz(tiny_npz, None, None, options.seed, options.validation_fraction)

    source = types.SimpleNamespace(matches=lambda spec: spec.startswith("hospital://"), load=load)
    monkeypatch.setitem(SOURCES, "hospital", source)
    dataset = load_dataset("hospital://ward-3", seed=3, max_images_per_split=10)
    assert calls == [("hospital://ward-3", LoadOptions(None, None, 3, 0.1, "raise", True))]
    assert max(len(split) for split in dataset.splits.values()) <= 10
    with pytest.raises(DataError, match="not found"):
        load_dataset("clinic://nowhere")
