"""Benchmarks that print figures (``make bench``), not timed unit tests.

``full`` (``make bench``): the whole report once per seed on the real
PneumoniaMNIST when it can be found (synthetic data otherwise), then one
table: per model the mean and standard deviation of test AUC, accuracy at
0.5, recall and specificity at the validation-frozen threshold and training
time; the data-pipeline ratios; the int8 TFLite size and parity; the report's
wall time. Also written as ``reports/bench/bench.json`` and ``bench.md``.

``speed``: training FLOP/s against this CPU's attainable rate, the cost of
each training overhead, and the wall time of each lesson (:mod:`medlab.speed`).

``data``: for a PNG folder of generated images (5,000 by default), the
images/s of

- the synthetic generator itself;
- a per-file ``PIL.Image.open`` -> resize -> ``numpy`` loop, the way many
  tutorials load data (the baseline);
- medlab's folder pipeline on its first pass (scan, parallel ``tf.data``
  decode and resize, hashing, cache write);
- a training epoch over the cached split through ``make_tf_dataset``,

and the ratios against the baseline, all measured in the same run.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from medlab import config
from medlab.evaluate import HEADLINE_METRICS
from medlab.synthetic import SyntheticConfig, generate_split


def write_png_folder(root: Path, count: int, source_size: int, seed: int = 0) -> float:
    """Write ``count`` synthetic PNGs as a train/test class-per-folder tree; return images/s generated."""
    from PIL import Image

    train = int(count * 0.8)
    generated = 0.0
    for split, number in (("train", train), ("test", count - train)):
        cfg = SyntheticConfig(image_size=source_size, counts=(number, 1, 1), seed=seed)
        started = time.perf_counter()
        images, labels, _masks = generate_split(cfg, "train")
        generated += time.perf_counter() - started
        for index, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / cfg.class_names[label].upper()
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[..., 0]).save(folder / f"person{index // 3}_{split}_{index}.png")
    return count / generated


def tutorial_loop(root: Path, image_size: int) -> tuple[np.ndarray, float]:
    """The baseline: open, convert, resize and stack every file in a Python loop."""
    from PIL import Image

    started = time.perf_counter()
    arrays = []
    for path in sorted(root.rglob("*.png")):
        with Image.open(path) as image:
            arrays.append(np.asarray(image.convert("L").resize((image_size, image_size), Image.BILINEAR)))
    stacked = np.stack(arrays)
    return stacked, len(arrays) / (time.perf_counter() - started)


def data_benchmark(count: int = 5000, source_size: int = 128, image_size: int = 64,
                   batch_size: int = 64) -> dict:
    from medlab.data import load_dataset, make_tf_dataset

    previous_data_dir = os.environ.get("MEDLAB_DATA_DIR")
    with tempfile.TemporaryDirectory(prefix="medlab-bench-") as temporary:
        root = Path(temporary) / "bench_folder"
        os.environ["MEDLAB_DATA_DIR"] = str(Path(temporary) / "data")  # a cold cache, thrown away after
        generator_rate = write_png_folder(root, count, source_size)
        import tensorflow  # noqa: F401  (its one-off import, ~5 s, is not charged to the pipeline)
        _baseline, baseline_rate = tutorial_loop(root, image_size)

        started = time.perf_counter()
        dataset = load_dataset(root, image_size=image_size, progress=False)
        first_pass_rate = count / (time.perf_counter() - started)

        started = time.perf_counter()
        load_dataset(root, image_size=image_size, progress=False)
        reload_rate = count / (time.perf_counter() - started)

        pipeline = make_tf_dataset(dataset.train, dataset.info.num_classes, batch_size=batch_size, shuffle=True)
        for _ in pipeline.take(1):  # build the pipeline once
            pass
        started = time.perf_counter()
        seen = sum(int(images.shape[0]) for images, _labels in pipeline)
        epoch_rate = seen / (time.perf_counter() - started)
    if previous_data_dir is None:
        os.environ.pop("MEDLAB_DATA_DIR", None)
    else:
        os.environ["MEDLAB_DATA_DIR"] = previous_data_dir
    return {
        "images": count,
        "source_size": source_size,
        "image_size": image_size,
        "cpu_count": config.cpu_count(),
        "synthetic_generator_images_per_s": round(generator_rate, 1),
        "tutorial_loop_images_per_s": round(baseline_rate, 1),
        "medlab_first_pass_images_per_s": round(first_pass_rate, 1),
        "medlab_reload_from_cache_images_per_s": round(reload_rate, 1),
        "medlab_cached_epoch_images_per_s": round(epoch_rate, 1),
        "first_pass_vs_loop": round(first_pass_rate / baseline_rate, 3),
        "cached_epoch_vs_loop": round(epoch_rate / baseline_rate, 3),
    }


def print_table(results: dict) -> None:
    width = max(map(len, results))
    for key, value in results.items():
        print(f"{key:<{width}}  {value}")


# --------------------------------------------------------------------------
# The full benchmark: the whole report for several seeds
# --------------------------------------------------------------------------


def default_bench_dataset() -> str:
    """The real PneumoniaMNIST when it can be found (data/medmnist/, or ../shared/data/), else synthetic."""
    for candidate in (config.medmnist_dir() / "pneumoniamnist.npz",
                      config.PROJECT_ROOT.parent / "shared" / "data" / "pneumoniamnist" / "pneumoniamnist.npz"):
        if candidate.exists():
            return str(candidate)
    return "synthetic"


# Published results on the datasets medlab is benchmarked on, shown beside ours in `make bench`.
# "overlap" says whether the test split they report on shares images with their training data.
PUBLISHED = {
    "brain_tumor_mri": [
        {"source": "Tejashwini, Geetha, Thriveni: VGG16 + EfficientNetB0 fusion, ImageNet-pretrained, IJERT 13(3), "
                   "2024, doi:10.17577/IJERTV13IS030038",
         "accuracy": 0.99, "overlap": "not stated; the dataset's own Testing split has exact copies of "
                                      "Training images (216 of 1,311 here)"},
    ],
}


def full_benchmark(dataset: str | None = None, seeds: int = 3, data_images: int = 5000,
                   skip_bad_files: bool = False, speed: bool = True, tracking: str = "",
                   only_seeds: list[int] | None = None) -> dict:
    """``make reports`` once per seed (runs kept as ``reports/bench-<data>-seed<N>/``), then one summary.

    Seeds 0 to ``seeds - 1``, or only ``only_seeds`` (to spread the seeds over
    several machines; :func:`merge_benchmark` makes one table of their runs).
    ``speed=False`` leaves out :func:`medlab.speed.speed_benchmark` (about a quarter of an hour).
    """
    from medlab.reports import run_reports
    from medlab.runs import RunFolder, read_json, run_name

    dataset = dataset or default_bench_dataset()
    runs = []
    chosen = list(only_seeds) if only_seeds else list(range(seeds))
    for seed in chosen:
        name = f"bench-{run_name(dataset)}-seed{seed}"
        started = time.perf_counter()
        folder = run_reports(dataset, parameters={"seed": seed, "skip_bad_files": skip_bad_files,
                                                  **({"tracking": tracking} if tracking else {})}, name=name)
        wall = time.perf_counter() - started
        metrics = read_json(RunFolder(folder).metrics)
        runs.append({"seed": seed, "folder": str(folder), "wall_time_s": round(wall, 1), "metrics": metrics})
    result = {"dataset": dataset, "seeds": len(chosen), "runs": runs, "summary": summarise_runs(runs),
              "gpus": sorted({gpu for run in runs for gpu in run["metrics"].get("machine", {}).get("gpus", [])}),
              "data_pipeline": data_benchmark(data_images)}
    if speed:
        from medlab.speed import speed_benchmark

        result["speed"] = speed_benchmark(runs[0]["folder"])
    return result


def merge_benchmark(folders: list[str | Path]) -> dict:
    """One benchmark result from finished bench runs, e.g. seeds run on different machines and copied together.

    Each folder is a ``reports/bench-<data>-seed<N>/`` run; they must be of one
    dataset. The report wall times are each run's own (``metrics.json``).
    """
    from medlab.runs import RunFolder, read_json

    runs = []
    for folder in folders:
        metrics = read_json(RunFolder(folder).metrics)
        if metrics is None:
            raise FileNotFoundError(f"{folder} has no metrics.json: not a finished report run")
        seeds = {values.get("seed") for values in metrics.get("parameters", {}).values()} - {None}
        runs.append({"seed": min(seeds) if seeds else None, "folder": str(folder),
                     "wall_time_s": metrics["total_wall_time_s"], "metrics": metrics})
    datasets = {run["metrics"]["dataset_spec"] for run in runs}
    if len(datasets) != 1:
        raise ValueError(f"the runs are of different datasets: {sorted(datasets)}")
    runs.sort(key=lambda run: (run["seed"] is None, run["seed"]))
    return {"dataset": datasets.pop(), "seeds": len(runs), "runs": runs, "summary": summarise_runs(runs),
            "gpus": sorted({gpu for run in runs for gpu in run["metrics"].get("machine", {}).get("gpus", [])})}


def compare_benchmarks(result: dict, baseline: dict) -> dict:
    """Per model and headline number: ``result``'s mean over seeds against ``baseline``'s, with the difference's spread.

    Both are :func:`full_benchmark` or :func:`merge_benchmark` results of one
    dataset, e.g. a new commit's seeds and an old commit's. The standard error
    of the difference of the two means is sqrt(s1^2 / n1 + s2^2 / n2) (the runs
    are not paired: another commit draws other random numbers from a seed), so
    "differences" within about one of them are what the seeds alone would give.
    """
    if result["dataset"] != baseline["dataset"]:
        raise ValueError(f"the two benches are of different datasets: {result['dataset']} and {baseline['dataset']}")
    rows = []
    for name, values in result["summary"].items():
        before = baseline["summary"].get(name)
        if name.startswith("_") or before is None:
            continue
        for key, stats in values.items():
            if key not in before or len(stats["values"]) < 2 or len(before[key]["values"]) < 2:
                continue
            difference = stats["mean"] - before[key]["mean"]
            error = float(np.sqrt(stats["std"] ** 2 / len(stats["values"])
                                  + before[key]["std"] ** 2 / len(before[key]["values"])))
            rows.append({"model": name, "measure": key, "baseline": before[key], "new": stats,
                         "difference": difference, "standard_error": error,
                         "in_standard_errors": difference / error if error > 1e-9 else None})  # not rounding noise
    walls = [side["summary"]["_report_wall_time_s"]["mean"] for side in (baseline, result)]
    return {"dataset": result["dataset"], "commits": {"baseline": _commits(baseline), "new": _commits(result)},
            "seeds": {"baseline": baseline["seeds"], "new": result["seeds"]}, "rows": rows,
            "report_wall_time_s": {"baseline": walls[0], "new": walls[1], "speedup": walls[0] / walls[1]}}


def _commits(result: dict) -> list[str]:
    return sorted({run["metrics"].get("git_commit", "unknown")[:7] for run in result["runs"]})


def comparison_table(comparison: dict) -> str:
    """:func:`compare_benchmarks` as markdown: one row per model and measure."""
    commits, seeds = comparison["commits"], comparison["seeds"]
    lines = [f"New ({', '.join(commits['new'])}, {seeds['new']} seeds) against baseline "
             f"({', '.join(commits['baseline'])}, {seeds['baseline']} seeds); mean ± standard deviation over seeds; "
             "standard error of the difference of the means.", "",
             "| model | measure | baseline | new | new - baseline | standard error | in standard errors |",
             "|---|---|---|---|---|---|---|"]
    for row in comparison["rows"]:
        digits = 0 if row["measure"] == "train_seconds" else 4
        ratio = row["in_standard_errors"]
        lines.append(f"| {row['model']} | {row['measure']} | {_cell(row['baseline'], digits)} | {_cell(row['new'], digits)} "
                     f"| {row['difference']:+.{digits}f} | {row['standard_error']:.{digits}f} | "
                     + (f"{ratio:+.1f} |" if ratio is not None else "n/a |"))
    wall = comparison["report_wall_time_s"]
    lines += ["", f"`make reports` wall time: {wall['baseline']:.0f} s mean against {wall['new']:.0f} s "
                  f"({wall['speedup']:.2f}x)."]
    return "\n".join(lines)


# Lesson 06's multi-class headline metric -> (bench key, column title).
MULTICLASS_COLUMNS = {"accuracy": ("accuracy", "accuracy"), "recall": ("macro_recall", "macro recall"),
                      "f1": ("macro_f1", "macro F1"), "roc_auc": ("macro_auc", "macro one-vs-rest AUC")}


def summarise_runs(runs: list[dict]) -> dict:
    """Per model: mean and standard deviation over seeds of the headline numbers."""
    per_model: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        records = run["metrics"]["records"]
        evaluation = records.get("evaluation", {})
        deduplication = evaluation.get("test_deduplication", {})
        for name, result in evaluation.get("models", {}).items():
            values = per_model.setdefault(name, {})
            test, test_at = result["test"], result.get("test_at", {})
            numbers = {
                "test_auc": test.get("roc_auc"),
                "accuracy_at_0.5": test_at.get("default_0.5", {}).get("accuracy"),
                "recall_at_frozen": test.get("recall"),
                "specificity_at_frozen": test.get("specificity"),
                "train_seconds": records.get(f"model_{name}", {}).get("training", {}).get("train_seconds"),
            }
            if run["metrics"].get("dataset", {}).get("task") == "multiclass":  # argmax, macro averages
                numbers = {MULTICLASS_COLUMNS[key][0]: test.get(key) for key in HEADLINE_METRICS["multiclass"]}
                numbers["full_test_accuracy"] = deduplication.get("full_test", {}).get(name, {}).get("accuracy")
                numbers["train_seconds"] = records.get(f"model_{name}", {}).get("training", {}).get("train_seconds")
            for key, value in numbers.items():
                if value is not None:
                    values.setdefault(key, []).append(float(value))
    summary = {name: {key: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                            "values": v} for key, v in values.items()} for name, values in per_model.items()}
    tflite = [run["metrics"]["records"].get("tflite") for run in runs]
    tflite = [t for t in tflite if t]
    if tflite:
        int8 = [t["variants"]["int8"] for t in tflite]
        keras_auc = [t["variants"]["keras"]["roc_auc"] for t in tflite]
        summary["_tflite_int8"] = {
            "size_vs_float32": float(np.mean([v["size_vs_float32"] for v in int8])),
            "auc_minus_keras": float(np.mean([v["roc_auc"] - k for v, k in zip(int8, keras_auc)])),
            "decision_agreement": float(np.mean([v["decision_agreement"] for v in int8])),
        }
    removed = [run["metrics"]["records"].get("evaluation", {}).get("test_deduplication") for run in runs]
    removed = [r for r in removed if r]
    if removed:
        summary["_test_deduplication"] = {key: removed[0].get(key) for key in
                                          ("test_images", "with_copy_in_train_or_val", "headline")}
    summary["_report_wall_time_s"] = {"mean": float(np.mean([r["wall_time_s"] for r in runs])),
                                      "values": [r["wall_time_s"] for r in runs]}
    return summary


def markdown_table(result: dict) -> str:
    """The benchmark's one table, as markdown (also what `make bench` prints)."""
    summary = result["summary"]
    dataset = result["dataset"]
    if Path(dataset).is_absolute():  # a table for the README: no one machine's paths
        dataset = os.path.relpath(dataset, config.PROJECT_ROOT)
    cores = result["data_pipeline"]["cpu_count"] if "data_pipeline" in result else "/".join(
        sorted({str(run["metrics"].get("machine", {}).get("cpu_count")) for run in result["runs"]}))
    lines = [f"Dataset: `{dataset}`, {result['seeds']} seed(s), {cores} CPU core(s), "
             + ("GPU not recorded" if "gpus" not in result else
                f"GPU: {', '.join(result['gpus'])}" if result["gpus"] else "no GPU used") + ".", ""]
    models = {name: values for name, values in summary.items() if not name.startswith("_")}
    binary = {name: values for name, values in models.items() if "test_auc" in values}
    if binary:
        lines += _rows(binary, [("test ROC-AUC", "test_auc"), ("accuracy at 0.5", "accuracy_at_0.5"),
                                ("recall at frozen threshold", "recall_at_frozen"),
                                ("specificity at frozen threshold", "specificity_at_frozen")])
    multiclass = {name: values for name, values in models.items() if "macro_recall" in values}
    if multiclass:
        deduplication = summary.get("_test_deduplication") or {}
        headline = "de-duplicated test" if deduplication.get("headline") == "deduplicated" else "test"
        lines += [f"Multi-class, argmax decisions, on the {headline} split"
                  + (f" ({deduplication['with_copy_in_train_or_val']} of {deduplication['test_images']} test "
                     "images with an exact copy in train or val left out)" if headline != "test" else "") + ":", ""]
        columns = [MULTICLASS_COLUMNS[key] for key in HEADLINE_METRICS["multiclass"]]
        columns = [(f"{headline} {title}" if key == "accuracy" else title, key) for key, title in columns]
        lines += _rows(multiclass, columns + [("full-test accuracy", "full_test_accuracy")])
        published = PUBLISHED.get(Path(str(result["dataset"]).rstrip("/")).name, [])
        if published:
            lines += ["", "Published on this dataset (not re-run here):", "",
                      "| source | test accuracy | test split overlaps training? |", "|---|---|---|"]
            lines += [f"| {p['source']} | {p['accuracy']:.3f} | {p['overlap']} |" for p in published]
    pipeline = result.get("data_pipeline")
    lines += [] if pipeline is None else ["", f"Data pipeline ({pipeline['images']} PNGs, {pipeline['source_size']} px -> {pipeline['image_size']} px): "
              f"first pass {pipeline['first_pass_vs_loop']:.2f}x, cached epoch {pipeline['cached_epoch_vs_loop']:.1f}x "
              "a per-file PIL loop."]
    if "_tflite_int8" in summary:
        int8 = summary["_tflite_int8"]
        lines.append(f"TFLite int8: {int8['size_vs_float32']:.0%} of float32, test AUC {int8['auc_minus_keras']:+.4f} "
                     f"vs Keras, decision agreement {int8['decision_agreement']:.1%}.")
    wall = summary["_report_wall_time_s"]
    lines.append(f"`make reports` wall time: {wall['mean']:.0f} s mean ({', '.join(f'{v:.0f}' for v in wall['values'])}).")
    if "speed" in result:
        from medlab.speed import markdown

        lines += ["", "Training speed (`medlab bench speed`):", "", markdown(result["speed"])]
    return "\n".join(lines)


def _cell(stats: dict | None, digits: int = 3) -> str:
    if not stats:
        return "n/a"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def _rows(models: dict, columns: list[tuple[str, str]]) -> list[str]:
    """A markdown table: one row per model, mean ± std over seeds per column, then training time."""
    lines = ["| model | " + " | ".join(title for title, _ in columns) + " | training s |",
             "|---|" + "---|" * (len(columns) + 1)]
    lines += [f"| {name} | " + " | ".join(_cell(values.get(key)) for _, key in columns)
              + f" | {_cell(values.get('train_seconds'), 0)} |" for name, values in models.items()]
    return lines


def write_results(result: dict, folder: Path, name: str = "bench", table=markdown_table) -> tuple[Path, Path]:
    """``<name>.json`` and ``<name>.md`` (``table(result)``) in ``folder``; e.g. ``"compare", comparison_table``."""
    folder.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = folder / f"{name}.json", folder / f"{name}.md"
    json_path.write_text(json.dumps(result, indent=2, default=float) + "\n")
    markdown_path.write_text(table(result) + "\n")
    return json_path, markdown_path
