import os

import pytest

from medlab.bench import data_benchmark


def test_data_benchmark_measures_every_stage():
    before = os.environ["MEDLAB_DATA_DIR"]
    results = data_benchmark(count=60, source_size=32, image_size=16, batch_size=16)
    assert os.environ["MEDLAB_DATA_DIR"] == before  # the benchmark's cold cache does not leak out
    assert results["images"] == 60
    for key in ("synthetic_generator_images_per_s", "tutorial_loop_images_per_s", "medlab_first_pass_images_per_s",
                "medlab_cached_epoch_images_per_s"):
        assert results[key] > 0, key
    loop = results["tutorial_loop_images_per_s"]
    assert results["cached_epoch_vs_loop"] == pytest.approx(results["medlab_cached_epoch_images_per_s"] / loop, abs=0.01)
    assert results["first_pass_vs_loop"] == pytest.approx(results["medlab_first_pass_images_per_s"] / loop, abs=0.01)


def test_summary_and_table_from_runs():
    from medlab.bench import markdown_table, summarise_runs

    def run(seed, auc, accuracy):
        model = {"test": {"roc_auc": auc, "recall": 0.96, "specificity": 0.85},
                 "test_at": {"default_0.5": {"accuracy": accuracy}}}
        return {"seed": seed, "wall_time_s": 400.0 + seed, "metrics": {"records": {
            "evaluation": {"models": {"scratch_cnn": model}},
            "model_scratch_cnn": {"training": {"train_seconds": 80.0}},
            "tflite": {"variants": {"int8": {"size_vs_float32": 0.28, "roc_auc": auc - 0.001, "decision_agreement": 0.99},
                                    "keras": {"roc_auc": auc}}},
        }}}

    summary = summarise_runs([run(0, 0.97, 0.91), run(1, 0.98, 0.93)])
    assert summary["scratch_cnn"]["test_auc"]["mean"] == pytest.approx(0.975)
    assert summary["scratch_cnn"]["accuracy_at_0.5"]["std"] == pytest.approx(0.01414, abs=1e-4)
    assert summary["_tflite_int8"]["auc_minus_keras"] == pytest.approx(-0.001)
    table = markdown_table({"dataset": "x.npz", "seeds": 2, "summary": summary, "data_pipeline": {
        "cpu_count": 2, "images": 10, "source_size": 32, "image_size": 16, "first_pass_vs_loop": 0.5,
        "cached_epoch_vs_loop": 30.0}})
    assert "| scratch_cnn | 0.975 ± 0.007 | 0.920 ± 0.014 |" in table
    assert "0.50x" in table and "28% of float32" in table


def test_multiclass_summary_and_table():
    from medlab.bench import markdown_table, summarise_runs

    def run(seed, accuracy):
        model = {"threshold": None, "test": {"accuracy": accuracy, "recall": accuracy - 0.01, "f1": accuracy - 0.02,
                                             "roc_auc": 0.99}}
        return {"seed": seed, "wall_time_s": 1500.0, "metrics": {"dataset": {"task": "multiclass"}, "records": {
            "evaluation": {"models": {"scratch_cnn": model}, "test_deduplication": {
                "test_images": 1311, "with_copy_in_train_or_val": 217, "headline": "deduplicated",
                "full_test": {"scratch_cnn": {"accuracy": accuracy - 0.005}}}},
            "model_scratch_cnn": {"training": {"train_seconds": 600.0}}}}}

    summary = summarise_runs([run(0, 0.95), run(1, 0.97)])
    assert summary["scratch_cnn"]["accuracy"]["mean"] == pytest.approx(0.96)
    assert summary["scratch_cnn"]["macro_f1"]["mean"] == pytest.approx(0.94)
    assert summary["scratch_cnn"]["full_test_accuracy"]["mean"] == pytest.approx(0.955)
    assert "test_auc" not in summary["scratch_cnn"]
    table = markdown_table({"dataset": "/data/brain_tumor_mri", "seeds": 2, "summary": summary, "gpus": [],
                            "data_pipeline": {
        "cpu_count": 2, "images": 10, "source_size": 32, "image_size": 16, "first_pass_vs_loop": 0.5,
        "cached_epoch_vs_loop": 30.0}})
    assert "2 CPU core(s), no GPU used." in table
    assert "217 of 1311 test images with an exact copy in train or val left out" in table
    assert "| scratch_cnn | 0.960 ± 0.014 | 0.950 ± 0.014 | 0.940 ± 0.014 | 0.990 ± 0.000 | 0.955 ± 0.014 | 600 ± 0 |" \
        in table
    assert "Published on this dataset" in table and "IJERTV13IS030038" in table
    assert "ROC-AUC | accuracy at 0.5" not in table  # no binary table for a multi-class run


