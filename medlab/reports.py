"""``make reports``: run every notebook with papermill into one folder per dataset.

For ``DATASET=synthetic`` the result is ``reports/synthetic/``:

- ``NN_name.ipynb`` and ``NN_name.html``: each notebook, executed, and rendered by nbconvert;
- ``figures/*.png``: every figure the notebooks saved;
- ``records/*.json``: what the notebooks measured (see :func:`record`);
- ``metrics.json``: the records merged with the dataset fingerprint, package
  versions, git commit, parameters and each notebook's wall time;
- ``index.html``: the page to open first.

A run is built in a hidden staging folder and swapped in only when every
notebook succeeded. If one fails, ``make`` exits non-zero, the executed
notebook with its error is kept in ``reports/<run>.failed/``, and the
previous complete report is left as it was.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import platform
import shutil
import time
from importlib import metadata
from pathlib import Path

from medlab import config
from medlab.evaluate import HEADLINE_METRICS
from medlab.execution import LESSON_PRELOAD, NotebookFailed, Task, run_notebooks
from medlab.html import render
from medlab.npzio import FileLockedError, one_writer
from medlab.runs import RunFolder, read_json, run_name, write_json

REPORTED_PACKAGES = ("medlab", "tensorflow", "keras", "numpy", "pandas", "scikit-learn",
                     "matplotlib", "seaborn", "pillow", "papermill", "nbconvert")


class ReportError(RuntimeError):
    """A notebook failed; the message says which, why, and where its output is."""


def notebooks(selection: list[str] | None = None) -> list[Path]:
    """The numbered notebooks in order, optionally only those whose number or name is given."""
    found = sorted(config.NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
    if not selection:
        return found
    chosen = [path for path in found if any(path.stem == s or path.stem.startswith(f"{s}_") or path.name == s
                                             for s in selection)]
    unknown = [s for s in selection if not any(p.stem == s or p.stem.startswith(f"{s}_") or p.name == s
                                               for p in found)]
    if unknown:
        raise ValueError(f"no notebook matches {unknown}; available: {[p.stem for p in found]}")
    return chosen


def record(run_dir: str | Path | None, section: str, values: dict) -> None:
    """Store a notebook's measurements as ``records/<section>.json`` (merged into metrics.json)."""
    if not run_dir:
        return
    write_json(RunFolder(run_dir).record(section), values, sort_keys=True, default=_jsonable)


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in REPORTED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def run_reports(dataset: str = config.DEFAULT_DATASET, selection: list[str] | None = None,
                parameters: dict | None = None, kernel: str | None = None,
                progress: bool = True, reports_dir: Path | None = None, name: str | None = None,
                at_once: int | None = None) -> Path:
    """Execute the notebooks for ``dataset`` and swap the finished run into ``reports/<run>/``.

    ``name`` overrides the run folder's name (the benchmark keeps one run per seed). ``at_once``
    notebooks run side by side where one does not need another (default
    :func:`medlab.config.notebooks_at_once`; see :mod:`medlab.execution`).
    """
    reports_dir = Path(reports_dir or config.reports_dir())
    if Path(dataset).expanduser().exists():  # notebooks run in notebooks/: pass paths absolute
        dataset = str(Path(dataset).expanduser().resolve())
    name = name or run_name(dataset)
    try:
        with one_writer(reports_dir / name, progress=False, wait=False):  # a second run would delete its staging
            return _run_reports(dataset, selection, parameters, kernel, progress, reports_dir, name, at_once)
    except FileLockedError:
        raise ReportError(f"Another run is writing {reports_dir / name}/ (a `make reports` in another terminal?). "
                          "Wait for it to finish, or give this one another MEDLAB_REPORTS_DIR.") from None


