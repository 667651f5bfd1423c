import json

import numpy as np
import pytest

from medlab import tracking
from medlab.data import load_dataset
from medlab.models import build_scratch_cnn
from medlab.runs import RunFolder
from medlab.train import TrainConfig, compile_model, set_determinism, train_model


@pytest.fixture(scope="module")
def tiny():
    return load_dataset("synthetic", image_size=32, max_images_per_split=48, seed=0, progress=False)


def _train(tiny, folder, callbacks):
    set_determinism(0)
    model = compile_model(build_scratch_cnn((32, 32, 1), 2, tiny.train.images, filters=(4,), dense_units=4), 2)
    return model, train_model(model, tiny, folder, TrainConfig(max_epochs=2, batch_size=16, seed=0), verbose=0,
                              callbacks=callbacks)


def test_a_tracked_run_reads_back_with_the_mlflow_client(tiny, tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    run_dir = tmp_path / ".synthetic.staging"
    tracker = tracking.start_tracking("mlflow", run_dir, "03_scratch_cnn", {"seed": 0, "max_epochs": 2, "filters": [4]},
                             tiny.info)
    folder = RunFolder(run_dir).model("scratch_cnn")
    _model, history = _train(tiny, folder.path, tracker.callbacks())
    tracker.log_metrics({"val_auc": 0.75, "training": {"epochs_run": 2, "devices": {"gpus": []}}, "flag": True},
                        prefix="checkpoint.")
    tracker.log_artifacts([folder.checkpoint, folder.history, tmp_path / "missing.png"])
    tracker.end()

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[tracking.EXPERIMENT])
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["tags.mlflow.runName"] == "synthetic/03_scratch_cnn" and run["tags.seed"] == "0"
    assert run["tags.medlab.dataset_sha256"] == tiny.info.fingerprint and run["status"] == "FINISHED"
    assert run["params.max_epochs"] == "2" and run["params.filters"] == "[4]"
    assert run["metrics.checkpoint.val_auc"] == 0.75 and run["metrics.checkpoint.training.epochs_run"] == 2
    assert "metrics.checkpoint.flag" not in runs.columns  # booleans are not metrics
    client = mlflow.MlflowClient(uri)
    per_epoch = client.get_metric_history(run["run_id"], "val_loss")
    assert [m.step for m in per_epoch] == [0, 1]
    np.testing.assert_allclose([m.value for m in per_epoch], history["val_loss"].to_numpy(), rtol=1e-6)
    assert sorted(a.path for a in client.list_artifacts(run["run_id"])) == ["best.keras", "history.csv"]
    recorded = json.loads(RunFolder(run_dir).record("tracking_03_scratch_cnn").read_text())
    assert recorded["run_id"] == run["run_id"]


def test_tracking_off_changes_nothing(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store.db'}")
    tracker = tracking.start_tracking("", tmp_path / "run", "03_scratch_cnn", {"seed": 0})
    assert tracker.callbacks() == [] and tracker.run_id is None
    tracker.log_metrics({"a": 1.0})
    tracker.end()
    tracked, _ = _train(tiny, tmp_path / "with", tracker.callbacks())
    plain, _ = _train(tiny, tmp_path / "without", None)
    assert all(np.array_equal(a, b) for a, b in zip(tracked.get_weights(), plain.get_weights()))
    assert not (tmp_path / "store.db").exists() and not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="tracking must be one of"):
        tracking.start_tracking("wandb", tmp_path, "03_scratch_cnn", {})


def test_flat_metrics_and_notebook_parameters():
    assert tracking.flat_metrics({"a": 1, "b": {"c": 2.5, "d": "x", "e": float("nan")}, "f": False}) == {
        "a": 1.0, "b.c": 2.5}
    namespace = {"seed": 3, "max_epochs": 5, "run_dir": "/x", "unrelated": 1}
    assert tracking.notebook_parameters(namespace, "03_scratch_cnn") == {"seed": 3, "max_epochs": 5}


def test_a_finished_report_adds_its_files_to_the_evaluation_run(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store.db'}")
    run = RunFolder(tmp_path / "synthetic")
    assert tracking.log_report(run, {"total_wall_time_s": 1.0}) is None  # 06 was not tracked: nothing to add to
    tracker = tracking.start_tracking("mlflow", run.root, "06_evaluation", {"seed": 1})
    tracker.finish({"test": {"scratch_cnn": {"recall": 0.9, "recall_ci95": {"low": 0.8, "high": 0.95}}}}, [])
    for path in (run.metrics, run.model_card, run.index_html):
        path.write_text("{}")
    assert tracking.log_report(run, {"total_wall_time_s": 12.5}) == tracker.run_id
    client = mlflow.MlflowClient(tracking.tracking_uri())
    assert sorted(a.path for a in client.list_artifacts(tracker.run_id, "report")) == [
        "report/index.html", "report/metrics.json", "report/model_card.md"]
    metrics = client.get_run(tracker.run_id).data.metrics
    assert metrics["report.total_wall_time_s"] == 12.5 and metrics["final.test.scratch_cnn.recall_ci95.low"] == 0.8
    assert [problem.split(":")[0] for problem in tracking.check_store("synthetic")] == [
        "03_scratch_cnn", "04_transfer_learning", "05_fine_tuning"]  # only 06 was tracked here