def test_runs_from_several_machines_merge_into_one_table(tmp_path):
    """`medlab bench full --seed N` on each machine, then `medlab bench merge --runs ...` on one."""
    import json

    from medlab.bench import merge_benchmark
    from medlab.cli import main

    for seed, auc in ((1, 0.98), (0, 0.96)):
        folder = tmp_path / f"bench-x-seed{seed}"
        folder.mkdir()
        model = {"test": {"roc_auc": auc, "recall": 0.9, "specificity": 0.8},
                 "test_at": {"default_0.5": {"accuracy": 0.9}}}
        (folder / "metrics.json").write_text(json.dumps({
            "dataset_spec": "pneumoniamnist", "total_wall_time_s": 300.0 + seed, "machine": {"cpu_count": 2},
            "parameters": {"03_scratch_cnn": {"seed": seed}, "06_evaluation": {"seed": seed}},
            "records": {"evaluation": {"models": {"scratch_cnn": model}}}}))
    result = merge_benchmark(sorted(tmp_path.glob("bench-x-seed*"), reverse=True))
    assert [run["seed"] for run in result["runs"]] == [0, 1] and result["seeds"] == 2
    assert result["summary"]["scratch_cnn"]["test_auc"]["mean"] == pytest.approx(0.97)
    assert result["summary"]["_report_wall_time_s"]["values"] == [300.0, 301.0]
    assert main(["bench", "merge", "--runs", *map(str, tmp_path.glob("bench-x-seed*"))]) == 0
    other = tmp_path / "bench-y-seed0"
    other.mkdir()
    (other / "metrics.json").write_text(json.dumps({"dataset_spec": "synthetic", "total_wall_time_s": 1.0,
                                                    "parameters": {}, "records": {}}))
    with pytest.raises(ValueError, match="different datasets"):
        merge_benchmark([tmp_path / "bench-x-seed0", other])
    with pytest.raises(FileNotFoundError, match="not a finished report run"):
        merge_benchmark([tmp_path])


def test_two_commits_benches_compare_with_the_standard_error_of_the_difference(tmp_path):
    """`medlab bench compare --runs NEW... --against OLD...`: means, difference and its standard error per measure."""
    import json

    from medlab.bench import compare_benchmarks, comparison_table, merge_benchmark
    from medlab.cli import main

    def runs(side, commit, aucs, wall):
        folders = []
        for seed, auc in enumerate(aucs):
            folder = tmp_path / side / f"bench-x-seed{seed}"
            folder.mkdir(parents=True)
            model = {"test": {"roc_auc": auc, "recall": 0.9, "specificity": 0.8},
                     "test_at": {"default_0.5": {"accuracy": 0.9}}}
            (folder / "metrics.json").write_text(json.dumps({
                "dataset_spec": "pneumoniamnist", "total_wall_time_s": wall, "git_commit": commit,
                "parameters": {"03_scratch_cnn": {"seed": seed}}, "records": {"evaluation": {"models": {
                    "scratch_cnn": model}}}}))
            folders.append(folder)
        return folders

    new, old = runs("new", "b" * 40, [0.97, 0.99], 100.0), runs("old", "a" * 40, [0.95, 0.96, 0.97], 400.0)
    comparison = compare_benchmarks(merge_benchmark(new), merge_benchmark(old))
    auc = next(row for row in comparison["rows"] if row["measure"] == "test_auc")
    assert auc["difference"] == pytest.approx(0.98 - 0.96)
    # standard deviations 0.01414 (2 seeds) and 0.01 (3 seeds)
    assert auc["standard_error"] == pytest.approx((0.0002 / 2 + 0.0001 / 3) ** 0.5)
    accuracy = next(row for row in comparison["rows"] if row["measure"] == "accuracy_at_0.5")
    assert accuracy["difference"] == pytest.approx(0.0) and accuracy["in_standard_errors"] is None  # no spread
    assert comparison["report_wall_time_s"]["speedup"] == pytest.approx(4.0)
    assert comparison["commits"] == {"baseline": ["aaaaaaa"], "new": ["bbbbbbb"]}
    table = comparison_table(comparison)
    assert "| scratch_cnn | test_auc | 0.9600 ± 0.0100 | 0.9800 ± 0.0141 | +0.0200 | 0.0115 | +1.7 |" in table
    assert "400 s mean against 100 s (4.00x)" in table

    assert main(["bench", "compare", "--runs", *map(str, new), "--against", *map(str, old)]) == 0  # conftest's reports dir
    assert "+0.0200" in (tmp_path / "reports" / "bench" / "compare.md").read_text()
    assert main(["bench", "compare", "--runs", *map(str, new)]) == 1  # no baseline: a message, not a traceback
    assert json.loads((tmp_path / "reports" / "bench" / "compare.json").read_text())["seeds"] == {"baseline": 3, "new": 2}
    with pytest.raises(ValueError, match="different datasets"):
        compare_benchmarks(merge_benchmark(new), {**merge_benchmark(old), "dataset": "synthetic"})