def _run_reports(dataset: str, selection: list[str] | None, parameters: dict | None, kernel: str | None,
                 progress: bool, reports_dir: Path, name: str, at_once: int | None) -> Path:
    final = reports_dir / name
    staging = reports_dir / f".{name}.staging"
    failed = reports_dir / f"{name}.failed"
    shutil.rmtree(staging, ignore_errors=True)
    parameters = dict(parameters or {})
    chosen = notebooks(selection)
    if not chosen:
        raise ReportError(f"no notebooks found in {config.NOTEBOOKS_DIR}")
    timings: dict[str, float] = {}
    used_parameters: dict[str, dict] = {}
    if selection and final.exists():
        # A partial run (e.g. only 06) builds on the complete report: its models, records, timings.
        shutil.copytree(final, staging, symlinks=True)
        previous = read_json(RunFolder(final).metrics, {})
        timings.update(previous.get("notebook_wall_time_s", {}))
        used_parameters.update(previous.get("parameters", {}))
    staging.mkdir(parents=True, exist_ok=True)
    tasks = _tasks(chosen, staging, {"dataset": dataset, "run_dir": str(staging.resolve()), **parameters}, kernel)
    used_parameters.update({task.notebook.stem: {k: v for k, v in task.parameters.items() if k != "run_dir"}
                            for task in tasks})
    at_once = config.notebooks_at_once() if at_once is None else at_once
    print(f"[medlab] {len(tasks)} notebook(s) on {dataset}, up to {at_once} at a time", flush=True)
    started = time.perf_counter()
    try:
        new_timings = run_notebooks(tasks, at_once, progress)
    except NotebookFailed as failure:
        _keep_as_failed(staging, failed)
        raise _report_error(failure, dataset, final, failed) from None
    except KeyboardInterrupt:  # Ctrl-C: keep what ran, as for a failure
        _keep_as_failed(staging, failed)
        print(f"[medlab] interrupted: the notebooks, as far as they ran, are in {failed}/. {_kept(final)}", flush=True)
        raise
    elapsed = time.perf_counter() - started  # a partial run: only the notebooks it ran (they may have overlapped)
    timings.update(new_timings)

    run = RunFolder(staging)
    metrics = _collect_metrics(run, dataset, name, timings, used_parameters, elapsed, list(new_timings), at_once)
    write_json(run.metrics, metrics, sort_keys=True)
    run.index_html.write_text(_index_html(run, metrics), encoding="utf-8")
    run.model_card.write_text(model_card(metrics), encoding="utf-8")
    if parameters.get("tracking"):
        from medlab.tracking import log_report

        log_report(run, metrics)
    _swap_into_place(staging, final)
    shutil.rmtree(failed, ignore_errors=True)
    return final


def _tasks(chosen: list[Path], staging: Path, given: dict, kernel: str | None) -> list[Task]:
    """One papermill task per notebook, passed only the ``given`` parameters it declares."""
    import papermill

    tasks = []
    for notebook in chosen:
        declared = papermill.inspect_notebook(str(notebook))
        passed = {key: value for key, value in given.items() if key in declared}
        tasks.append(Task(notebook, RunFolder(staging).executed_notebook(notebook), passed, kernel,
                          preload=LESSON_PRELOAD))
    return tasks


def _keep_as_failed(staging: Path, failed: Path) -> None:
    """A run that stopped part-way: its staging folder becomes ``<run>.failed/`` (an older one replaced)."""
    shutil.rmtree(failed, ignore_errors=True)
    staging.rename(failed)


def _kept(final: Path) -> str:
    """What became of the previous complete report (left untouched, or there was none)."""
    return (f"The previous complete report in {final}/ was left untouched." if final.exists() else
            f"No complete report exists for this dataset yet, so {final}/ was not created.")


def _report_error(failure: NotebookFailed, dataset: str, final: Path, failed: Path) -> ReportError:
    return ReportError(f"{failure.notebook.name} failed on dataset {dataset!r}: {failure.reason}: {failure.detail}\n"
                       f"The executed notebook, with the error shown, is in {failed}/. {_kept(final)}")


