import json

import numpy as np
import pandas as pd
import pytest

from medlab.evaluate import (
    ModelPredictions,
    binary_metrics,
    bootstrap_ci,
    calibration,
    comparison_table,
    evaluate_binary,
    load_model_predictions,
    multiclass_metrics,
    threshold_for_recall,
    youden_threshold,
)


def test_threshold_for_recall_is_the_highest_that_reaches_the_target():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    probabilities = np.array([0.1, 0.2, 0.3, 0.45, 0.35, 0.6, 0.7, 0.9])
    # Catching all four positives needs p >= 0.35 (the weakest positive); 0.5 would miss it.
    assert threshold_for_recall(labels, probabilities, 1.0) == pytest.approx(0.35)
    assert threshold_for_recall(labels, probabilities, 0.75) == pytest.approx(0.6)
    assert binary_metrics(labels, probabilities, 0.35)["recall"] == 1.0
    assert binary_metrics(labels, probabilities, 0.5)["recall"] == 0.75
    with pytest.raises(ValueError):
        threshold_for_recall(np.ones(4), probabilities[:4])


def test_youden_point():
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    probabilities = np.array([0.1, 0.2, 0.3, 0.7, 0.4, 0.8, 0.9])
    # p >= 0.4: sensitivity 1, specificity 3/4 (J = 0.75); p >= 0.8: 2/3 and 1 (J = 0.67).
    assert youden_threshold(labels, probabilities) == pytest.approx(0.4)


def test_binary_metrics_known_case():
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    probabilities = np.array([0.9, 0.8, 0.7, 0.2, 0.6, 0.1, 0.1, 0.1, 0.1, 0.1])
    result = binary_metrics(labels, probabilities, 0.5)
    assert (result["tp"], result["fn"], result["fp"], result["tn"]) == (3, 1, 1, 5)
    assert result["recall"] == pytest.approx(0.75) and result["specificity"] == pytest.approx(5 / 6)
    assert result["precision"] == pytest.approx(0.75) and result["accuracy"] == pytest.approx(0.8)


def test_bootstrap_ci_contains_the_truth_and_narrows_with_data():
    rng = np.random.default_rng(0)

    def sample(n):
        labels = rng.integers(0, 2, n)
        correct = rng.permutation(np.arange(n) % 5 != 0)  # right on exactly 80% of the images
        predictions = np.where(correct, labels, 1 - labels).astype(float)
        return labels, predictions

    def accuracy(y, p):
        return {"accuracy": float(((p >= 0.5) == y).mean())}

    small = bootstrap_ci(*sample(100), accuracy, n_resamples=500)["accuracy"]
    large = bootstrap_ci(*sample(2000), accuracy, n_resamples=500)["accuracy"]
    assert small[0] < 0.8 < small[1] and large[0] < 0.8 < large[1]
    assert (large[1] - large[0]) < (small[1] - small[0]) / 3
    # Binomial theory: the 95% half-width at n=2000, p=0.8 is about 1.96 * sqrt(0.16/2000) = 0.0175.
    assert (large[1] - large[0]) / 2 == pytest.approx(0.0175, abs=0.005)


def test_calibration_known_cases():
    labels = np.array([0] * 50 + [1] * 50)
    perfect = calibration(labels, labels.astype(float))
    assert perfect["ece"] == pytest.approx(0.0) and perfect["brier"] == pytest.approx(0.0)
    constant = calibration(labels, np.full(100, 0.9))
    assert constant["ece"] == pytest.approx(0.4)  # says 90%, right 50% of the time
    assert constant["brier"] == pytest.approx((50 * 0.81 + 50 * 0.01) / 100)


def test_multiclass_metrics():
    labels = np.array([0, 1, 2, 2])
    probabilities = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.5, 0.1, 0.4]])
    result = multiclass_metrics(labels, probabilities, ["a", "b", "c"])
    assert result["accuracy"] == pytest.approx(0.75)
    assert result["per_class_recall"] == {"a": 1.0, "b": 1.0, "c": 0.5}


