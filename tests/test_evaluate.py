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


@pytest.mark.parametrize("threshold", [0.5, 0.31])
def test_resampled_binary_metrics_equal_sklearn_resample_by_resample(threshold):
    from medlab.evaluate import (
        METRIC_NAMES,
        bootstrap_binary_ci,
        bootstrap_indices,
        resampled_binary_metrics,
    )

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 120)
    probabilities = np.round(np.clip(0.35 * labels + rng.uniform(0, 0.7, 120), 0, 1), 1)  # rounded: many ties
    probabilities[:10] = threshold  # scores exactly at the threshold count as positive
    indices = bootstrap_indices(labels, n_resamples=40, seed=1)
    fast = resampled_binary_metrics(labels, probabilities, threshold, indices)
    for row, index in enumerate(indices):
        reference = binary_metrics(labels[index], probabilities[index], threshold)
        for name in METRIC_NAMES:
            assert fast[name][row] == pytest.approx(reference[name], abs=1e-12), (name, row)
    intervals = bootstrap_binary_ci(labels, probabilities, threshold, n_resamples=40, seed=1)
    slow = bootstrap_ci(labels, probabilities, lambda y, p: {k: v for k, v in binary_metrics(y, p, threshold).items()
                                                             if k in METRIC_NAMES}, n_resamples=40, seed=1)
    assert intervals.keys() == slow.keys()
    for name in intervals:
        assert intervals[name] == pytest.approx(slow[name], abs=1e-12)


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


def test_resampled_multiclass_metrics_equal_sklearn_and_tables_show_intervals():
    from sklearn import metrics as skm

    from medlab.evaluate import (
        ModelPredictions,
        bootstrap_indices,
        comparison_table,
        evaluate_model,
        resampled_multiclass_metrics,
        threshold_table,
    )

    rng = np.random.default_rng(5)
    names = ["glioma", "meningioma", "notumor", "pituitary"]
    labels = rng.integers(0, 4, 160)
    guessed = np.where(rng.uniform(size=160) < 0.7, labels, rng.integers(0, 4, 160))
    confident = rng.uniform(size=160) < 0.5  # two probability templates, so scores tie a lot
    high, low = np.where(confident, 0.7, 0.4), np.where(confident, 0.1, 0.2)
    probabilities = low[:, None] + (high - low)[:, None] * np.eye(4)[guessed]
    indices = bootstrap_indices(labels, n_resamples=25, seed=2)
    fast = resampled_multiclass_metrics(labels, probabilities, names, indices)
    for row, index in enumerate(indices):
        y, p = labels[index], probabilities[index]
        predicted = p.argmax(axis=1)
        assert fast["accuracy"][row] == pytest.approx(skm.accuracy_score(y, predicted))
        for name, score in (("recall", skm.recall_score), ("precision", skm.precision_score), ("f1", skm.f1_score)):
            assert fast[name][row] == pytest.approx(score(y, predicted, average="macro", zero_division=0))
            assert fast[f"weighted_{name}"][row] == pytest.approx(score(y, predicted, average="weighted", zero_division=0))
            per_class = score(y, predicted, average=None, labels=range(4), zero_division=0)
            assert [fast[f"{name}_{c}"][row] for c in names] == pytest.approx(per_class)
        assert fast["roc_auc"][row] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr"))
        assert fast["pr_auc"][row] == pytest.approx(skm.average_precision_score(np.eye(4)[y], p, average="macro"))
    model = ModelPredictions("cnn", names, labels, probabilities, [str(i) for i in range(160)], labels,
                             probabilities, {})
    result = evaluate_model(model, n_resamples=50)
    assert result["test"]["weighted_f1"] == pytest.approx(skm.f1_score(labels, probabilities.argmax(1), average="weighted"))
    assert 0 <= result["calibration"]["ece"] <= 1 and result["calibration"]["kind"] == "top-label confidence"
    low, high = result["test_ci95"]["recall_glioma"]
    assert low <= result["test"]["per_class_recall"]["glioma"] <= high
    comparison = comparison_table([result])
    assert comparison.loc["cnn", "threshold"] == "argmax" and "[" in comparison.loc["cnn", "weighted_f1"]
    per_class = threshold_table([result])
    assert list(per_class.loc["cnn"].index) == names and "[" in per_class.loc[("cnn", "glioma"), "f1"]


def test_multiclass_calibration_known_cases():
    from medlab.evaluate import multiclass_calibration

    labels = np.array([0, 1, 2, 3] * 25)
    perfect = multiclass_calibration(labels, np.eye(4)[labels])
    assert perfect["ece"] == pytest.approx(0) and perfect["brier"] == pytest.approx(0)
    overconfident = np.full((100, 4), 0.1 / 3)
    overconfident[np.arange(100), (labels + np.arange(100) % 2) % 4] = 0.9  # 90% sure, right half the time
    result = multiclass_calibration(labels, overconfident)
    assert result["ece"] == pytest.approx(0.4)


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
    per_class = threshold_table([result])
    assert per_class["recall"].tolist() == ["1.000 [1.000, 1.000]"] * 3 and per_class["support"].tolist() == [1, 1, 1]


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


def test_leaked_test_images_are_found_and_left_out():
    from medlab.data import Dataset, DatasetInfo, Split
    from medlab.evaluate import (
        ModelPredictions,
        deduplicate_test,
        deduplication_table,
        evaluate_model,
        leaked_test_ids,
        without_test_images,
    )

    def split(hashes, labels):
        return Split(np.zeros((len(hashes), 4, 4, 1), np.uint8), np.array(labels), [f"{h}.png" for h in hashes], hashes)

    info = DatasetInfo("toy", "folder", "x", ["normal", "disease"], (4, 4), 1, "", "")
    dataset = Dataset(info, {"train": split(["a", "b", "c"], [0, 1, 0]), "val": split(["d"], [1]),
                             "test": split(["a", "d", "e", "f", "g", "h"], [0, 1, 1, 0, 1, 0])})
    leaked = leaked_test_ids(dataset)
    assert leaked == {"a.png", "d.png"}
    labels = np.array([0, 1, 1, 0, 1, 0])
    model = ModelPredictions("m", info.class_names, np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.4, 0.6]),
                             dataset.test.ids, labels, np.array([0.1, 0.9, 0.3, 0.6, 0.8, 0.2]), {})
    kept = without_test_images(model, leaked)
    assert kept.test_ids == ["e.png", "f.png", "g.png", "h.png"]
    np.testing.assert_array_equal(kept.test_labels, [1, 0, 1, 0])
    np.testing.assert_allclose(kept.test_probabilities, [0.3, 0.6, 0.8, 0.2])
    table = deduplication_table([evaluate_model(model, n_resamples=20)], [evaluate_model(kept, n_resamples=20)])
    assert table.loc[("m", "roc_auc"), "full test"] > table.loc[("m", "roc_auc"), "deduplicated"]
    with pytest.raises(ValueError, match="leaves none"):
        without_test_images(model, set(dataset.test.ids))
    deduplicated, (same,), removed = deduplicate_test(dataset, [model])
    assert removed == leaked and deduplicated.test.ids == kept.test_ids == same.test_ids
    assert deduplicated.train is dataset.train and len(dataset.test) == 6  # the original is left as it was
    np.testing.assert_array_equal(deduplicated.test.labels, same.test_labels)