def _collect_metrics(run: RunFolder, dataset: str, name: str, timings: dict, parameters: dict,
                     elapsed_seconds: float, ran: list[str], at_once: int) -> dict:
    records = run.records()
    return {
        "run": name,
        "dataset_spec": dataset,
        "dataset": records.pop("dataset", None),
        "records": records,
        "parameters": parameters,
        "notebook_wall_time_s": timings,
        "total_wall_time_s": round(elapsed_seconds, 2),  # of the notebooks this run executed, `notebooks_run`
        "notebooks_run": ran,
        "notebooks_at_once": at_once,
        "git_commit": config.git_commit(),
        "versions": package_versions(),
        "machine": {"platform": platform.platform(), "processor": platform.machine(),
                    "cpu_count": config.cpu_count(), **training_devices(records)},
        "generated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def training_devices(records: dict) -> dict:
    """The GPUs, precision policies and oneDNN use the run's models really trained with (from their ``training.json``)."""
    gpus, precisions, onednn = set(), set(), set()
    for record in records.values():
        devices = (record.get("training") or {}).get("devices") if isinstance(record, dict) else None
        if devices:
            gpus.update(devices.get("gpus", []))
            precisions.add(devices.get("precision", "float32"))
            if devices.get("onednn") is not None:  # recorded since oneDNN was asked for
                onednn.add(devices["onednn"])
    return {"gpus": sorted(gpus), "training_precision": sorted(precisions), "training_onednn": sorted(onednn)}


def warn(message: str) -> None:
    """A warning a notebook reader cannot miss: a red box in the notebook, a WARNING line in logs."""
    from IPython.display import HTML, display

    display(HTML("<div style='border:3px solid #c00;background:#fee;padding:8px;color:#900'>"
                 f"<b>WARNING: {html.escape(message)}</b></div>"))
    print(f"WARNING: {message}")


def headline_keys(metrics: dict) -> list[str]:
    """The headline table's columns: model, pretrained, threshold, then the task's :data:`HEADLINE_METRICS`."""
    task = (metrics.get("dataset") or {}).get("task", "binary")
    return ["model", "pretrained", "threshold", *HEADLINE_METRICS.get(task, HEADLINE_METRICS["binary"])]


def headline_rows(metrics: dict) -> list[dict]:
    """Per model: test metrics at the frozen threshold with 95% CIs, from notebook 06's record."""
    evaluation = metrics.get("records", {}).get("evaluation") or {}
    rows = []
    for name, result in (evaluation.get("models") or {}).items():
        row = {"model": name, "pretrained": result.get("pretrained"), "threshold": result.get("threshold")}
        for key in headline_keys(metrics)[3:]:
            if key in result.get("test", {}):
                low, high = result.get("test_ci95", {}).get(key, (None, None))
                row[key] = (result["test"][key], low, high)
        rows.append(row)
    return rows


def _format(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, tuple):
        point, low, high = value
        return f"{point:.3f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None else "")
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _precision_lines(metrics: dict) -> list[str]:
    """The model card's note on a training precision other than float32, which other hardware would not repeat."""
    precisions = (metrics.get("machine") or {}).get("training_precision") or []
    if all(precision == "float32" for precision in precisions):
        return []
    return [f"Training precision: {', '.join(precisions)} (`mixed_bfloat16`: a CPU with AMX or AVX512-BF16, "
            "`mixed_float16`: a GPU). On other hardware the same seeds train in float32 and give slightly "
            "different numbers; the saved models compute in float32 (bfloat16) or as trained (float16).", ""]


def _scratch_epochs_note(metrics: dict) -> str:
    """How long lessons 04 and 05 trained the from-scratch backbone (each at most its ``scratch_epochs``), if recorded."""
    notes = ""
    for lesson, name, verb in (("04", "model_transfer", "trained"), ("05", "model_fine_tuned", "fine-tuned")):
        training = (metrics.get("records", {}).get(name) or {}).get("training") or {}
        if "epochs_run" not in training:
            continue
        settings = training.get("config", {})
        rate = f" at a learning rate of {settings['learning_rate']:g}" if "learning_rate" in settings else ""
        rate += " on a cosine schedule" if settings.get("schedule") == "cosine" else ""
        notes += (f" Lesson {lesson} {verb} it for {training['epochs_run']} epochs{rate} (at most "
                  f"{settings.get('max_epochs')}, its `scratch_epochs`).")
    return notes


def model_card(metrics: dict) -> str:
    """A markdown model card written from the same numbers as metrics.json."""
    dataset = metrics.get("dataset") or {}
    evaluation = metrics.get("records", {}).get("evaluation") or {}
    rows = headline_rows(metrics)
    lines = [f"# Model card: {metrics['run']}", ""]
    if dataset.get("synthetic"):
        lines += ["> **Synthetic data.** Every number below comes from generated phantoms, not patients.", ""]
    lines += [
        "## Intended use",
        "Teaching and research on medical image classification. **Not for clinical use.**", "",
        "## Data",
        f"- dataset: `{metrics['dataset_spec']}` ({dataset.get('kind', '?')}, {dataset.get('task', '?')}), "
        f"classes {dataset.get('class_names')}",
        f"- sha256: `{dataset.get('sha256', '?')}`; licence: {dataset.get('licence', '?')}",
        f"- images per split: {json.dumps(dataset.get('counts', {}))}", "",
        "## Models and test results",
    ]
    if rows:
        header = headline_keys(metrics)
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(_format(row.get(key, "")) for key in header) + " |" for row in rows]
        binary = any(row.get("threshold") is not None for row in rows)
        lines += [
            "",
            f"Thresholds were chosen on the validation split for recall >= {evaluation.get('target_recall')} "
            "and frozen before the test split was read; brackets are stratified bootstrap 95% intervals."
            if binary else "Multi-class: each image gets its most probable class; recall and precision are "
            "macro-averaged over classes (per-class recall in metrics.json).",
            f"Best model by validation AUC: `{evaluation.get('best_model_by_val_auc')}`.",
        ]
        if any(row.get("pretrained") is False for row in rows):
            lines += ["", "**pretrained: false** for the transfer models: ImageNet weights were not available, "
                      "so their backbones were trained from random initialisation. This is not transfer learning."
                      + _scratch_epochs_note(metrics)]
        lines += _test_time_view_lines(metrics.get("records", {}))
        gradcam = evaluation.get("gradcam") or {}
        if "pointing_game" in gradcam:
            pointing = gradcam["pointing_game"]
            lines += ["", f"Grad-CAM pointing game ({gradcam['model']}): {pointing['hit_rate']:.2f} of "
                      f"{pointing['images']} diseased test images have their heatmap peak inside the lesion; "
                      f"chance is {pointing['chance']:.3f} (the mean share of the image the lesion covers, "
                      f"grown by {pointing.get('tolerance_px', 0)} px as the heatmap peak is allowed to be)."]
    else:
        lines += ["No evaluation record in this run (notebook 06 did not run)."]
    lines += _tflite_lines(metrics.get("records", {}))
    lines += [
        "", "## Reproduce",
        f"`{reproduce_command(metrics)}` at commit `{metrics['git_commit']}` (seeded; versions in metrics.json).", "",
    ]
    lines += _precision_lines(metrics)
    return "\n".join(lines)


