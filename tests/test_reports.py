import json

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from medlab import config, reports
from medlab.reports import ReportError, record, run_name, run_reports
from medlab.runs import RunFolder


def _notebook(path, body):
    parameters = new_code_cell('dataset: str = "synthetic"  # which data\nrun_dir: str = ""  # output folder')
    parameters.metadata["tags"] = ["parameters"]
    notebook = new_notebook(cells=[parameters, new_code_cell(body)])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, path)


@pytest.fixture
def notebook_dir(tmp_path, monkeypatch):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    monkeypatch.setattr(config, "NOTEBOOKS_DIR", folder)
    monkeypatch.setattr(reports, "LESSON_PRELOAD", "")  # these stand-ins load no TensorFlow (3 s a kernel)
    _notebook(folder / "01_first.ipynb",
              "from medlab.reports import record\n"
              "record(run_dir, 'dataset', {'name': dataset, 'synthetic': True})\n"
              "print('hello from', dataset)")
    _notebook(folder / "02_second.ipynb", "record_value = 2\nprint(record_value)")
    return folder


def test_run_name():
    assert run_name("synthetic") == "synthetic"
    assert run_name("../shared/data/pneumoniamnist/pneumoniamnist.npz") == "pneumoniamnist"
    assert run_name("/data/chest_xray/") == "chest_xray"


def test_record_writes_json_and_ignores_empty_run_dir(tmp_path):
    record(tmp_path, "numbers", {"auc": 0.5})
    assert json.loads((tmp_path / "records" / "numbers.json").read_text()) == {"auc": 0.5}
    record("", "numbers", {"auc": 0.5})  # interactive use: nothing written, no error


def test_a_complete_run_writes_notebooks_html_metrics_and_index(notebook_dir, tmp_path):
    final = run_reports("synthetic", kernel="python3", progress=False, at_once=2)
    assert final == tmp_path / "reports" / "synthetic"
    for name in ("01_first.ipynb", "01_first.html", "02_second.html", "index.html", "metrics.json"):
        assert (final / name).exists(), name
    metrics = json.loads((final / "metrics.json").read_text())
    assert metrics["dataset"] == {"name": "synthetic", "synthetic": True}
    assert set(metrics["notebook_wall_time_s"]) == {"01_first", "02_second"}
    assert metrics["notebooks_at_once"] == 2 and metrics["notebooks_run"] == ["01_first", "02_second"]
    assert metrics["total_wall_time_s"] > 0  # (side by side: tests/test_execution.py checks that they overlap)
    assert metrics["versions"]["tensorflow"] != "not installed"
    assert "SYNTHETIC DATA" in (final / "index.html").read_text()
    assert "Up to 2 notebooks ran side by side" in (final / "index.html").read_text()
    assert "hello from synthetic" in (final / "01_first.html").read_text()
    assert not [path for path in (tmp_path / "reports").glob(".*") if path.is_dir()]  # no staging folder left behind


def test_a_failing_notebook_keeps_the_previous_report(notebook_dir, tmp_path):
    final = run_reports("synthetic", kernel="python3", progress=False)
    before = (final / "metrics.json").read_text()
    _notebook(notebook_dir / "02_second.ipynb", "raise RuntimeError('planted failure')")
    with pytest.raises(ReportError, match="02_second.ipynb failed.*planted failure"):
        run_reports("synthetic", kernel="python3", progress=False, at_once=1)  # one at a time, in this process
    assert (final / "metrics.json").read_text() == before
    failed = tmp_path / "reports" / "synthetic.failed"
    assert "planted failure" in (failed / "02_second.ipynb").read_text()
    assert (failed / "02_second.html").exists()


def test_a_second_run_into_the_same_folder_is_refused_while_the_first_writes(notebook_dir, tmp_path):
    # it would delete the first one's staging folder from under its notebooks
    from medlab.npzio import one_writer

    final = run_reports("synthetic", kernel="python3", progress=False, at_once=1)
    before = (final / "metrics.json").read_text()
    with one_writer(final, progress=False), pytest.raises(ReportError, match="Another run is writing .*synthetic"):
        run_reports("synthetic", kernel="python3", progress=False, at_once=1)
    assert (final / "metrics.json").read_text() == before
    assert run_reports("synthetic", kernel="python3", progress=False, at_once=1) == final  # free again


