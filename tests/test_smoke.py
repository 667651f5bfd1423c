import json

import papermill

from medlab import config
from medlab.smoke import SMOKE_PARAMETERS, check_clean, prepare


def test_committed_notebooks_are_clean_and_parameterised():
    assert check_clean() == []


def test_every_parameter_line_is_understood_by_papermill():
    for notebook in sorted(config.NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb")):
        cells = json.loads(notebook.read_text())["cells"]
        (cell,) = [c for c in cells if "parameters" in c["metadata"].get("tags", [])]
        lines = [line for line in "".join(cell["source"]).splitlines() if line.strip() and not line.startswith("#")]
        declared = papermill.inspect_notebook(str(notebook))
        assert len(declared) == len(lines), f"{notebook.name}: papermill could not parse every parameter"
        for name, details in declared.items():
            assert details["inferred_type_name"] != "None", f"{notebook.name}: {name} has no type"
            assert details["help"], f"{notebook.name}: {name} has no comment"


def test_prepare_injects_small_parameters(tmp_path):
    written = prepare(tmp_path)
    assert written and all(path.exists() for path in written)
    text = written[0].read_text()
    assert f"image_size = {SMOKE_PARAMETERS['image_size']}" in text
    assert "injected-parameters" in text
    four_class = [path for path in written if path.parent.name == "four_class"]
    assert [path.name[:2] for path in four_class] == ["03", "06", "07"]
    assert '"dataset": "synthetic-4class"' in four_class[0].read_text()
    assert str(tmp_path.resolve() / "four_class" / "run") in four_class[0].read_text()


def test_check_clean_catches_outputs(tmp_path):
    notebook = {"cells": [{"cell_type": "code", "execution_count": 3, "metadata": {}, "outputs": [], "source": ""}],
                "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (tmp_path / "x.ipynb").write_text(json.dumps(notebook))
    problems = check_clean(tmp_path)
    assert any("outputs or execution counts" in p for p in problems)
    assert any("parameters" in p for p in problems)