def reproduce_command(metrics: dict) -> str:
    """The ``make reports`` line that makes this report again: its data set and every parameter the run was given
    (a bench run's seed, for example), which the notebooks' defaults would otherwise replace."""
    given: dict = {}
    for parameters in metrics.get("parameters", {}).values():
        given.update({name: value for name, value in parameters.items() if name not in ("dataset", "run_dir")})
    command = f"make reports DATASET={metrics['dataset_spec']}"
    if given.pop("skip_bad_files", False):
        command += " SKIP_BAD_FILES=1"
    if tracking := given.pop("tracking", ""):
        command += f" TRACKING={tracking}"
    spelled = [f"-p {name}={value}" if isinstance(value, str) and value.replace("_", "").isalnum() else
               f"-p {name}={json.dumps(value, separators=(',', ':'))}" for name, value in sorted(given.items())]
    return command + (f" PARAMS='{' '.join(spelled)}'" if spelled else "")


def _tflite_lines(records: dict) -> list[str]:
    """Lesson 07's exports for the model card: one row per variant, and what test-time views cost if priced."""
    tflite = records.get("tflite") or {}
    if not tflite:
        return []
    threshold = tflite.get("threshold")
    decisions = "argmax decisions" if threshold is None else f"decision threshold {threshold:.4g}, frozen on validation"
    lines = ["", f"## TFLite exports of `{tflite['model']}` ({decisions})",
             "| variant | size (KiB) | latency (ms) | ROC-AUC | recall | decision agreement | recall drop > 1 pt |",
             "|---|---|---|---|---|---|---|"]
    for name, row in tflite["variants"].items():
        lines.append(f"| {name} | {row['size_kb']:.0f} | {row.get('latency_ms', float('nan')):.2f} "
                     f"| {row['roc_auc']:.4f} | {row.get('recall', float('nan')):.4f} "
                     f"| {row['decision_agreement']:.4f} | {'**YES**' if row['recall_drop_flag'] else 'no'} |")
    lines += ["", "Latency: one image, median, on the machine that made this report (lesson 07)."]
    views = records.get("tflite_views") or {}
    if views:
        lines += ["", "What the test-time views cost, against the single-view model kept beside them:"]
    for name, row in views.items():
        lines.append(f"- {name}: float32 {row['float32_ms']:.2f} ms, int8 {row['int8_ms']:.2f} ms, "
                     f"validation AUC {row['validation_auc']:.4f}")
    return lines