def _model(name="m", seed=0):
    rng = np.random.default_rng(seed)
    val_labels = rng.integers(0, 2, 200)
    test_labels = rng.integers(0, 2, 200)
    noisy = lambda y: np.clip(0.3 * y + rng.uniform(0, 0.7, len(y)), 0, 1)  # noqa: E731
    return ModelPredictions(name, ["normal", "pneumonia"], val_labels, noisy(val_labels),
                            [f"test[{i}]" for i in range(200)], test_labels, noisy(test_labels), {})


def test_evaluation_freezes_the_validation_threshold_and_never_reads_test_labels():
    model = _model()
    result = evaluate_binary(model, target_recall=0.95, n_resamples=50)
    assert result["validation"]["recall"] >= 0.95
    assert result["threshold"] == pytest.approx(threshold_for_recall(model.val_labels, model.val_probabilities, 0.95))
    assert result["threshold"] != 0.5
    # Scrambling the test labels changes test metrics but not the threshold.
    scrambled = _model()
    scrambled.test_labels = 1 - scrambled.test_labels
    assert evaluate_binary(scrambled, n_resamples=10)["threshold"] == result["threshold"]
    low, high = result["test_ci95"]["recall"]
    assert low <= result["test"]["recall"] <= high
    table = comparison_table([result])
    assert table.loc["m", "recall"].count("[") == 1


def test_load_model_predictions(tmp_path):
    folder = tmp_path / "models" / "scratch_cnn"
    folder.mkdir(parents=True)
    for split in ("val", "test"):
        pd.DataFrame({"id": ["a", "b"], "label": [0, 1], "p_normal": [0.8, 0.3], "p_pneumonia": [0.2, 0.7]}).to_csv(
            folder / f"predictions_{split}.csv", index=False)
    (folder / "summary.json").write_text(json.dumps({"pretrained": False}))
    (tmp_path / "models" / "empty").mkdir()
    (loaded,) = load_model_predictions(tmp_path)
    assert loaded.name == "scratch_cnn" and loaded.binary and loaded.summary == {"pretrained": False}
    np.testing.assert_allclose(loaded.test_probabilities, [0.2, 0.7])


def test_ensemble_averages_members_and_checks_alignment():
    from medlab.evaluate import ensemble

    a, b = _model("a", seed=0), _model("b", seed=0)
    b.val_probabilities = 1 - b.val_probabilities
    b.test_probabilities = 1 - b.test_probabilities
    mean = ensemble([a, b])
    np.testing.assert_allclose(mean.val_probabilities, 0.5)
    assert mean.summary["members"] == ["a", "b"] and mean.name == "ensemble"
    other = _model("c", seed=1)
    with pytest.raises(ValueError, match="same images"):
        ensemble([a, other])


def test_evaluate_model_and_threshold_table():
    from medlab.evaluate import evaluate_model, threshold_table

    results = [evaluate_model(_model("a"), n_resamples=10), evaluate_model(_model("b", seed=1), n_resamples=10)]
    table = threshold_table(results)
    assert table.shape[0] == 6 and set(table.index.get_level_values(1)) == {"target_recall", "youden", "default_0.5"}
    multi = ModelPredictions("m", ["a", "b", "c"], np.array([0, 1, 2]), np.eye(3), ["x", "y", "z"], np.array([0, 1, 2]),
                             np.eye(3), {"pretrained": None})
    result = evaluate_model(multi)
    assert result["test"]["accuracy"] == 1.0 and "threshold" not in result
    assert threshold_table([result])["m"].to_dict() == {"a": 1.0, "b": 1.0, "c": 1.0}


def test_chosen_model_prefers_lesson_06_then_validation_auc(tmp_path):
    from medlab.evaluate import chosen_model

    for name, auc in (("scratch_cnn", 0.97), ("transfer", 0.99)):
        (tmp_path / "models" / name).mkdir(parents=True)
        (tmp_path / "models" / name / "summary.json").write_text(json.dumps({"val_auc": auc}))
    assert chosen_model(tmp_path) == ("transfer", None)  # no evaluation record: best validation AUC
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "evaluation.json").write_text(json.dumps({
        "best_model_by_val_auc": "scratch_cnn", "models": {"scratch_cnn": {"threshold": 0.3}}}))
    assert chosen_model(tmp_path) == ("scratch_cnn", 0.3)
    assert chosen_model(tmp_path, "transfer") == ("transfer", None)
    with pytest.raises(FileNotFoundError, match="03-05"):
        chosen_model(tmp_path / "empty")
