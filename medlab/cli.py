"""The ``medlab`` command line: ``medlab --help`` lists the subcommands.

Expected problems (a missing file, a bad image, no internet) end with one
clear message and exit status 1; ``--debug`` shows the full traceback.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys

from medlab import config
from medlab.runs import RunFolder


def _parse_parameter(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"parameters look like name=value, got {text!r}")
    name, raw = text.split("=", 1)
    try:
        value = json.loads(raw)  # 32, 0.5, true, "text", [1, 2]
    except ValueError:
        try:  # Python's spelling as in the notebooks' parameter cells: False, True, None, ('a', 'b')
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a bare string: -p dataset=pneumoniamnist
    return name.strip(), value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medlab", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of short messages")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="prepare datasets: the synthetic default, MedMNIST downloads")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    synthetic = data_commands.add_parser("synthetic", help="generate and cache the synthetic dataset")
    synthetic.add_argument("--task", choices=["binary", "four_class"], default="binary")
    synthetic.add_argument("--image-size", type=int, default=64)
    synthetic.add_argument("--seed", type=int, default=config.DEFAULT_SEED)
    download = data_commands.add_parser("download", help="fetch an official MedMNIST file (MD5-checked)")
    download.add_argument("flag", nargs="?", default="pneumoniamnist")
    download.add_argument("--size", type=int, default=28, choices=[28, 64, 128, 224])

    info = commands.add_parser("info", help="describe a dataset: classes, counts, fingerprint, notes")
    info.add_argument("dataset", nargs="?", default=config.DEFAULT_DATASET)
    info.add_argument("--image-size", type=int, default=0)
    info.add_argument("--skip-bad-files", action="store_true", help="leave unreadable images out and list them")

    audit = commands.add_parser("audit", help="list exact and near-duplicate images within and across splits")
    audit.add_argument("dataset", nargs="?", default=config.DEFAULT_DATASET)
    audit.add_argument("--skip-bad-files", action="store_true", help="leave unreadable images out and list them")

    kernel = commands.add_parser("kernel", help="register the Jupyter kernel the notebooks use (make setup does)")
    kernel.add_argument("--user", action="store_true", help="in your own kernels (default: this environment's)")

    reports = commands.add_parser("reports", help="execute the notebooks into reports/<run>/")
    reports.add_argument("--dataset", default=config.DEFAULT_DATASET)
    reports.add_argument("--notebooks", nargs="*", help="numbers or names, e.g. 01 02 (default: all)")
    reports.add_argument("-p", "--parameter", action="append", type=_parse_parameter, default=[],
                         metavar="NAME=VALUE", help="notebook parameter, repeatable (e.g. -p image_size=32)")
    reports.add_argument("--kernel", default=None, help="Jupyter kernel (default: the notebooks' own)")
    reports.add_argument("-j", "--jobs", type=int, default=None, metavar="N",
                         help="notebooks run side by side where one does not need another "
                              "(default: MEDLAB_NOTEBOOKS_AT_ONCE, else 2; 1 streams each cell's output)")

    predict = commands.add_parser("predict", help="predict images with a run's model")
    predict.add_argument("images", nargs="+", help="image files, folders or globs")
    predict.add_argument("--run", help="run folder (default: the newest under reports/)")
    predict.add_argument("--model", default="keras", help="keras, tflite-float32, tflite-float16, "
                         "tflite-dynamic_range or tflite-int8")
    predict.add_argument("--model-name", help="which trained model (default: the run's best by validation AUC)")
    output = predict.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print JSON")
    output.add_argument("--csv", action="store_true", help="print CSV")

    serve = commands.add_parser("serve", help="start the web app for a run's model")
    serve.add_argument("--run", help="run folder (default: the newest under reports/)")
    serve.add_argument("--model", default="keras")
    serve.add_argument("--model-name")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    serve.add_argument("--port", type=int, default=8000)

    _add_bench_parser(commands)
    return parser


def _bench_kernels(arguments) -> int:
    from medlab import kernels, speed
    from medlab.train import cpu_trains_bfloat16, onednn_enabled

    if not onednn_enabled():
        raise ValueError("TensorFlow runs its own kernels here, not oneDNN's (TF_ENABLE_ONEDNN_OPTS=0, or a "
                         "TensorFlow built without them): there is no oneDNN log to read")
    precisions = ("float32", "mixed_bfloat16") if cpu_trains_bfloat16() else ("float32",)
    results = [speed.kernel_breakdown(name, precision) for precision in precisions for name in speed.KERNEL_MODELS]
    print(json.dumps(results, indent=2) if arguments.json else kernels.markdown(results))
    return 0


def _add_bench_parser(commands) -> None:
    bench = commands.add_parser("bench", help="print benchmark figures")
    bench.add_argument("what", choices=["full", "data", "speed", "kernels", "merge", "compare"], nargs="?", default="full",
                       help="full: the whole report per seed, then one table (default); data: the data pipeline "
                            "only; speed: training FLOP/s against this CPU's attainable rate, and overheads; kernels: where "
                            "lesson 03's 64 and 128 px training steps go, by oneDNN kernel (under a minute); "
                            "merge: one table from finished bench runs (--runs), e.g. seeds run on several machines; "
                            "compare: finished bench runs (--runs) against a baseline's (--against), e.g. two commits")
    bench.add_argument("--seed", type=int, action="append", dest="only_seeds",
                       help="full: run only this seed (repeatable), e.g. one seed per machine")
    bench.add_argument("--runs", nargs="+", help="merge, compare: the bench run folders (reports/bench-<data>-seed<N>)")
    bench.add_argument("--against", nargs="+", help="compare: the baseline's bench run folders")
    bench.add_argument("--run", help="speed: a finished run folder whose lesson wall times and epochs to report")
    bench.add_argument("--skip-bad-files", action="store_true", help="full: leave unreadable images out of every run")
    bench.add_argument("--dataset", help="default: the real PneumoniaMNIST when found, else synthetic")
    bench.add_argument("--seeds", type=int, default=3)
    bench.add_argument("--images", type=int, default=5000, help="PNG files for the data-pipeline benchmark")
    bench.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench.add_argument("--tracking", default="", choices=["", "mlflow"],
                       help="full: log every seed's lessons to MLflow, tagged by seed (see medlab.tracking)")
    bench.add_argument("--no-speed", action="store_true", help="full: leave out the training-speed benchmark")


def main(argv: list[str] | None = None) -> int:
    from medlab.data import DataError
    from medlab.download import DownloadError
    from medlab.kernels import LogError
    from medlab.predict import PredictError
    from medlab.reports import ReportError

    arguments = build_parser().parse_args(argv)
    try:
        return _run(arguments)
    except (DataError, DownloadError, ReportError, PredictError, LogError, FileNotFoundError, PermissionError,
            ValueError) as error:
        if arguments.debug:
            raise
        print(f"medlab: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("medlab: interrupted", file=sys.stderr)
        return 130


def _run(arguments) -> int:
    """Dispatch to the subcommand's handler."""
    handlers = {"data": _data, "info": _info, "audit": _audit, "kernel": _kernel, "reports": _reports, "predict": _predict,
                "serve": _predict, "bench": _bench}
    return handlers[arguments.command](arguments)


