"""Experiment tracking with MLflow: optional, off by default.

Each training lesson and the evaluation lesson has a ``tracking`` parameter
(``make reports TRACKING=mlflow`` sets it). With ``"mlflow"``, the lesson
becomes one MLflow run: its notebook parameters, the dataset and its
fingerprint, the git commit and the seed as tags, one row of metrics per
training epoch (a Keras callback passed to :func:`medlab.train.train_model`),
the final metrics and its files (``best.keras``, history, figures). After a
whole report, ``medlab reports`` adds the run's ``metrics.json``,
``model_card.md`` and ``index.html`` to the evaluation lesson's run.

Where it goes: ``MLFLOW_TRACKING_URI`` when set (a server, a database, a
folder); otherwise a SQLite file ``mlruns.db`` in the project with the
artifacts in ``mlartifacts/``, so no server is needed. ``make mlflow``
opens MLflow's UI on that store. With tracking off (``""``) nothing is
imported, written or changed.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import keras

from medlab import config
from medlab.runs import RunFolder, read_json, write_json

EXPERIMENT = "medlab"
CHOICES = ("", "mlflow")


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the project's own SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{config.PROJECT_ROOT / 'mlruns.db'}"


def artifact_root() -> str | None:
    """Where a new experiment keeps its files: ``mlartifacts/`` beside a SQLite store, else the server's choice."""
    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None  # a server or a folder store has its own artifact location
    return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()


def notebook_parameters(namespace: dict, notebook: str) -> dict:
    """The values of the parameters declared in ``notebooks/<notebook>.ipynb``'s parameters cell.

    ``namespace`` is the notebook's ``globals()``, after papermill injected its values.
    """
    import papermill

    declared = papermill.inspect_notebook(str(config.NOTEBOOKS_DIR / f"{notebook}.ipynb"))
    return {name: namespace[name] for name in declared if name in namespace and name != "run_dir"}


