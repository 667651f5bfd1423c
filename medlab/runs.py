"""The layout of a run folder: every file name a run writes is spelled here, once.

``make reports DATASET=synthetic`` fills ``reports/synthetic/``::

    index.html  metrics.json  model_card.md   the report (medlab.reports)
    comparison.csv                            every model's test metrics (lesson 06)
    NN_name.ipynb  NN_name.html               each executed lesson
    records/<section>.json                    what a lesson measured (medlab.reports.record)
    figures/<name>.png                        every saved figure (medlab.plots.save_figure)
    models/<model>/                           one trained model (ModelFolder below)
    tflite/<model>_<variant>.tflite           exports and their comparison.csv (lesson 07)

Every other module asks a :class:`RunFolder` or :class:`ModelFolder` for a
path instead of joining strings, in the spirit of MONAI's ``FolderLayout``:
renaming a file is a one-line change here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from medlab import config


def run_name(dataset: str) -> str:
    """The run folder's name: 'synthetic', 'pneumoniamnist', or a folder's name."""
    text = str(dataset).rstrip("/")
    name = Path(text).stem if text.endswith(".npz") else Path(text).name
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name) or "run"


def read_json(path: Path, default=None):
    """A JSON file's content, or ``default`` when the file does not exist."""
    return json.loads(path.read_text()) if path.exists() else default


def write_json(path: Path, values: dict, **options) -> Path:
    """Write ``values`` as indented JSON (creating the folder); return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values, indent=2, **options) + "\n")
    return path


@dataclass(frozen=True)
class ModelFolder:
    """One trained model: ``models/<name>/`` of a run."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    def __fspath__(self) -> str:  # so that Path(folder) and open(folder / ...) work
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def checkpoint(self) -> Path:
        """The saved Keras model (the best validation epoch)."""
        return self.path / "best.keras"

    @property
    def single_view_checkpoint(self) -> Path:
        """The model before test-time views were added (kept when they replace ``best.keras``)."""
        return self.path / "single_view.keras"

    @property
    def history(self) -> Path:
        return self.path / "history.csv"

    @property
    def training(self) -> Path:
        """Training configuration, epochs and wall time (medlab.train)."""
        return self.path / "training.json"

    @property
    def summary(self) -> Path:
        """Validation/test AUC and accuracy of the checkpoint (medlab.train.summarise_model)."""
        return self.path / "summary.json"

    @property
    def transfer(self) -> Path:
        """Backbone, pretrained or not, input size (lessons 04 and 05)."""
        return self.path / "transfer.json"

    def predictions(self, split: str) -> Path:
        """``predictions_<split>.csv``: id, label and one probability column per class."""
        return self.path / f"predictions_{split}.csv"

    def member(self, seed: int) -> ModelFolder:
        """The folder of one ensemble member, trained from ``seed``."""
        return ModelFolder(self.path / "members" / f"seed{seed}")

    def members(self) -> list[ModelFolder]:
        return [ModelFolder(p) for p in sorted((self.path / "members").glob("seed*"))]

    def create(self) -> ModelFolder:
        self.path.mkdir(parents=True, exist_ok=True)
        return self


@dataclass(frozen=True)
class RunFolder:
    """One run of the lessons on one dataset: ``reports/<run>/``."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    def __fspath__(self) -> str:
        return str(self.root)

    @classmethod
    def for_notebook(cls, run_dir: str | Path | None, dataset: str) -> RunFolder:
        """The run a notebook writes to: ``run_dir`` under ``make reports``, else ``reports/interactive/<run>``."""
        return cls(Path(run_dir) if run_dir else config.reports_dir() / "interactive" / run_name(dataset))

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    def model(self, name: str) -> ModelFolder:
        return ModelFolder(self.models_dir / name)

    def models(self) -> list[ModelFolder]:
        """Every model folder, sorted by name."""
        return [ModelFolder(p) for p in sorted(self.models_dir.glob("*")) if p.is_dir()]

    @property
    def records_dir(self) -> Path:
        return self.root / "records"

    def record(self, section: str) -> Path:
        return self.records_dir / f"{section}.json"

    def records(self) -> dict[str, dict]:
        """Every lesson's record, by section name."""
        return {path.stem: json.loads(path.read_text()) for path in sorted(self.records_dir.glob("*.json"))}

    @property
    def figures_dir(self) -> Path:
        return self.root / "figures"

    def figure(self, name: str) -> Path:
        return self.figures_dir / f"{name}.png"

    @property
    def tflite_dir(self) -> Path:
        return self.root / "tflite"

    def tflite(self, model: str, variant: str) -> Path:
        return self.tflite_dir / f"{model}_{variant}.tflite"

    @property
    def tflite_comparison(self) -> Path:
        return self.tflite_dir / "comparison.csv"

    @property
    def comparison(self) -> Path:
        """Every model's test metrics at its frozen threshold, with intervals (lesson 06)."""
        return self.root / "comparison.csv"

    @property
    def metrics(self) -> Path:
        """Every record merged with versions, timings and the dataset fingerprint."""
        return self.root / "metrics.json"

    @property
    def index_html(self) -> Path:
        return self.root / "index.html"

    @property
    def model_card(self) -> Path:
        return self.root / "model_card.md"

    def executed_notebook(self, notebook: Path) -> Path:
        return self.root / notebook.name
