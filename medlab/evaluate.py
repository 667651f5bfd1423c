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

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from medlab.runs import RunFolder, read_json

# Every metric's name, in one place: lesson 06 computes them; the comparison table, the report's headline,
# the model card and the bench read these lists.
METRIC_NAMES = ("accuracy", "recall", "specificity", "precision", "f1", "roc_auc", "pr_auc")  # test split, with CIs
WEIGHTED_METRIC_NAMES = ("weighted_recall", "weighted_precision", "weighted_f1")  # multi-class, by class support
HEADLINE_METRICS = {  # the columns of the report's headline and the bench, per task
    "binary": ("roc_auc", "recall", "specificity", "precision", "accuracy"),  # at the validation-frozen threshold
    "multiclass": ("accuracy", "recall", "f1", "roc_auc"),  # argmax decisions; recall, F1, AUC macro-averaged
}


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
    for folder in RunFolder(run_dir).models():
        val_path, test_path = folder.predictions("val"), folder.predictions("test")
        if not (val_path.exists() and test_path.exists()):
            continue
        _ids, val_labels, val_probabilities, class_names = _read_predictions(val_path)
        test_ids, test_labels, test_probabilities, _ = _read_predictions(test_path)
        summary = read_json(folder.summary, {})
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


def leaked_test_ids(dataset) -> set[str]:
    """Ids of test images with an exact copy (same content hash) in the training or validation split.

    Such an image measures memory, not generalisation: lesson 06 reports the
    test metrics with and without them.
    """
    seen = set(dataset.train.hashes) | set(dataset.val.hashes)
    return {image_id for image_id, content in zip(dataset.test.ids, dataset.test.hashes) if content in seen}


def without_test_images(model: ModelPredictions, removed: set[str]) -> ModelPredictions:
    """``model`` with the test images whose ids are in ``removed`` left out (validation unchanged)."""
    keep = np.array([image_id not in removed for image_id in model.test_ids], dtype=bool)
    if not keep.any():
        raise ValueError(f"{model.name}: removing {len(removed)} test images leaves none")
    return replace(model, test_ids=[i for i, k in zip(model.test_ids, keep) if k],
                   test_labels=model.test_labels[keep], test_probabilities=model.test_probabilities[keep])


def deduplicate_test(dataset, models: list[ModelPredictions]) -> tuple:
    """The dataset and each model's predictions without the test images that have an exact copy in train or val.

    Returns ``(dataset, models, removed_ids)``; with no such image, the
    arguments come back unchanged and ``removed_ids`` is empty.
    """
    from medlab.data import Dataset

    removed = leaked_test_ids(dataset)
    if not removed:
        return dataset, models, removed
    kept = np.array([index for index, image_id in enumerate(dataset.test.ids) if image_id not in removed])
    deduplicated = Dataset(dataset.info, {**dataset.splits, "test": dataset.test.take(kept)})
    return deduplicated, [without_test_images(model, removed) for model in models], removed


def chosen_model(run_dir: str | Path, model_name: str | None = None) -> tuple[str, float | None]:
    """The model to use from a run, and its threshold frozen on validation.

    ``model_name`` if given; otherwise the single model lesson 06 chose by
    validation AUC; without lesson 06's record, the best ``val_auc`` among
    the model summaries (and no threshold).
    """
    run = RunFolder(run_dir)
    evaluation = read_json(run.record("evaluation"), {})
    name = model_name or evaluation.get("best_model_by_val_auc")
    if name is None:
        summaries = {folder.name: read_json(folder.summary).get("val_auc", 0.0)
                     for folder in run.models() if folder.summary.exists()}
        if not summaries:
            raise FileNotFoundError(f"no trained model with a summary in {run.models_dir}: run notebooks 03-05")
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
    """Accuracy; macro and weighted recall/precision/F1; one-vs-rest ROC-AUC and PR-AUC; per-class numbers.

    There is no single decision threshold: each image goes to its most
    probable class (argmax).
    """
    labels = np.asarray(labels).astype(int)
    predicted = probabilities.argmax(axis=1)
    one_hot = np.eye(len(class_names))[labels]
    every = range(len(class_names))
    result = {"accuracy": skm.accuracy_score(labels, predicted)}
    for name, score in (("recall", skm.recall_score), ("precision", skm.precision_score), ("f1", skm.f1_score)):
        result[name] = score(labels, predicted, labels=every, average="macro", zero_division=0)
        result[f"weighted_{name}"] = score(labels, predicted, labels=every, average="weighted", zero_division=0)
        per_class = score(labels, predicted, labels=every, average=None, zero_division=0)
        result[f"per_class_{name}"] = {c: float(v) for c, v in zip(class_names, per_class)}
    result["roc_auc"] = skm.roc_auc_score(labels, probabilities, multi_class="ovr", average="macro")
    result["pr_auc"] = skm.average_precision_score(one_hot, probabilities, average="macro")
    result["support"] = {c: int(v) for c, v in zip(class_names, np.bincount(labels, minlength=len(class_names)))}
    return result


