"""Evaluation: thresholds chosen on validation, test metrics with confidence intervals, calibration.

The rule this module enforces: **the decision threshold is chosen on
validation data and then frozen**; test labels are only ever used to measure
a model whose every choice is already made. Curves, confusion matrices and
calibration come from ``sklearn.metrics``.

Clinical framing: a missed disease (false negative) is the costliest error,
so the default operating point is the highest threshold that still catches
``target_recall`` (95%) of diseased validation images; the Youden point
(maximum sensitivity + specificity - 1) is reported beside it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

METRIC_NAMES = ("accuracy", "recall", "specificity", "precision", "f1", "roc_auc", "pr_auc")


@dataclass
class ModelPredictions:
    """One trained model's saved predictions (see :func:`medlab.train.save_predictions`)."""

    name: str
    class_names: list[str]
    val_labels: np.ndarray
    val_probabilities: np.ndarray  # (N,) positive-class probability for binary, (N, C) otherwise
    test_ids: list[str]
    test_labels: np.ndarray
    test_probabilities: np.ndarray
    summary: dict

    @property
    def binary(self) -> bool:
        return self.val_probabilities.ndim == 1


def _read_predictions(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    table = pd.read_csv(path)
    columns = [c for c in table.columns if c.startswith("p_")]
    if not columns:
        raise ValueError(f"{path}: no probability columns (p_<class>)")
    probabilities = table[columns].to_numpy()
    class_names = [c[2:] for c in columns]
    if len(columns) == 2:
        probabilities = probabilities[:, 1]
    return table["id"].astype(str).tolist(), table["label"].to_numpy(), probabilities, class_names


def load_model_predictions(run_dir: str | Path) -> list[ModelPredictions]:
    """Every model folder under ``<run_dir>/models`` that has validation and test predictions."""
    found = []
    for folder in sorted(Path(run_dir).glob("models/*")):
        val_path, test_path = folder / "predictions_val.csv", folder / "predictions_test.csv"
        if not (val_path.exists() and test_path.exists()):
            continue
        _ids, val_labels, val_probabilities, class_names = _read_predictions(val_path)
        test_ids, test_labels, test_probabilities, _ = _read_predictions(test_path)
        summary_path = folder / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        found.append(ModelPredictions(folder.name, class_names, val_labels, val_probabilities, test_ids,
                                      test_labels, test_probabilities, summary))
    return found


def ensemble(models: list[ModelPredictions], name: str = "ensemble") -> ModelPredictions:
    """The mean of several models' probabilities: often better than any one of them.

    The members must have predicted the same images in the same order (one run's models do).
    """
    if len(models) < 2:
        raise ValueError("an ensemble needs at least two models")
    first = models[0]
    for model in models[1:]:
        if model.test_ids != first.test_ids or not np.array_equal(model.val_labels, first.val_labels):
            raise ValueError(f"{model.name} did not predict the same images as {first.name}")
    val = np.mean([m.val_probabilities for m in models], axis=0)
    test = np.mean([m.test_probabilities for m in models], axis=0)
    from medlab.train import evaluate_auc

    summary = {"kind": "ensemble", "members": [m.name for m in models],
               "pretrained": None if all(m.summary.get("pretrained") is None for m in models) else
               all(m.summary.get("pretrained") is not False for m in models),
               "val_auc": round(evaluate_auc(first.val_labels, val), 4)}
    return ModelPredictions(name, first.class_names, first.val_labels, val, first.test_ids, first.test_labels, test,
                            summary)


def chosen_model(run_dir: str | Path, model_name: str | None = None) -> tuple[str, float | None]:
    """The model to use from a run, and its threshold frozen on validation.

    ``model_name`` if given; otherwise the single model lesson 06 chose by
    validation AUC; without lesson 06's record, the best ``val_auc`` among
    the model summaries (and no threshold).
    """
    run_dir = Path(run_dir)
    record_path = run_dir / "records" / "evaluation.json"
    evaluation = json.loads(record_path.read_text()) if record_path.exists() else {}
    name = model_name or evaluation.get("best_model_by_val_auc")
    if name is None:
        summaries = {p.parent.name: json.loads(p.read_text()).get("val_auc", 0.0)
                     for p in run_dir.glob("models/*/summary.json")}
        if not summaries:
            raise FileNotFoundError(f"no trained model with a summary in {run_dir}/models: run notebooks 03-05")
        name = max(summaries, key=summaries.get)
    return name, evaluation.get("models", {}).get(name, {}).get("threshold")


# --------------------------------------------------------------------------
# Thresholds (validation only)
# --------------------------------------------------------------------------


def threshold_for_recall(labels: np.ndarray, probabilities: np.ndarray, target_recall: float = 0.95) -> float:
    """The highest threshold whose recall on these (validation) data is at least ``target_recall``.

    Highest, because among all thresholds that catch enough disease it gives
    the fewest false alarms. Predictions are positive when ``p >= threshold``.
    """
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    labels = np.asarray(labels)
    if labels.min() == labels.max():
        raise ValueError("threshold selection needs both classes in the validation labels")
    _fpr, tpr, thresholds = skm.roc_curve(labels, probabilities, drop_intermediate=False)
    reaching = np.nonzero(tpr >= target_recall)[0]
    threshold = thresholds[reaching[0]]
    return float(min(threshold, 1.0))


def youden_threshold(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """The threshold maximising sensitivity + specificity - 1 on these (validation) data."""
    fpr, tpr, thresholds = skm.roc_curve(labels, probabilities, drop_intermediate=False)
    return float(min(thresholds[int(np.argmax(tpr - fpr))], 1.0))


# --------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------


def binary_metrics(labels: np.ndarray, probabilities: np.ndarray, threshold: float) -> dict[str, float]:
    """Accuracy, recall (sensitivity), specificity, precision, F1, ROC-AUC and PR-AUC at ``threshold``."""
    labels = np.asarray(labels).astype(int)
    predicted = (np.asarray(probabilities) >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(labels, predicted, labels=[0, 1]).ravel()
    both_classes = labels.min() != labels.max()
    return {
        "accuracy": skm.accuracy_score(labels, predicted),
        "recall": skm.recall_score(labels, predicted, zero_division=0),
        "specificity": tn / (tn + fp) if tn + fp else float("nan"),
        "precision": skm.precision_score(labels, predicted, zero_division=0),
        "f1": skm.f1_score(labels, predicted, zero_division=0),
        "roc_auc": skm.roc_auc_score(labels, probabilities) if both_classes else float("nan"),
        "pr_auc": skm.average_precision_score(labels, probabilities) if both_classes else float("nan"),
        "tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn),
    }


def multiclass_metrics(labels: np.ndarray, probabilities: np.ndarray, class_names: list[str]) -> dict:
    """Accuracy, macro recall/precision/F1, one-vs-rest ROC-AUC and PR-AUC, per-class recall."""
    labels = np.asarray(labels).astype(int)
    predicted = probabilities.argmax(axis=1)
    one_hot = np.eye(len(class_names))[labels]
    per_class = skm.recall_score(labels, predicted, labels=range(len(class_names)), average=None, zero_division=0)
    return {
        "accuracy": skm.accuracy_score(labels, predicted),
        "recall": skm.recall_score(labels, predicted, average="macro", zero_division=0),
        "precision": skm.precision_score(labels, predicted, average="macro", zero_division=0),
        "f1": skm.f1_score(labels, predicted, average="macro", zero_division=0),
        "roc_auc": skm.roc_auc_score(labels, probabilities, multi_class="ovr", average="macro"),
        "pr_auc": skm.average_precision_score(one_hot, probabilities, average="macro"),
        "per_class_recall": {name: float(value) for name, value in zip(class_names, per_class)},
    }


def bootstrap_ci(labels: np.ndarray, probabilities: np.ndarray, statistic, n_resamples: int = 1000,
                 confidence: float = 0.95, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals for every number ``statistic(labels, probabilities)`` returns.

    Test images are resampled with replacement, stratified by class so every
    resample has both classes (the class balance of the test set is kept).
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    groups = [np.nonzero(labels == value)[0] for value in np.unique(labels)]
    samples: dict[str, list[float]] = {}
    for _ in range(n_resamples):
        index = np.concatenate([rng.choice(group, size=len(group), replace=True) for group in groups])
        for key, value in statistic(labels[index], probabilities[index]).items():
            if isinstance(value, (int, float, np.floating)) and not isinstance(value, bool):
                samples.setdefault(key, []).append(float(value))
    tail = (1.0 - confidence) / 2.0 * 100.0
    return {key: (float(np.nanpercentile(values, tail)), float(np.nanpercentile(values, 100.0 - tail)))
            for key, values in samples.items()}


def calibration(labels: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> dict:
    """Reliability curve (sklearn), expected calibration error and Brier score for a binary model.

    ECE: the bin-size-weighted mean gap between predicted probability and
    observed frequency of disease, over ``bins`` equal-width bins.
    """
    labels = np.asarray(labels).astype(int)
    probabilities = np.asarray(probabilities, dtype=float)
    observed, predicted = calibration_curve(labels, probabilities, n_bins=bins, strategy="uniform")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(probabilities, edges[1:-1], right=True), 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    occupied = counts[counts > 0]
    ece = float(np.sum(occupied / len(labels) * np.abs(observed - predicted)))
    return {
        "ece": ece,
        "brier": float(skm.brier_score_loss(labels, probabilities)),
        "curve_predicted": predicted.tolist(),
        "curve_observed": observed.tolist(),
    }


def evaluate_binary(model: ModelPredictions, target_recall: float = 0.95, n_resamples: int = 1000,
                    seed: int = 0) -> dict:
    """Thresholds from validation, then frozen: test metrics with 95% CIs and calibration."""
    thresholds = {
        "target_recall": threshold_for_recall(model.val_labels, model.val_probabilities, target_recall),
        "youden": youden_threshold(model.val_labels, model.val_probabilities),
        "default_0.5": 0.5,
    }
    frozen = thresholds["target_recall"]
    result = {
        "model": model.name,
        "threshold": frozen,
        "thresholds": thresholds,
        "target_recall": target_recall,
        "validation": binary_metrics(model.val_labels, model.val_probabilities, frozen),
        "test": binary_metrics(model.test_labels, model.test_probabilities, frozen),
        "test_at": {name: binary_metrics(model.test_labels, model.test_probabilities, value)
                    for name, value in thresholds.items()},
        "test_ci95": bootstrap_ci(
            model.test_labels, model.test_probabilities,
            lambda y, p: {k: v for k, v in binary_metrics(y, p, frozen).items() if k in METRIC_NAMES},
            n_resamples=n_resamples, seed=seed),
        "calibration": calibration(model.test_labels, model.test_probabilities),
    }
    return result


def evaluate_model(model: ModelPredictions, target_recall: float = 0.95, n_resamples: int = 1000,
                   seed: int = 0) -> dict:
    """:func:`evaluate_binary` for two classes; macro metrics and per-class recall for more."""
    if model.binary:
        result = evaluate_binary(model, target_recall, n_resamples, seed)
    else:
        result = {"model": model.name,
                  "test": multiclass_metrics(model.test_labels, model.test_probabilities, model.class_names),
                  "validation": multiclass_metrics(model.val_labels, model.val_probabilities, model.class_names)}
    result["pretrained"] = model.summary.get("pretrained")
    return result


def threshold_table(results: list[dict]) -> pd.DataFrame:
    """Binary: test metrics at every candidate threshold; multi-class: per-class recall per model."""
    if all("test_at" in result for result in results):
        rows = {(result["model"], name): {k: round(v, 3) for k, v in metrics.items() if k in METRIC_NAMES}
                for result in results for name, metrics in result["test_at"].items()}
        table = pd.DataFrame(rows).T
        table.index.names = ["model", "threshold chosen by"]
        return table
    return pd.DataFrame({result["model"]: result["test"]["per_class_recall"] for result in results})


def comparison_table(results: list[dict]) -> pd.DataFrame:
    """One row per model: test metrics at the frozen threshold as 'value [low, high]' strings."""
    rows = []
    for result in results:
        row = {"model": result["model"], "threshold": round(result.get("threshold", float("nan")), 4)}
        for name in METRIC_NAMES:
            if name not in result["test"]:
                continue
            value = result["test"][name]
            low, high = result.get("test_ci95", {}).get(name, (np.nan, np.nan))
            row[name] = f"{value:.3f} [{low:.3f}, {high:.3f}]" if not np.isnan(low) else f"{value:.3f}"
        if "calibration" in result:
            row["ece"] = round(result["calibration"]["ece"], 4)
            row["brier"] = round(result["calibration"]["brier"], 4)
        rows.append(row)
    return pd.DataFrame(rows).set_index("model")
