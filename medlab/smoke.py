"""Notebook checks used by ``make test`` and ``make lint``.

``python -m medlab.smoke OUT_DIR`` writes a copy of every numbered notebook
into ``OUT_DIR`` with small parameters injected by papermill (nothing is
executed here); ``pytest --nbval-lax OUT_DIR`` then runs them. The small
parameters live in :data:`SMOKE_PARAMETERS`; each notebook receives only
the ones its ``parameters`` cell declares.

``python -m medlab.smoke --check-clean`` fails if a committed notebook has
outputs or execution counts, or lacks exactly one ``parameters`` cell.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medlab import config

SMOKE_PARAMETERS = {
    "dataset": "synthetic",
    "image_size": 32,
    "max_images_per_split": 48,
    "seed": 0,
    "max_epochs": 1,
    "batch_size": 16,
    "weights": "none",  # the offline ImageNet path has its own unit test
    "backbone_size": 32,
    "fine_tune_layers": 5,
    "ensemble_members": 2,  # enough to exercise lesson 03's averaging (its default would pick 3 at 32 px)
    "bootstrap_resamples": 50,
    "gradcam_images": 8,
    "gallery_size": 4,
    "representative_images": 16,
    "latency_repeats": 3,
    "solution_epochs": 1,  # the worked solutions that train run too, so they cannot rot
    "solution_backbones": ["efficientnet_b0"],  # lesson 04's own MobileNetV2 trains the same way above
    "solution_calibration_images": 5,  # lesson 07's worked solution: int8 calibrated on five images
    "tracking": "mlflow",  # make test points MLFLOW_TRACKING_URI into build/nbval, then reads the runs back
}


# The multi-class path once more: train, evaluate and export on four classes (a subfolder, its own run).
# One CNN, without test-time views and without the worked solution: the binary run above exercises those
# (two members), and tests/test_models.py covers averaging and views on four classes.
FOUR_CLASS_NOTEBOOKS = ["03", "06", "07"]
FOUR_CLASS_PARAMETERS = {"dataset": "synthetic-4class", "test_time_views": False, "ensemble_members": 1,
                         "solution_epochs": 0, "solution_calibration_images": 0}


def prepare(out_dir: Path) -> list[Path]:
    from medlab.reports import notebooks

    out_dir = Path(out_dir)
    written = _prepare(notebooks(), out_dir, SMOKE_PARAMETERS)
    return written + _prepare(notebooks(FOUR_CLASS_NOTEBOOKS), out_dir / "four_class",
                              {**SMOKE_PARAMETERS, **FOUR_CLASS_PARAMETERS})


def _prepare(chosen: list[Path], out_dir: Path, smoke_parameters: dict) -> list[Path]:
    import papermill

    out_dir.mkdir(parents=True, exist_ok=True)
    run_dir = (out_dir / "run").resolve()
    written = []
    for notebook in chosen:
        declared = papermill.inspect_notebook(str(notebook))
        parameters = {k: v for k, v in {**smoke_parameters, "run_dir": str(run_dir)}.items() if k in declared}
        target = out_dir / notebook.name
        papermill.execute_notebook(str(notebook), str(target), parameters=parameters,
                                   prepare_only=True, progress_bar=False)
        written.append(target)
    return written


def check_clean(directory: Path = config.NOTEBOOKS_DIR) -> list[str]:
    problems = []
    for path in sorted(Path(directory).glob("*.ipynb")):
        notebook = json.loads(path.read_text())
        cells = notebook.get("cells", [])
        if any(cell.get("outputs") or cell.get("execution_count") for cell in cells):
            problems.append(f"{path.name}: has outputs or execution counts (clear them before committing)")
        tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
        if len(tagged) != 1:
            problems.append(f"{path.name}: needs exactly one cell tagged 'parameters', found {len(tagged)}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", help="where to write the parameterised notebooks")
    parser.add_argument("--check-clean", action="store_true", help="check committed notebooks instead")
    arguments = parser.parse_args(argv)
    if arguments.check_clean:
        problems = check_clean()
        print("\n".join(problems) or "notebooks are clean")
        return 1 if problems else 0
    if not arguments.out_dir:
        parser.error("give OUT_DIR or --check-clean")
    for path in prepare(Path(arguments.out_dir)):
        print(f"prepared {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