def test_an_interrupted_run_keeps_what_ran_and_the_previous_report(notebook_dir, tmp_path, monkeypatch, capsys):
    final = run_reports("synthetic", kernel="python3", progress=False, at_once=1)
    before = (final / "metrics.json").read_text()

    def interrupted(tasks, at_once, progress):
        tasks[0].output.write_text("{}")  # a notebook as far as it ran
        raise KeyboardInterrupt

    monkeypatch.setattr(reports, "run_notebooks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_reports("synthetic", kernel="python3", progress=False, at_once=1)
    assert (final / "metrics.json").read_text() == before
    assert (tmp_path / "reports" / "synthetic.failed" / "01_first.ipynb").read_text() == "{}"
    assert not (tmp_path / "reports" / ".synthetic.staging").exists()
    assert "interrupted: the notebooks, as far as they ran, are in" in capsys.readouterr().out


def test_notebook_selection(notebook_dir):
    assert [p.stem for p in reports.notebooks(["02"])] == ["02_second"]
    with pytest.raises(ValueError, match="no notebook matches"):
        reports.notebooks(["09"])


def test_relative_dataset_paths_are_made_absolute(notebook_dir, tmp_path, monkeypatch, tiny_npz):
    monkeypatch.chdir(tiny_npz.parent)
    final = run_reports(tiny_npz.name, kernel="python3", progress=False)
    assert final.name == "pneumoniamnist"
    metrics = json.loads((final / "metrics.json").read_text())
    assert metrics["dataset_spec"] == str(tiny_npz.resolve())


def test_a_partial_run_builds_on_the_complete_report(notebook_dir, tmp_path):
    final = run_reports("synthetic", kernel="python3", progress=False)
    (final / "records" / "kept.json").write_text('{"from": "earlier run"}')
    run_reports("synthetic", selection=["02"], kernel="python3", progress=False)
    metrics = json.loads((final / "metrics.json").read_text())
    assert metrics["records"]["kept"] == {"from": "earlier run"}
    assert set(metrics["notebook_wall_time_s"]) == {"01_first", "02_second"}  # 01's time carried over
    assert metrics["notebooks_run"] == ["02_second"]  # total_wall_time_s is this run's


def test_model_card_and_headline_from_evaluation_record():
    metrics = {
        "run": "synthetic", "dataset_spec": "synthetic", "git_commit": "abc",
        "dataset": {"synthetic": True, "class_names": ["normal", "pneumonia"]},
        "records": {"evaluation": {
            "target_recall": 0.95, "best_model_by_val_auc": "scratch_cnn",
            "models": {
                "scratch_cnn": {"pretrained": None, "threshold": 0.31, "test": {"roc_auc": 0.97, "recall": 0.96},
                                "test_ci95": {"roc_auc": [0.95, 0.98], "recall": [0.93, 0.98]}},
                "transfer": {"pretrained": False, "threshold": 0.4, "test": {"roc_auc": 0.8}, "test_ci95": {}},
            },
            "gradcam": {"model": "scratch_cnn", "pointing_game": {"hit_rate": 0.6, "chance": 0.03, "images": 64}},
        }, "model_scratch_cnn": {"training": {"test_time_views": {
            "views": [[False, 0, 0]] * 6, "val_auc_single_view": 0.9, "val_auc_with_views": 0.95, "kept": True}}}},
    }
    card = reports.model_card(metrics)
    assert "`scratch_cnn`: averaged over 6 views" in card and "0.9500 with, 0.9000 without, so kept." in card
    assert "Synthetic data" in card and "0.970 [0.950, 0.980]" in card
    assert "pretrained: false" in card and "chance is 0.030" in card
    assert "Lesson 04 trained it" not in card  # no lesson 04 record: nothing claimed
    assert "TFLite" not in card  # lesson 07 did not run
    row = {"size_kb": 440.0, "latency_ms": 0.7, "roc_auc": 0.97, "recall": 0.96, "decision_agreement": 1.0,
           "recall_drop_flag": False}
    metrics["records"]["tflite"] = {"model": "scratch_cnn", "threshold": 0.31, "variants": {"int8": row}}
    metrics["records"]["tflite_views"] = {
        "scratch_cnn with 6 views (kept)": {"views": 6, "validation_auc": 0.95, "float32_ms": 5.5, "int8_ms": 0.7},
        "scratch_cnn, single view": {"views": 1, "validation_auc": 0.9, "float32_ms": 0.9, "int8_ms": 0.12}}
    card = reports.model_card(metrics)
    assert "| int8 | 440 | 0.70 | 0.9700 | 0.9600 | 1.0000 | no |" in card
    assert "## TFLite exports of `scratch_cnn` (decision threshold 0.31, frozen on validation)" in card
    metrics["records"]["tflite"]["threshold"] = None  # a multi-class model: argmax, no threshold
    assert "## TFLite exports of `scratch_cnn` (argmax decisions)" in reports.model_card(metrics)
    assert "- scratch_cnn, single view: float32 0.90 ms, int8 0.12 ms, validation AUC 0.9000" in card
    metrics["records"]["model_transfer"] = {"training": {"epochs_run": 5, "config": {"max_epochs": 6}}}
    assert "Lesson 04 trained it for 5 epochs (at most 6, its `scratch_epochs`)." in reports.model_card(metrics)
    metrics["records"]["model_transfer"]["training"]["config"]["learning_rate"] = 0.003
    assert "trained it for 5 epochs at a learning rate of 0.003 (at most 6" in reports.model_card(metrics)
    metrics["records"]["model_transfer"]["training"]["config"]["schedule"] = "cosine"
    assert "for 5 epochs at a learning rate of 0.003 on a cosine schedule (at most 6" in reports.model_card(metrics)
    assert "Lesson 05" not in reports.model_card(metrics)
    metrics["records"]["model_fine_tuned"] = {"training": {"epochs_run": 3, "config": {"max_epochs": 3}}}
    assert "Lesson 05 fine-tuned it for 3 epochs (at most 3, its `scratch_epochs`)." in reports.model_card(metrics)
    rows = reports.headline_rows(metrics)
    assert [row["model"] for row in rows] == ["scratch_cnn", "transfer"]
    assert "Training precision" not in card  # no machine record: nothing claimed
    metrics["machine"] = {"training_precision": ["float32", "mixed_bfloat16"]}
    assert "Training precision: float32, mixed_bfloat16 (`mixed_bfloat16`: a CPU with AMX or AVX512-BF16" in \
        reports.model_card(metrics)


def test_the_reproduce_line_gives_the_parameters_the_run_was_given():
    metrics = {"dataset_spec": "../shared/data/brain_tumor_mri",
               "parameters": {"01_eda": {"dataset": "x", "seed": 0, "skip_bad_files": True},
                              "03_scratch_cnn": {"dataset": "x", "seed": 0, "skip_bad_files": True,
                                                 "image_size": 32, "filters": [8, 16], "schedule": "plateau"}}}
    assert reports.reproduce_command(metrics) == (
        "make reports DATASET=../shared/data/brain_tumor_mri SKIP_BAD_FILES=1 "
        "PARAMS='-p filters=[8,16] -p image_size=32 -p schedule=plateau -p seed=0'")
    assert reports.reproduce_command({"dataset_spec": "synthetic", "parameters": {"01_eda": {"dataset": "synthetic"}}}) \
        == "make reports DATASET=synthetic"
    # Every spelling reads back as the value it was: what `make reports PARAMS=...` hands to `medlab reports -p`.
    import shlex

    from medlab.cli import _parse_parameter

    given = {"seed": 0, "filters": [8, 16], "schedule": "plateau", "dataset_variant": "synthetic-4class",
             "learning_rate": 0.003, "augment": False, "folder": "/data/my scans"}
    command = reports.reproduce_command({"dataset_spec": "x", "parameters": {"03": given}})
    params = shlex.split(command.split("PARAMS=", 1)[1])[0]  # make passes the value to the shell unquoted
    words = shlex.split(params)
    assert dict(_parse_parameter(word) for word in words[1::2]) == given and set(words[::2]) == {"-p"}


def test_a_corrupt_image_stops_the_real_lesson_clearly_and_the_switch_lists_it(tmp_path, monkeypatch):
    """Lesson 01 on a 4-class folder with one corrupt file: a clear failure naming it, then a run without it.

    One lesson that loads the data without training (this test is about the bad file; lessons 01 and 02 side by
    side took 30 s of `make test`, and tests/test_execution.py checks that a failure beside another notebook is
    reported the same way); the next test checks that every lesson hands the switch to ``load_dataset``.
    """
    from conftest import make_tree

    from medlab.smoke import SMOKE_PARAMETERS

    monkeypatch.setenv("MEDLAB_REPORTS_DIR", str(tmp_path / "reports"))
    classes = {"glioma": 30, "meningioma": 80, "notumor": 130, "pituitary": 180}
    root = make_tree(tmp_path / "mri", {"Training": 0, "Testing": 0}, classes, per_class=8)
    (root / "Training" / "glioma" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    parameters = {k: v for k, v in SMOKE_PARAMETERS.items() if k != "dataset"}
    with pytest.raises(ReportError) as failure:
        run_reports(str(root), ["01"], parameters, progress=False)
    message = str(failure.value)
    assert "01_eda.ipynb failed" in message and "broken.jpg" in message and "skip_bad_files" in message, message
    assert not (tmp_path / "reports" / "mri").exists() and (tmp_path / "reports" / "mri.failed").exists()
    final = run_reports(str(root), ["01"], {**parameters, "skip_bad_files": True}, progress=False)
    metrics = json.loads((final / "metrics.json").read_text())
    assert [skipped["file"] for skipped in metrics["dataset"]["skipped_files"]] == ["Training/glioma/broken.jpg"]
    assert metrics["dataset"]["class_names"] == list(classes)
    assert set(metrics["notebook_wall_time_s"]) == {"01_eda"}
    assert "broken.jpg" in (final / "01_eda.html").read_text()


@pytest.mark.parametrize("notebook", sorted(config.NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb")), ids=lambda p: p.stem)
def test_every_lesson_hands_skip_bad_files_to_load_dataset(notebook):
    """The parameter is declared, and the lesson's dataset is loaded with on_error="skip" if it is set, else "raise"."""
    import ast

    cells = json.loads(notebook.read_text())["cells"]
    declared = "".join("".join(cell["source"]) for cell in cells if "parameters" in cell["metadata"].get("tags", []))
    assert "skip_bad_files: bool = False" in declared, notebook.name
    calls = [node for cell in cells if cell["cell_type"] == "code"
             for node in ast.walk(ast.parse("".join(cell["source"])))
             if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "load_dataset"
             and node.args and getattr(node.args[0], "id", None) == "dataset"]
    assert calls, f"{notebook.name} does not load the chosen dataset with load_dataset(dataset, ...)"
    for call in calls:
        on_error = {keyword.arg: ast.unparse(keyword.value) for keyword in call.keywords}.get("on_error")
        assert on_error == "'skip' if skip_bad_files else 'raise'", f"{notebook.name}: on_error={on_error}"


def test_index_html_escapes_names_from_the_run(tmp_path):
    """A run, class or figure name with markup is shown as text (the template autoescapes)."""
    run = RunFolder(tmp_path)
    run.figures_dir.mkdir(parents=True)
    (run.figures_dir / "<img src=x onerror=alert(1)>.png").write_bytes(b"")
    metrics = {"run": "<script>alert('run')</script>", "dataset_spec": "a&b", "git_commit": "abc",
               "generated_at": "now", "notebook_wall_time_s": {"03_scratch_cnn": 1.5},
               "dataset": {"synthetic": True, "class_names": ["<b>normal</b>", "tumour"],
                           "counts": {"train": {"<b>normal</b>": 3, "tumour": 4}}, "image_size": [64, 64]}}
    page = reports._index_html(run, metrics)
    assert "<script>" not in page and "&lt;script&gt;alert(&#39;run&#39;)&lt;/script&gt;" in page
    assert "<b>normal</b>" not in page and "&lt;b&gt;normal&lt;/b&gt;" in page
    assert "<img src=x" not in page and "a&amp;b" in page
    assert "SYNTHETIC DATA" in page and "<td>1.5 s</td>" in page and "64 x 64 px" in page


def test_headline_columns_follow_the_task():
    from medlab.evaluate import HEADLINE_METRICS

    result = {"test": {"accuracy": 0.9, "recall": 0.8, "f1": 0.85, "roc_auc": 0.97}, "test_ci95": {}}
    metrics = {"dataset": {"task": "multiclass"}, "records": {"evaluation": {"models": {"cnn": result}}}}
    assert reports.headline_keys(metrics)[3:] == list(HEADLINE_METRICS["multiclass"])
    (row,) = reports.headline_rows(metrics)
    assert row["f1"] == (0.85, None, None) and "specificity" not in row
    assert "specificity" in reports.headline_keys({"dataset": {"task": "binary"}})


def test_training_devices_come_from_the_models_records():
    records = {"model_a": {"training": {"devices": {"gpus": ["/device:GPU:0"], "precision": "mixed_float16",
                                                    "onednn": False}}},
               "model_b": {"training": {"devices": {"gpus": [], "precision": "float32", "onednn": True}}},
               "model_c": {"training": {"devices": {"gpus": [], "precision": "float32"}}},  # before oneDNN was recorded
               "audit": {"duplicate_groups": 3}}
    assert reports.training_devices(records) == {"gpus": ["/device:GPU:0"],
                                                 "training_precision": ["float32", "mixed_float16"],
                                                 "training_onednn": [False, True]}
    assert reports.training_devices({}) == {"gpus": [], "training_precision": [], "training_onednn": []}