def flat_metrics(values: dict, prefix: str = "") -> dict[str, float]:
    """Every finite number in a nested dict, as ``{"a.b.c": value}`` (MLflow metrics are flat)."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_metrics(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            flat[name] = float(value)
    return flat


class Tracker:
    """Tracking off: every method does nothing (the lessons call them unconditionally)."""

    run_id: str | None = None

    def callbacks(self) -> list:
        return []

    def log_metrics(self, values: dict, prefix: str = "") -> None:
        pass

    def log_artifacts(self, paths) -> None:
        pass

    def end(self) -> None:
        pass

    def finish(self, metrics: dict, files) -> None:
        """A lesson's last step: its final metrics (prefixed ``final.``), its files, and the run's end."""
        self.log_metrics(metrics, prefix="final.")
        self.log_artifacts(files)
        self.end()


class MlflowTracker(Tracker):
    """One lesson as one MLflow run, written through ``MlflowClient`` (no global active run)."""

    def __init__(self, run_dir: str | Path | None, lesson: str, parameters: dict, dataset_info=None):
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri())
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            EXPERIMENT, artifact_location=artifact_root())
        report = Path(run_dir).name.removeprefix(".").removesuffix(".staging") if run_dir else "interactive"
        tags = {"medlab.lesson": lesson, "medlab.report": report, "medlab.git_commit": config.git_commit(),
                "seed": str(parameters.get("seed", ""))}
        if dataset_info is not None:
            tags.update({"medlab.dataset": dataset_info.name, "medlab.dataset_sha256": dataset_info.fingerprint,
                         "medlab.synthetic": str(dataset_info.synthetic)})
        run = self.client.create_run(experiment_id, run_name=f"{report}/{lesson}", tags=tags)
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(name, str(value)[:6000])
                                                   for name, value in sorted(parameters.items())])
        if run_dir:  # where medlab reports finds the evaluation lesson's run
            write_json(RunFolder(run_dir).record(f"tracking_{lesson}"),
                       {"run_id": self.run_id, "experiment_id": experiment_id, "tracking_uri": tracking_uri()})
        print(f"MLflow run {self.run_id} ({run.info.run_name}) in {tracking_uri()}")

    def callbacks(self) -> list:
        return [EpochLogger(self)]

    def log_metrics(self, values: dict, prefix: str = "", step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, value, now, step) for name, value in flat_metrics(values, prefix).items()]
        for start in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def log_artifacts(self, paths) -> None:
        for path in map(Path, paths):
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
            elif path.exists():
                self.client.log_artifact(self.run_id, str(path))

    def end(self) -> None:
        self.client.set_terminated(self.run_id)


class EpochLogger(keras.callbacks.Callback):
    """Logs every epoch's training and validation metrics (and the learning rate) to the tracker's run."""

    def __init__(self, tracker: MlflowTracker):
        super().__init__()
        self.tracker = tracker

    def on_epoch_end(self, epoch, logs=None):
        values = dict(logs or {})
        if hasattr(self.model, "optimizer") and self.model.optimizer is not None:
            values["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        self.tracker.log_metrics(values, step=epoch)


def start_tracking(tracking: str, run_dir: str | Path | None, lesson: str, parameters: dict, dataset_info=None) -> Tracker:
    """The tracker a lesson asked for: ``""`` (off) or ``"mlflow"``."""
    if tracking not in CHOICES:
        raise ValueError(f"tracking must be one of {CHOICES}, got {tracking!r}")
    if not tracking:
        return Tracker()
    return MlflowTracker(run_dir, lesson, parameters, dataset_info)


def log_report(run_folder, metrics: dict) -> str | None:
    """Add a finished report's files and headline numbers to its evaluation lesson's MLflow run, if it has one."""
    tracked = read_json(run_folder.record("tracking_06_evaluation"), None)
    if not tracked:
        return None
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracked["tracking_uri"])
    for path in (run_folder.metrics, run_folder.model_card, run_folder.index_html):
        client.log_artifact(tracked["run_id"], str(path), artifact_path="report")
    client.log_metric(tracked["run_id"], "report.total_wall_time_s", float(metrics["total_wall_time_s"]))
    return tracked["run_id"]


TRACKED_LESSONS = ("03_scratch_cnn", "04_transfer_learning", "05_fine_tuning", "06_evaluation")


def check_store(report: str | None = None) -> list[str]:
    """Problems with the store's runs: each tracked lesson (of ``report``, if given) needs a finished run with metrics.

    Reads the store back with ``mlflow.search_runs``, as a user comparing runs would.
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    runs = mlflow.search_runs(experiment_names=[EXPERIMENT])
    if report and len(runs):
        runs = runs[runs["tags.medlab.report"] == report]
    problems = []
    for lesson in TRACKED_LESSONS:
        found = runs[runs["tags.medlab.lesson"] == lesson] if len(runs) else runs
        metrics = [column for column in found.columns if column.startswith("metrics.")]
        if not len(found):
            problems.append(f"{lesson}: no MLflow run")
        elif not (found["status"] == "FINISHED").all():
            problems.append(f"{lesson}: a run did not finish")
        elif found[metrics].notna().sum(axis=1).min() == 0:
            problems.append(f"{lesson}: a run has no metrics")
        else:
            print(f"{lesson}: {len(found)} finished run(s), {int(found[metrics].notna().sum(axis=1).min())}+ metrics")
    return problems


def main(argv: list[str] | None = None) -> int:
    """``python -m medlab.tracking ui`` (MLflow's UI on the lessons' store) or ``check [REPORT]``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check"]:
        problems = check_store(argv[1] if len(argv) > 1 else None)
        print("\n".join(problems) or f"every tracked lesson has a finished run with metrics in {tracking_uri()}")
        return 1 if problems else 0
    if argv[:1] != ["ui"]:
        print("usage: python -m medlab.tracking ui [mlflow ui options] | check [REPORT]", file=sys.stderr)
        return 2
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri()]
    if artifact_root():
        command += ["--default-artifact-root", artifact_root()]
    print(" ".join(command), flush=True)
    os.execv(sys.executable, command + argv[1:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