def _test_time_view_lines(records: dict) -> list[str]:
    """What the test-time views decision was, per model that made one (lesson 03), for the model card."""
    lines = []
    for section, record in sorted(records.items()):
        views = (record.get("training") or {}).get("test_time_views") if section.startswith("model_") else None
        if views:
            lines.append(f"- `{section.removeprefix('model_')}`: averaged over {len(views['views'])} views of each "
                         f"image (mirror and small shifts): validation AUC {views['val_auc_with_views']:.4f} with, "
                         f"{views['val_auc_single_view']:.4f} without, so "
                         + ("kept" if views["kept"] else "not kept (the model predicts from the image alone)") + ".")
    return ["", "Test-time views, decided on the validation split:", *lines] if lines else []


def _swap_into_place(staging: Path, final: Path) -> None:
    """Replace ``final`` with ``staging`` so that a complete report is always on disk."""
    previous = final.with_name(f".{final.name}.previous")
    shutil.rmtree(previous, ignore_errors=True)
    if final.exists():
        final.rename(previous)
    staging.rename(final)
    shutil.rmtree(previous, ignore_errors=True)


def _index_html(run: RunFolder, metrics: dict) -> str:
    """The run's ``index.html`` (template ``templates/index.html.j2``): dataset, headline, notebooks, figures."""
    dataset = metrics.get("dataset") or {}
    counts = dataset.get("counts") or {}
    return render(
        "index.html.j2", metrics=metrics, dataset=dataset, format=_format,
        split_counts=[(split, list(counts[split].values())) for split in ("train", "val", "test") if split in counts],
        headline=headline_rows(metrics), headline_keys=headline_keys(metrics),
        figures=[{"link": path.relative_to(run.root).as_posix(), "caption": path.stem}
                 for path in sorted(run.figures_dir.glob("*.png"))],
        links={"metrics": run.metrics.name, "model_card": run.model_card.name},
    )
