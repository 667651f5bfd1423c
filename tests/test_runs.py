"""medlab.runs: the run-folder layout, and that nothing else spells it."""

import ast
import json
from pathlib import Path

import pytest

from medlab import config
from medlab.runs import ModelFolder, RunFolder, read_json, run_name, write_json

FILE_NAMES = ("best.keras", "history.csv", "training.json", "summary.json", "transfer.json", "metrics.json",
              "index.html", "model_card.md", "comparison.csv", "predictions_", "members/")
PACKAGE = Path(__file__).resolve().parent.parent / "medlab"


def test_layout(tmp_path):
    run = RunFolder(tmp_path)
    model = run.model("scratch_cnn")
    assert model.checkpoint == tmp_path / "models" / "scratch_cnn" / "best.keras"
    assert model.predictions("test") == tmp_path / "models" / "scratch_cnn" / "predictions_test.csv"
    assert model.member(7).training == tmp_path / "models" / "scratch_cnn" / "members" / "seed7" / "training.json"
    assert run.record("evaluation") == tmp_path / "records" / "evaluation.json"
    assert run.figure("06_roc") == tmp_path / "figures" / "06_roc.png"
    assert run.tflite("scratch_cnn", "int8") == tmp_path / "tflite" / "scratch_cnn_int8.tflite"
    assert Path(model) == model.path and Path(run) == tmp_path  # os.fspath works on both


def test_listing_and_records(tmp_path):
    run = RunFolder(tmp_path)
    assert run.models() == [] and run.records() == {}
    for name in ("b", "a"):
        run.model(name).create()
    run.model("a").member(3).create()
    (run.models_dir / "stray.txt").write_text("not a model")
    write_json(run.record("dataset"), {"name": "x"})
    assert [m.name for m in run.models()] == ["a", "b"]
    assert run.model("a").members() == [ModelFolder(run.models_dir / "a" / "members" / "seed3")]
    assert run.records() == {"dataset": {"name": "x"}}
    assert read_json(run.record("missing"), {"default": 1}) == {"default": 1}


def test_for_notebook(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDLAB_REPORTS_DIR", str(tmp_path))
    assert RunFolder.for_notebook("", "/data/brain_tumor_mri/").root == \
        config.reports_dir() / "interactive" / "brain_tumor_mri"
    assert RunFolder.for_notebook(str(tmp_path / "r"), "synthetic").root == tmp_path / "r"
    assert run_name("a b/c.npz") == "c"


def _code_strings(path: Path) -> list[str]:
    """String constants of a module's code, docstrings left out."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


@pytest.mark.parametrize("module", sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                                          if p.name != "runs.py"))
def test_no_other_module_spells_the_run_folder(module):
    strings = _code_strings(PACKAGE / module)
    spelled = sorted({name for text in strings for name in FILE_NAMES
                      if name == text or (text.startswith(name) and name.endswith("_")) or f"/{name}" in text
                      or text.endswith(name) and "." in name})
    assert spelled == [], f"medlab/{module} spells run-folder names {spelled}: ask medlab.runs instead"


@pytest.mark.parametrize("template", sorted(p.name for p in (PACKAGE / "templates").glob("*.j2")))
def test_no_template_spells_the_run_folder(template):
    text = (PACKAGE / "templates" / template).read_text()
    spelled = [name for name in FILE_NAMES if name in text]
    assert spelled == [], f"templates/{template} spells run-folder names {spelled}: pass them from medlab.runs"


@pytest.mark.parametrize("notebook", sorted(p.name for p in config.NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb")))
def test_no_notebook_spells_the_run_folder(notebook):
    cells = json.loads((config.NOTEBOOKS_DIR / notebook).read_text())["cells"]
    code = "\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "code")
    spelled = [name for name in FILE_NAMES if f'"{name}' in code or f"'{name}" in code or f'/{name}"' in code]
    assert spelled == [], f"{notebook} spells run-folder names {spelled}: use medlab.runs.RunFolder"
