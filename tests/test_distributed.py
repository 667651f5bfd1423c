"""Two worker processes on 127.0.0.1 train one model with MultiWorkerMirroredStrategy."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from medlab.distributed import _plateau_rate, is_chief, multi_worker_strategy
from medlab.models import load_model
from medlab.train import TrainConfig

WORKER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from medlab.train import get_strategy
    strategy = get_strategy("multi_worker")  # first, before any other TensorFlow work
    from medlab.augment import build_augmentation
    from medlab.data import load_dataset
    from medlab.distributed import is_chief
    from medlab.models import build_scratch_cnn
    from medlab.train import TrainConfig, compile_model, set_determinism, train_model
    data = load_dataset("synthetic", image_size=32, max_images_per_split=64, seed=0, progress=False)
    set_determinism(0)
    with strategy.scope():
        model = compile_model(build_scratch_cnn((32, 32, 1), 2, data.train.images, filters=(4, 8), dense_units=8), 2)
    started = time.perf_counter()
    history = train_model(model, data, sys.argv[1], TrainConfig(max_epochs=3, batch_size=16, seed=0),
                          augmentation=build_augmentation(seed=0), verbose=0)
    np.save(sys.argv[2], np.concatenate([np.ravel(w) for w in model.get_weights()]))
    print("WORKERS", strategy.num_replicas_in_sync, "CHIEF", is_chief(strategy), "EPOCHS", len(history),
          "SECONDS", round(time.perf_counter() - started, 1), flush=True)
""")


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_two_workers_end_with_the_same_weights_as_the_chiefs_saved_model(tmp_path):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    workers = []
    started = time.perf_counter()
    for index in range(2):
        environment = {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster,
                                                              "task": {"type": "worker", "index": index}})}
        workers.append(subprocess.Popen(
            [sys.executable, "-c", WORKER, str(tmp_path / f"model{index}"), str(tmp_path / f"weights{index}.npy")],
            env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [worker.communicate(timeout=600) for worker in workers]
    print(f"two workers: {time.perf_counter() - started:.1f} s wall")
    for index, (stdout, stderr) in enumerate(outputs):
        assert workers[index].returncode == 0 and "WORKERS 2" in stdout, stderr[-3000:]
    assert "CHIEF True" in outputs[0][0] and "CHIEF False" in outputs[1][0]
    chief_weights, other_weights = (np.load(tmp_path / f"weights{index}.npy") for index in range(2))
    np.testing.assert_array_equal(chief_weights, other_weights)  # batch norm statistics included
    saved = load_model(tmp_path / "model0" / "best.keras")
    np.testing.assert_array_equal(np.concatenate([np.ravel(w) for w in saved.get_weights()]), chief_weights)
    training = json.loads((tmp_path / "model0" / "training.json").read_text())
    assert training["workers"] == 2 and training["strategy"] == "multi_worker" and training["chief"] is True
    assert len(open(tmp_path / "model0" / "history.csv").readlines()) == 1 + training["epochs_run"]


def test_multi_worker_needs_a_valid_tf_config(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="needs the TF_CONFIG environment variable"):
        multi_worker_strategy()
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}}')
    with pytest.raises(ValueError, match="not a valid cluster description"):
        multi_worker_strategy()
    monkeypatch.setenv("TF_CONFIG", "not json")
    with pytest.raises(ValueError, match="not a valid cluster description"):
        multi_worker_strategy()


def test_plateau_rate_halves_like_reduce_lr_on_plateau():
    cfg = TrainConfig(learning_rate=1e-3, reduce_lr_patience=2, schedule="plateau")
    history = []
    for loss in [1.0, 0.9, 0.95, 0.92, 0.91, 0.93, 0.8, 0.85, 0.86]:
        history.append({"val_loss": loss, "learning_rate": _plateau_rate(cfg, history)})
    # Two epochs without a better loss halve the rate, and the count starts again after each halving.
    assert [row["learning_rate"] for row in history] == [1e-3, 1e-3, 1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 2.5e-4, 2.5e-4]
    assert _plateau_rate(cfg, history) == 1.25e-4


def test_a_single_process_is_its_own_chief():
    import tensorflow as tf

    assert is_chief(tf.distribute.get_strategy())