def _papermill_logging() -> None:
    """papermill logs each cell's output (per-epoch training lines) at INFO: show those, nothing else."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("papermill").setLevel(logging.INFO)


def _data(arguments) -> int:
    if arguments.data_command == "synthetic":
        from medlab.synthetic import SyntheticConfig, ensure_synthetic

        print(ensure_synthetic(SyntheticConfig(task=arguments.task, image_size=arguments.image_size,
                                               seed=arguments.seed)))
    else:
        from medlab.download import download_medmnist

        print(download_medmnist(arguments.flag, arguments.size))
    return 0


def _info(arguments) -> int:
    from medlab.data import load_dataset

    dataset = load_dataset(arguments.dataset, image_size=arguments.image_size or None,
                           on_error="skip" if arguments.skip_bad_files else "raise")
    print(json.dumps(dataset.describe(), indent=2))
    print(dataset.counts().to_string())
    return 0


def _audit(arguments) -> int:
    from medlab.audit import (
        NEAR_DUPLICATE_DISTANCE,
        duplicate_summary,
        find_duplicates,
        find_near_duplicates,
        near_duplicate_summary,
        patients_across_splits,
    )
    from medlab.data import load_dataset

    dataset = load_dataset(arguments.dataset, on_error="skip" if arguments.skip_bad_files else "raise")
    for name, reason in dataset.info.skipped:
        print(f"skipped {name}: {reason}")
    duplicates = find_duplicates(dataset)
    print(duplicate_summary(duplicates).to_string() if len(duplicates) else "no exact duplicates")
    if len(duplicates):
        print()
        print(duplicates.to_string(index=False, max_colwidth=60))
    near = find_near_duplicates(dataset)
    print(f"\nnear duplicates (perceptual hash within {NEAR_DUPLICATE_DISTANCE} of 64 bits, not exact copies):")
    print(near_duplicate_summary(near).to_string() if len(near) else "none")
    if len(near):
        print()
        print(near.to_string(index=False, max_colwidth=60))
    shared = patients_across_splits(dataset)
    known = any(patient for split in dataset.splits.values() for patient in split.patients or [])
    print("\npatients in more than one split:", "file names and headers name no patients" if not known else
          "none" if shared.empty else f"{len(shared)}\n" + shared.to_string(index=False))
    return 0


def _kernel(arguments) -> int:
    from medlab.execution import install_kernel

    print(f"kernel registered: {install_kernel(user=arguments.user)}")
    return 0


def _reports(arguments) -> int:
    from medlab.reports import run_reports

    _papermill_logging()
    final = run_reports(arguments.dataset, arguments.notebooks, dict(arguments.parameter), arguments.kernel,
                        at_once=arguments.jobs)
    print(f"report written: {RunFolder(final).index_html}")
    return 0


def _predict(arguments) -> int:
    """``predict`` and ``serve``: the same model loading, then a table or a web server."""
    from medlab.predict import Predictor, default_run

    run = arguments.run or default_run(config.reports_dir())
    predictor = Predictor(run, arguments.model, arguments.model_name)
    if arguments.command == "serve":
        from medlab.serve import run_server

        run_server(predictor, arguments.host, arguments.port)
        return 0
    return _print_predictions(predictor, arguments)


def _bench(arguments) -> int:
    from medlab import bench

    if arguments.what == "data":
        results = bench.data_benchmark(arguments.images)
        if arguments.json:
            print(json.dumps(results, indent=2))
        else:
            bench.print_table(results)
        return 0
    if arguments.what == "speed":
        from medlab import speed

        results = speed.speed_benchmark(arguments.run)
        json_path, markdown_path = speed.write_results(results, config.reports_dir() / "bench")
        print(json.dumps(results, indent=2) if arguments.json else speed.markdown(results))
        print(f"\nwritten: {json_path}, {markdown_path}")
        return 0
    if arguments.what == "kernels":
        return _bench_kernels(arguments)
    if arguments.what == "compare":
        if not arguments.runs or not arguments.against:
            raise ValueError("bench compare needs --runs FOLDER [FOLDER ...] --against FOLDER [FOLDER ...] "
                             "(finished bench runs: the new ones, then the baseline's)")
        comparison = bench.compare_benchmarks(bench.merge_benchmark(arguments.runs),
                                              bench.merge_benchmark(arguments.against))
        json_path, markdown_path = bench.write_results(comparison, config.reports_dir() / "bench", "compare",
                                                         bench.comparison_table)
        print(json.dumps(comparison, indent=2) if arguments.json else bench.comparison_table(comparison))
        print(f"\nwritten: {json_path}, {markdown_path}")
        return 0
    if arguments.what == "merge":
        if not arguments.runs:
            raise ValueError("bench merge needs --runs FOLDER [FOLDER ...] (finished bench runs)")
        result = bench.merge_benchmark(arguments.runs)
        json_path, markdown_path = bench.write_results(result, config.reports_dir() / "bench")
        print(json.dumps(result["summary"], indent=2) if arguments.json else bench.markdown_table(result))
        print(f"\nwritten: {json_path}, {markdown_path}")
        return 0
    _papermill_logging()
    result = bench.full_benchmark(arguments.dataset, arguments.seeds, arguments.images,
                                  skip_bad_files=arguments.skip_bad_files, speed=not arguments.no_speed,
                                  tracking=arguments.tracking, only_seeds=arguments.only_seeds)
    json_path, markdown_path = bench.write_results(result, config.reports_dir() / "bench")
    print(json.dumps(result["summary"], indent=2) if arguments.json else bench.markdown_table(result))
    print(f"\nwritten: {json_path}, {markdown_path}")
    return 0


def _print_predictions(predictor, arguments) -> int:
    from medlab.predict import expand_inputs

    paths = expand_inputs(arguments.images)
    if not paths:
        raise ValueError(f"no images found in {arguments.images}")
    results = predictor.predict_files(paths)
    rows = [result.as_dict() for result in results]
    if arguments.json:
        print(json.dumps({"run": str(predictor.run_dir), "model": predictor.model_name, "kind": predictor.kind,
                          "threshold": predictor.threshold, "predictions": rows}, indent=2))
    elif arguments.csv:
        import csv

        writer = csv.writer(sys.stdout)
        writer.writerow(["file", "predicted_class", *[f"p_{n}" for n in predictor.class_names],
                         "crossed_threshold", "error"])
        for row in rows:
            writer.writerow([row["file"], row["predicted_class"] or "",
                             *[row["probabilities"].get(n, "") for n in predictor.class_names],
                             "" if row["crossed_threshold"] is None else row["crossed_threshold"], row["error"] or ""])
    else:
        threshold = "none" if predictor.threshold is None else f"{predictor.threshold:.3f}"
        print(f"run {predictor.run_dir.name}, model {predictor.model_name} ({predictor.kind}), threshold {threshold}")
        for row in rows:
            if row["error"]:
                print(f"{row['file']}: ERROR {row['error']}")
                continue
            probabilities = ", ".join(f"{name} {p:.3f}" for name, p in row["probabilities"].items())
            crossed = "" if row["crossed_threshold"] is None else \
                ("  (above threshold)" if row["crossed_threshold"] else "  (below threshold)")
            print(f"{row['file']}: {row['predicted_class']}  [{probabilities}]{crossed}")
    failed = sum(1 for row in rows if row["error"])
    if failed:
        print(f"medlab: {failed} of {len(rows)} file(s) could not be predicted", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
