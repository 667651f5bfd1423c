"""oneDNN's own timings of a training step, kernel by kernel (``medlab bench kernels``; also in ``medlab bench speed``).

With ``ONEDNN_VERBOSE=1`` oneDNN prints a line for every kernel it runs::

    onednn_verbose,v1,primitive,exec,cpu,convolution,<implementation>,backward_weights,<tensors>,<attributes>,
    alg:convolution_direct,mb64_ic32oc64_ih32oh32kh3sh1dh0ph1_iw32ow32kw3sw1dw0pw1,3.70386

oneDNN reads the variable when it loads, so the step runs in a fresh Python
process (:func:`run_logged`), which prints :data:`START` and :data:`END`
around the steps to be counted (after a warm-up). :func:`summarise` sums
the lines between them by kind and pass, per step; convolutions and matrix
products also get GFLOP/s from the shapes oneDNN prints (a convolution costs
``2 * mb * oc * oh * ow * ic / groups * kh * kw`` in each of its three passes).

What is not in the log: the kernels TensorFlow runs itself (ReLU and its
gradient, the optimizer's updates, casts) and the gaps between kernels; the
step's wall time beside the sum shows them. Two kernels can run at once
(TensorFlow's inter-op threads), so the sum can also exceed the wall time.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

START, END = "MEDLAB-KERNELS-START", "MEDLAB-KERNELS-END"
KINDS = {"convolution": "convolution", "batch_normalization": "batch norm", "pooling": "pooling",
         "reorder": "reorder", "matmul": "matmul", "gemm_api": "matmul", "inner_product": "inner product"}
PASSES = {"forward_training": "forward", "forward_inference": "forward", "forward": "forward",
          "backward_data": "backward data", "backward_weights": "backward weights", "backward": "backward"}
# The rows of markdown()'s table in this order; any other kind follows, the slowest first.
ORDER = ("convolution forward", "convolution backward data", "convolution backward weights", "batch norm forward",
         "batch norm backward", "pooling forward", "pooling backward data", "reorder", "matmul")
_CONVOLUTION = re.compile(r"^(?:g(?P<groups>\d+))?mb(?P<mb>\d+)_ic(?P<ic>\d+)oc(?P<oc>\d+)_"
                          r"ih\d+oh(?P<oh>\d+)kh(?P<kh>\d+)\S*?_iw\d+ow(?P<ow>\d+)kw(?P<kw>\d+)")
_MATMUL = re.compile(r"^(?P<source>\d+(?:x\d+)*):(?P<weights>\d+(?:x\d+)*)")


class LogError(RuntimeError):
    """The process whose kernels were to be logged did not get through its steps."""


def problem_gflop(kind: str, problem: str) -> float | None:
    """GFLOP of one run of a convolution or matrix product from oneDNN's shape string, None for other kernels."""
    if kind == "convolution" and (match := _CONVOLUTION.match(problem)):
        size = {key: int(value or 1) for key, value in match.groupdict().items()}
        macs = size["mb"] * size["oc"] * size["oh"] * size["ow"] * size["ic"] // size["groups"] * size["kh"] * size["kw"]
        return 2 * macs / 1e9
    if kind in ("matmul", "gemm_api") and (match := _MATMUL.match(problem)):
        source = [int(value) for value in match["source"].split("x")]
        columns = int(match["weights"].split("x")[-1])
        return 2 * float(math.prod(source)) * columns / 1e9
    return None


def parse_verbose(lines) -> list[dict]:
    """One record per kernel run in oneDNN's verbose lines: kind, pass, implementation, shape, ms, GFLOP."""
    records = []
    for line in lines:
        fields = line.strip().split(",")
        if "exec" not in fields:
            continue
        at = fields.index("exec")
        if at == 0 or fields[at - 1] not in ("primitive", "onednn_verbose", "dnnl_verbose") or len(fields) < at + 6:
            continue  # not a kernel's line (oneDNN's graph API and info lines have other fields)
        try:
            milliseconds = float(fields[-1])
        except ValueError:
            continue
        kind, implementation, direction, problem = fields[at + 2], fields[at + 3], fields[at + 4], fields[-2]
        records.append({"kind": kind, "pass": direction, "implementation": implementation, "problem": problem,
                        "ms": milliseconds, "gflop": problem_gflop(kind, problem)})
    return records


def label(record: dict) -> str:
    """The table row a kernel's time goes to: its kind and, where it has one, its pass."""
    return f"{KINDS.get(record['kind'], record['kind'])} {PASSES.get(record['pass'], '')}".strip()