def bootstrap_indices(labels: np.ndarray, n_resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """(n_resamples, N) indices of test images drawn with replacement, stratified by class.

    Every resample keeps the test set's class balance, so each has every class.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    groups = [np.nonzero(labels == value)[0] for value in np.unique(labels)]
    return np.stack([np.concatenate([rng.choice(group, size=len(group), replace=True) for group in groups])
                     for _ in range(n_resamples)])


def _percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0 * 100.0
    return float(np.nanpercentile(values, tail)), float(np.nanpercentile(values, 100.0 - tail))


def bootstrap_ci(labels: np.ndarray, probabilities: np.ndarray, statistic, n_resamples: int = 1000,
                 confidence: float = 0.95, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals for every number ``statistic(labels, probabilities)`` returns.

    Test images are resampled by :func:`bootstrap_indices`. This calls
    ``statistic`` once per resample; :func:`bootstrap_binary_ci` computes the
    binary metrics of every resample at once.
    """
    labels = np.asarray(labels)
    samples: dict[str, list[float]] = {}
    for index in bootstrap_indices(labels, n_resamples, seed):
        for key, value in statistic(labels[index], probabilities[index]).items():
            if isinstance(value, (int, float, np.floating)) and not isinstance(value, bool):
                samples.setdefault(key, []).append(float(value))
    return {key: _percentile_interval(np.array(values), confidence) for key, values in samples.items()}


def _ratio(numerator, denominator, empty):
    """``numerator / denominator`` where the denominator is positive, ``empty`` elsewhere."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / np.maximum(denominator, 1), empty)


def _resampled_roc_auc(positive: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC-AUC of each row: the Mann-Whitney statistic, tied scores counting one half."""
    from scipy.stats import rankdata

    positives, negatives = positive.sum(axis=1), (~positive).sum(axis=1)
    ranks = rankdata(scores, axis=1)
    return _ratio(np.sum(ranks * positive, axis=1) - positives * (positives + 1) / 2, positives * negatives, np.nan)


def _resampled_average_precision(positive: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Average precision of each row: precision at each distinct score times the recall it adds."""
    order = np.argsort(-scores, axis=1, kind="stable")
    sorted_scores = np.take_along_axis(scores, order, axis=1)
    sorted_positive = np.take_along_axis(positive, order, axis=1).astype(float)
    cumulative_tp = np.cumsum(sorted_positive, axis=1)
    columns = np.arange(scores.shape[1])
    group_end = np.ones_like(sorted_scores, dtype=bool)  # the last position of each run of tied scores
    group_end[:, :-1] = sorted_scores[:, :-1] != sorted_scores[:, 1:]
    end_of_group = np.minimum.accumulate(np.where(group_end, columns, scores.shape[1])[:, ::-1], axis=1)[:, ::-1]
    precision_at_end = np.take_along_axis(cumulative_tp, end_of_group, axis=1) / (end_of_group + 1)
    return _ratio(np.sum(sorted_positive * precision_at_end, axis=1), positive.sum(axis=1), np.nan)


def resampled_binary_metrics(labels: np.ndarray, probabilities: np.ndarray, threshold: float,
                             indices: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`binary_metrics` (the :data:`METRIC_NAMES`) of every resample in ``indices`` at once.

    The same definitions as scikit-learn's, vectorised over resamples (1,000
    resamples of four models took 53 s one by one): counts at the
    threshold; ROC-AUC as the Mann-Whitney statistic with tied scores
    counting one half; average precision as the sum over distinct scores of
    precision times the gain in recall. ``tests/test_evaluate.py`` checks
    every value against ``sklearn.metrics`` resample by resample.
    """
    y = np.asarray(labels).astype(int)[indices]
    p = np.asarray(probabilities, dtype=float)[indices]
    predicted = p >= threshold
    tp = np.sum(predicted & (y == 1), axis=1)
    fp = np.sum(predicted & (y == 0), axis=1)
    fn = np.sum(~predicted & (y == 1), axis=1)
    tn = np.sum(~predicted & (y == 0), axis=1)
    return {
        "accuracy": (tp + tn) / p.shape[1],
        "recall": _ratio(tp, tp + fn, 0.0),
        "specificity": _ratio(tn, tn + fp, np.nan),
        "precision": _ratio(tp, tp + fp, 0.0),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn, 0.0),
        "roc_auc": _resampled_roc_auc(y == 1, p),
        "pr_auc": _resampled_average_precision(y == 1, p),
    }


def resampled_multiclass_metrics(labels: np.ndarray, probabilities: np.ndarray, class_names: list[str],
                                 indices: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`multiclass_metrics`' numbers for every resample in ``indices`` at once.

    Accuracy; recall, precision and F1 per class, their macro (unweighted)
    and weighted (by support) means; macro one-vs-rest ROC-AUC and average
    precision. Checked against ``sklearn.metrics`` in the tests.
    """
    y = np.asarray(labels).astype(int)[indices]
    p = np.asarray(probabilities, dtype=float)[indices]
    predicted = p.argmax(axis=2)
    out: dict[str, np.ndarray] = {"accuracy": np.mean(predicted == y, axis=1)}
    per_class = {name: [] for name in ("recall", "precision", "f1")}
    supports, aucs, aps = [], [], []
    for index, class_name in enumerate(class_names):
        actual, chosen = y == index, predicted == index
        tp = np.sum(actual & chosen, axis=1)
        fp, fn = np.sum(~actual & chosen, axis=1), np.sum(actual & ~chosen, axis=1)
        values = {"recall": _ratio(tp, tp + fn, 0.0), "precision": _ratio(tp, tp + fp, 0.0),
                  "f1": _ratio(2 * tp, 2 * tp + fp + fn, 0.0)}
        for name, value in values.items():
            per_class[name].append(value)
            out[f"{name}_{class_name}"] = value
        supports.append(tp + fn)
        aucs.append(_resampled_roc_auc(actual, p[..., index]))
        aps.append(_resampled_average_precision(actual, p[..., index]))
    weights = np.stack(supports) / y.shape[1]
    for name, values in per_class.items():
        out[name] = np.mean(values, axis=0)
        out[f"weighted_{name}"] = np.sum(np.stack(values) * weights, axis=0)
    out["roc_auc"] = np.mean(aucs, axis=0)
    out["pr_auc"] = np.mean(aps, axis=0)
    return out


def bootstrap_binary_ci(labels: np.ndarray, probabilities: np.ndarray, threshold: float, n_resamples: int = 1000,
                        confidence: float = 0.95, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of the binary :data:`METRIC_NAMES` at a frozen ``threshold``."""
    indices = bootstrap_indices(labels, n_resamples, seed)
    return {key: _percentile_interval(values, confidence)
            for key, values in resampled_binary_metrics(labels, probabilities, threshold, indices).items()}


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


def multiclass_calibration(labels: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> dict:
    """Top-label calibration of a multi-class model, and its multi-class Brier score.

    ECE here compares the confidence of the predicted class (the largest
    probability) with how often that prediction is right, over ``bins``
    equal-width bins (Guo et al., 2017); the curve is sklearn's
    ``calibration_curve`` of correctness against confidence. The Brier score
    is the mean squared distance between the probability vector and the
    one-hot label (0 is perfect, 2 the worst).
    """
    labels = np.asarray(labels).astype(int)
    probabilities = np.asarray(probabilities, dtype=float)
    correct = (probabilities.argmax(axis=1) == labels).astype(int)
    top_label = calibration(correct, probabilities.max(axis=1), bins)
    one_hot = np.eye(probabilities.shape[1])[labels]
    return {**top_label, "brier": float(np.mean(np.sum((probabilities - one_hot) ** 2, axis=1))),
            "kind": "top-label confidence"}


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
        "test_ci95": bootstrap_binary_ci(model.test_labels, model.test_probabilities, frozen,
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
        indices = bootstrap_indices(model.test_labels, n_resamples, seed)
        resampled = resampled_multiclass_metrics(model.test_labels, model.test_probabilities, model.class_names,
                                                 indices)
        result = {"model": model.name,
                  "decision": "argmax: each image goes to its most probable class (no single threshold applies)",
                  "test": multiclass_metrics(model.test_labels, model.test_probabilities, model.class_names),
                  "validation": multiclass_metrics(model.val_labels, model.val_probabilities, model.class_names),
                  "test_ci95": {key: _percentile_interval(values, 0.95) for key, values in resampled.items()},
                  "calibration": multiclass_calibration(model.test_labels, model.test_probabilities)}
    result["pretrained"] = model.summary.get("pretrained")
    return result


def threshold_table(results: list[dict]) -> pd.DataFrame:
    """Binary: test metrics at every candidate threshold; multi-class: per-class recall, precision, F1 (95% CI)."""
    if all("test_at" in result for result in results):
        rows = {(result["model"], name): {k: round(v, 3) for k, v in metrics.items() if k in METRIC_NAMES}
                for result in results for name, metrics in result["test_at"].items()}
        table = pd.DataFrame(rows).T
        table.index.names = ["model", "threshold chosen by"]
        return table
    rows = {}
    for result in results:
        test, intervals = result["test"], result.get("test_ci95", {})
        for class_name, support in test["support"].items():
            row = {}
            for name in ("recall", "precision", "f1"):
                value = test[f"per_class_{name}"][class_name]
                low, high = intervals.get(f"{name}_{class_name}", (np.nan, np.nan))
                row[name] = f"{value:.3f} [{low:.3f}, {high:.3f}]" if not np.isnan(low) else f"{value:.3f}"
            rows[(result["model"], class_name)] = {**row, "support": support}
    table = pd.DataFrame(rows).T
    table.index.names = ["model", "class"]
    return table


def comparison_table(results: list[dict]) -> pd.DataFrame:
    """One row per model: test metrics at the frozen threshold as 'value [low, high]' strings.

    Multi-class models decide by argmax; their recall, precision and F1 are
    macro means (``weighted_*``: weighted by class support).
    """
    rows = []
    for result in results:
        row = {"model": result["model"],
               "threshold": round(result["threshold"], 4) if "threshold" in result else "argmax"}
        for name in METRIC_NAMES + WEIGHTED_METRIC_NAMES:
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


def deduplication_table(full: list[dict], deduplicated: list[dict]) -> pd.DataFrame:
    """Per model: ROC-AUC, accuracy, recall and F1 on the full test split and without the leaked copies."""
    rows = {}
    for before, after in zip(full, deduplicated):
        for name in ("roc_auc", "accuracy", "recall", "f1"):
            if name in before["test"] and name in after["test"]:
                rows[(before["model"], name)] = {
                    "full test": round(before["test"][name], 4), "deduplicated": round(after["test"][name], 4),
                    "change": round(after["test"][name] - before["test"][name], 4)}
    table = pd.DataFrame(rows).T
    table.index.names = ["model", "metric"]
    return table