def summarise(records: list[dict], steps: int) -> dict:
    """Per step: each row's ms, calls and GFLOP/s (convolutions and matrix products), the convolutions together, all."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    rows: dict[str, dict] = {}
    for record in records:
        row = rows.setdefault(label(record), {"ms": 0.0, "calls": 0, "gflop": 0.0 if record["gflop"] else None})
        row["ms"] += record["ms"] / steps
        row["calls"] += 1
        if row["gflop"] is not None and record["gflop"]:
            row["gflop"] += record["gflop"] / steps
    convolutions = [row for name, row in rows.items() if name.startswith("convolution")]
    together = {"ms": sum(row["ms"] for row in convolutions), "gflop": sum(row["gflop"] or 0 for row in convolutions)}
    for row in (*rows.values(), together):
        row["gflops"] = round(row["gflop"] / row["ms"] * 1e3, 1) if row.get("gflop") and row["ms"] else None
    rows = {name: {**row, "calls": row["calls"] / steps} for name, row in rows.items()}
    return {"kernels": rows, "convolutions": together, "onednn_ms": sum(row["ms"] for row in rows.values())}


def run_logged(code: str, timeout: float = 1800) -> tuple[list[str], dict]:
    """Run Python ``code`` in a fresh process with oneDNN's log on; its lines between the markers, and what END carried.

    ``code`` prints :data:`START` before the steps to count and ``END`` followed
    by a JSON object (e.g. the steps' wall time) after them.
    """
    package_parent = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))
    environment = {**os.environ, "ONEDNN_VERBOSE": "1", "PYTHONPATH": path}
    try:
        completed = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True,
                                   timeout=timeout)
    except subprocess.TimeoutExpired as error:
        raise LogError(f"the logged training step did not finish within {timeout:.0f} s") from error
    lines = completed.stdout.splitlines()
    ends = [index for index, line in enumerate(lines) if line.startswith(END)]
    if completed.returncode != 0 or START not in lines or not ends:
        raise LogError(f"the logged training step did not finish (exit {completed.returncode}):\n"
                           + "\n".join(completed.stderr.strip().splitlines()[-15:]))
    return lines[lines.index(START) + 1:ends[-1]], json.loads(lines[ends[-1]][len(END):] or "{}")


def markdown(breakdowns: list[dict]) -> str:
    """One column per breakdown: ms per step and, for convolutions and matrix products, GFLOP/s.

    A breakdown with an ``"error"`` (the step could not be logged) is a line under the table instead.
    """
    failed = [f"Not logged, {b['model']} {b['precision'].removeprefix('mixed_')}: {b['error']}"
              for b in breakdowns if "error" in b]
    breakdowns = [b for b in breakdowns if "error" not in b]
    if not breakdowns:
        return "\n".join(failed)
    present = {name for breakdown in breakdowns for name in breakdown["kernels"]}
    others = sorted(present - set(ORDER), key=lambda name: -max(b["kernels"].get(name, {"ms": 0})["ms"] for b in breakdowns))
    names = [name for name in ORDER if name in present] + others

    def cell(row):
        if not row:
            return "-"
        return f"{row['ms']:.1f}" + (f" ({row['gflops']:,.0f} GFLOP/s)" if row.get("gflops") else "")

    columns = [f"{b['model']} {b['precision'].removeprefix('mixed_')}" for b in breakdowns]
    lines = ["| oneDNN kernel, ms per step of " + f"{breakdowns[0]['batch_size']} images | " + " | ".join(columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cell(b["kernels"].get(name)) for b in breakdowns) + " |" for name in names]
    lines += ["| convolutions together | " + " | ".join(cell(b["convolutions"]) for b in breakdowns) + " |",
              "| all oneDNN kernels | " + " | ".join(f"{b['onednn_ms']:.1f}" for b in breakdowns) + " |",
              "| the step's wall time (log on) | " + " | ".join(f"{b['step_wall_ms']:.1f}" for b in breakdowns) + " |",
              "", "oneDNN's own timings (`ONEDNN_VERBOSE=1`) of the bare training step, summed per step. Not in them:"
              " TensorFlow's own kernels (ReLU, the optimizer's updates, casts) and the gaps between kernels; two"
              " kernels can run at once, so the sum can exceed the wall time. GFLOP/s from the shapes oneDNN logs."]
    return "\n".join(lines + (["", *failed] if failed else []))
