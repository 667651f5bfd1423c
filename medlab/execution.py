"""Executing the numbered notebooks with papermill: one at a time, or two at once where one does not need the other.

A notebook alone leaves a 2-core CPU idle much of the time: its imports, data loading, plotting and file
writing use one core, and even training kept both cores only about 85% busy (a synthetic ``make reports``
used 113% of the 200% it had). Lessons 01, 02, 03 and 04 read nothing another lesson writes, so
:func:`run_notebooks` runs them side by side, each in its own kernel, driven by one of ``at_once`` worker
processes (two by default).
:data:`NEEDS` says which earlier notebooks each one waits for; a notebook not listed there waits for every
notebook before it.

Hand-overs cost almost nothing: the workers import papermill once, before their first notebook; a kernel is
killed once its last cell has run (a graceful shutdown waited 1.3 s for TensorFlow to exit); the HTML is rendered
beside the next notebook (those three took 2-3 s at each hand-over); and a worker with nothing ready to run starts
the next waiting notebook's kernel and imports Keras and TensorFlow in it (:class:`_WarmKernel`, 3-4 s), so a
notebook that had to wait while a worker was free (lesson 07 always, 06 when 01 and 02 are done before 03-05)
starts with its imports done.

Running side by side changed no result (every notebook seeds its own work: two synthetic reports, one and two
at a time, wrote the same metrics.json but for wall times, and a 3-seed PneumoniaMNIST bench gave the same
means as one at a time), only the wall times a notebook records about itself: they include the CPU it shared.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path

from medlab import config

# Which earlier notebooks each notebook waits for (by number): those whose outputs it reads, or every one for a
# notebook that must run alone. Not listed: it waits for every earlier one.
NEEDS: dict[str, tuple[str, ...]] = {
    "01": (),  # EDA: the dataset only
    "02": (),  # augmentation: the dataset only
    "03": (),  # the scratch CNN: the dataset only
    "04": (),  # transfer learning: the dataset (and ImageNet weights if cached)
    "05": ("04",),  # fine-tunes lesson 04's model
    "06": ("03", "04", "05"),  # evaluates every trained model
    # converts lesson 06's best model at the threshold 06 froze, and times inference: it waits for every notebook
    # so that nothing runs beside it while it measures latency
    "07": ("01", "02", "03", "04", "05", "06"),
}


class NotebookFailed(RuntimeError):
    """A notebook raised (or its kernel died): ``notebook`` is which, ``reason`` and ``detail`` say why."""

    def __init__(self, notebook: Path, reason: str, detail: str):
        super().__init__(f"{notebook.name} failed: {reason}: {detail}")
        self.notebook, self.reason, self.detail = notebook, reason, detail


@dataclass(frozen=True)
class Task:
    """One notebook to execute into ``output`` with papermill ``parameters``, in the folder ``cwd``."""

    notebook: Path
    output: Path
    parameters: dict = field(default_factory=dict)
    kernel: str | None = None
    cwd: Path = field(default_factory=lambda: config.NOTEBOOKS_DIR)  # fixed here: a child process re-imports config
    # Code a kernel runs before the notebook's first cell (see _WarmKernel); it should bind no names, so that the
    # notebook still imports what it uses. What it prints does not go into a cell (papermill: to the terminal).
    preload: str = ""


# The lessons preload medlab (its environment settings first), TensorFlow and Keras, and list the devices: TensorFlow
# prints its loading lines on import and, where a CUDA runtime has no driver, "failed call to cuInit" on the first
# look at the devices (listing them does not start TensorFlow's runtime: the lessons still configure it)
LESSON_PRELOAD = ("import medlab as _medlab_preloaded, tensorflow as _tensorflow_preloaded, keras as _keras_preloaded; "
                  "_tensorflow_preloaded.config.list_physical_devices(); "
                  "del _medlab_preloaded, _tensorflow_preloaded, _keras_preloaded")


def install_kernel(name: str = "medlab", user: bool = False, prefix: str | None = None) -> Path:
    """Register the Jupyter kernel the lessons name (``make setup`` does; ``medlab kernel``); return its folder.

    The kernel asks TensorFlow for oneDNN's kernels (``TF_ENABLE_ONEDNN_OPTS=1``, as ``import medlab`` does, since
    the notebooks import TensorFlow first), so a lesson opened in JupyterLab trains as fast, and to the same
    numbers, as in ``make reports``; and it runs :data:`LESSON_PRELOAD` as it starts, so TensorFlow's loading lines
    stay out of the setup cell. ``user``: the user's kernels; else ``prefix``,
    default this Python's environment (``--sys-prefix``).
    """
    import json
    import sys

    from ipykernel.kernelspec import install

    folder = Path(install(user=user, prefix=None if user else (prefix or sys.prefix), kernel_name=name,
                          display_name="Python (medlab)", env={"TF_ENABLE_ONEDNN_OPTS": "1"}))
    spec_path = folder / "kernel.json"
    spec = json.loads(spec_path.read_text())
    spec["argv"].append(f"--IPKernelApp.exec_lines={LESSON_PRELOAD}")
    spec_path.write_text(json.dumps(spec, indent=1) + "\n")
    return folder


def waits_for(stems: list[str]) -> dict[str, set[str]]:
    """For each notebook stem, the stems among ``stems`` it must wait for (see :data:`NEEDS`)."""
    numbers = {stem: stem.split("_", 1)[0] for stem in stems}
    waits = {}
    for position, stem in enumerate(stems):
        needed = NEEDS.get(numbers[stem])
        earlier = stems[:position]
        waits[stem] = set(earlier) if needed is None else {other for other in earlier if numbers[other] in needed}
    return waits


def execution_order(stems: list[str]) -> list[str]:
    """Priority order: the longest chain of notebooks through each one (those it waits for, itself, those that
    wait for it), longest first, then by number. Whenever a slot is free the first notebook in this order whose
    needs are met starts.

    Lessons 04, 05 and 06 lie on the longest chain (04 -> 05 -> 06 -> 07), so 06 starts as soon as 05 ends;
    lessons 01 and 02 (only 07 waits for them) fill the gaps instead of delaying it (06 waited 7 s behind them).
    """
    waits = waits_for(stems)
    before: dict[str, int] = {}
    for stem in stems:  # a notebook only waits for earlier ones
        before[stem] = max((before[other] for other in waits[stem]), default=0) + 1
    after: dict[str, int] = {}
    for stem in reversed(stems):
        after[stem] = max((after[other] for other in stems if stem in waits[other]), default=0) + 1
    return sorted(stems, key=lambda stem: (-(before[stem] + after[stem]), stems.index(stem)))


def render_html(notebook_path: Path) -> Path:
    """Render an executed notebook to a standalone HTML file beside it.

    Consecutive text outputs are merged and a progress bar's carriage returns applied (nbconvert's
    ``CoalesceStreamsPreprocessor``, off by default): a bar redrawn 13 times was 13 lines of the page, now it is
    its last state. The executed notebook keeps every output (JupyterLab draws the bar in place).
    """
    import nbformat
    from nbconvert import HTMLExporter
    from traitlets.config import Config

    notebook = nbformat.read(notebook_path, as_version=4)
    _images_with_alt_text(notebook)
    exporter = HTMLExporter(config=Config({"CoalesceStreamsPreprocessor": {"enabled": True}}))
    body, _resources = exporter.from_notebook_node(notebook)
    html_path = notebook_path.with_suffix(".html")
    html_path.write_text(body, encoding="utf-8")
    return html_path


def _images_with_alt_text(notebook) -> None:
    """PNG outputs that carry alternative text (:func:`medlab.plots.show_alt_text`) rendered as ``<img alt=...>``.

    nbconvert's templates drop an output's ``alt`` metadata (and then label
    the image "No description has been provided"), so such outputs get an
    HTML form, which nbconvert prefers to the PNG; in memory only, the
    executed notebook is not changed.
    """
    import html

    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            data, metadata = output.get("data", {}), output.get("metadata", {}).get("image/png", {})
            if metadata.get("alt") and "image/png" in data and "text/html" not in data:
                size = "".join(f' {key}="{int(metadata[key])}"' for key in ("width", "height") if key in metadata)
                data["text/html"] = (f'<img src="data:image/png;base64,{data["image/png"].strip()}"{size} '
                                     f'alt="{html.escape(metadata["alt"])}">')


def execute(task: Task, progress: bool | dict = True, log_output: bool = True) -> float:
    """Run one notebook and render its HTML (also when it failed); return its wall time in seconds."""
    try:
        return _papermill(task, progress, log_output)
    finally:
        if task.output.exists():
            render_html(task.output)


def _papermill(task: Task, progress: bool | dict, log_output: bool, warm: _WarmKernel | None = None) -> float:
    """Execute ``task`` with papermill (no HTML); return its wall time or raise :class:`NotebookFailed`.

    The wall time starts at papermill's call: a warm kernel's start and preload, done before, are not in it.
    Without one, a task with a ``preload`` gets its kernel started here, with the preload (in the wall time): what
    TensorFlow prints as it loads (its "absl::InitializeLog", oneDNN and CUDA lines) then goes to the terminal,
    not into the notebook's first code cell.

    ``warm``: a kernel started ahead for this task, used (and shut down) instead of starting one. The kernel is
    killed as soon as the last cell has run: every output a lesson keeps is written by its cells, and a graceful
    shutdown (papermill's default) waited 1.3 s for TensorFlow's kernel to exit.
    """
    import papermill

    started = time.perf_counter()
    try:
        with contextlib.ExitStack() as stack:
            sockets = stack.enter_context(tempfile.TemporaryDirectory(prefix="medlab-kernel-"))
            if warm is None and task.preload:
                warm = _WarmKernel(task)
            if warm is not None:
                stack.callback(warm.stop)
            papermill.execute_notebook(
                str(task.notebook), str(task.output), parameters=task.parameters, kernel_name=task.kernel,
                progress_bar=progress, log_output=log_output, cwd=str(task.cwd), config=_kernel_config(sockets),
                shutdown_kernel="immediate", km=None if warm is None else warm.manager,
            )
    except Exception as error:  # PapermillExecutionError, kernel death, missing kernel ...
        raise NotebookFailed(task.notebook, getattr(error, "ename", type(error).__name__),
                             getattr(error, "evalue", str(error))) from None
    return time.perf_counter() - started


class _WarmKernel:
    """A kernel started before its notebook is ready, running the task's ``preload`` meanwhile.

    A worker with nothing ready to run starts one for the first notebook waiting, so that when its needs are
    met its first cell runs at once: the kernel's start (0.5 s) and a lesson's TensorFlow and Keras imports
    (3-4 s) are already done, and done while a core was free (an idle worker means fewer notebooks run than
    there are workers).
    """

    def __init__(self, task: Task):
        from jupyter_client.manager import KernelManager

        self.suits = _warm_key(task)
        if self.suits[0] is None:
            raise ValueError(f"{task.notebook.name} names no kernel")  # papermill will say so when it runs
        self._folder = tempfile.TemporaryDirectory(prefix="medlab-kernel-")
        self.manager = KernelManager(kernel_name=self.suits[0], config=_kernel_config(self._folder.name))
        # papermill's client of a kernel it did not start keeps its channels open ("Could not destroy zmq context"
        # when it is collected): remember the clients made, and close them in stop()
        self._clients = []
        make_client = self.manager.client

        def remembered_client(**options):
            self._clients.append(make_client(**options))
            return self._clients[-1]

        self.manager.client = remembered_client
        preload = [f"--IPKernelApp.exec_lines={task.preload}"] if task.preload else []
        if set(preload) <= set(self.manager.kernel_spec.argv):  # the kernel runs it already (medlab's: install_kernel)
            preload = []
        # papermill's kernels keep no history file either
        self.manager.start_kernel(extra_arguments=["--HistoryManager.hist_file=:memory:", *preload],
                                  cwd=str(task.cwd))

    def stop(self) -> None:
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.stop_channels()
        with contextlib.suppress(Exception):  # it may have died already
            self.manager.shutdown_kernel(now=True)
        self._folder.cleanup()


def _warm_key(task: Task) -> tuple[str, str, str]:
    """What a kernel started ahead must match to run ``task``: kernel name, working folder, preload."""
    import nbformat

    kernel = task.kernel or nbformat.read(task.notebook, as_version=4).metadata.get("kernelspec", {}).get("name")
    return kernel, str(task.cwd), task.preload


def _kernel_config(folder: str):
    """The kernel talks over Unix sockets in ``folder`` (POSIX), not TCP ports.

    jupyter_client picks free TCP ports and the kernel binds them a moment later: two kernels started at
    once by two processes can pick the same one ("Address already in use", then "Kernel died before replying
    to kernel_info", seen once in ``make test``). Sockets in a folder of their own cannot collide.
    """
    from traitlets.config import Config

    return Config({"KernelManager": {"transport": "ipc", "ip": f"{folder}/kernel"}}) if os.name == "posix" else Config()


def _worker(connection) -> None:
    """A child process's whole work: execute the tasks it is sent, one at a time, and send back each one's time.

    papermill is imported once, before the first task arrives. Messages: ``("warm", task)`` starts a kernel for
    ``task`` ahead (:class:`_WarmKernel`), ``("run", task, progress)`` executes it (in the warm kernel if that
    suits it), ``None`` ends the loop. A failure is sent back as its reason and detail.
    """
    import papermill  # noqa: F401 - imported here, while the worker waits

    warm = None
    try:
        while (message := connection.recv()) is not None:
            kind, task, *progress = message
            if kind == "warm":
                with contextlib.suppress(Exception):  # no warm kernel: papermill starts one (and reports why not)
                    warm = warm or _WarmKernel(task)
                continue
            if warm is not None and warm.suits != _warm_key(task):
                warm.stop()
                warm = None
            try:
                connection.send({"seconds": _papermill(task, progress[0], log_output=False, warm=warm)})
            except NotebookFailed as failure:
                connection.send({"reason": failure.reason, "detail": failure.detail})
            warm = None
    except EOFError:  # the parent has gone
        pass
    except BaseException as error:  # noqa: BLE001 - anything else (an interrupt too) must reach the parent
        with contextlib.suppress(OSError):
            connection.send({"reason": type(error).__name__, "detail": str(error)})
    finally:
        if warm is not None:
            warm.stop()
        connection.close()


def run_notebooks(tasks: list[Task], at_once: int = 1, progress: bool = True) -> dict[str, float]:
    """Execute ``tasks`` (in notebook order), at most ``at_once`` at a time; return each one's wall time.

    With ``at_once=1`` they run one after the other in this process, with a progress bar and the cells'
    output streamed to the log. With more, ``at_once`` worker processes run them (a progress bar per worker,
    no streamed output), each as soon as the notebooks it needs (:data:`NEEDS`) have finished, in the order
    of :func:`execution_order`. The first failure stops the notebooks still running and raises
    :class:`NotebookFailed`.
    """
    if at_once < 1:
        raise ValueError(f"at_once must be at least 1, got {at_once}")
    if at_once == 1 or len(tasks) == 1:
        timings = {}
        for task in tasks:
            print(f"[medlab] {task.notebook.name} ...", flush=True)
            timings[task.notebook.stem] = round(execute(task, progress=progress, log_output=progress), 2)
            print(f"[medlab] {task.notebook.name} done in {timings[task.notebook.stem]:.1f} s", flush=True)
        return timings
    return _run_side_by_side(tasks, at_once, progress)


def _run_side_by_side(tasks: list[Task], at_once: int, progress: bool) -> dict[str, float]:
    """``at_once`` worker processes (:func:`_worker`) take the notebooks whose needs are met; HTML is rendered here.

    A worker is free for the next notebook as soon as papermill returns: this process renders the finished
    notebook's HTML in a thread meanwhile (rendering is light, and nothing waits for the HTML).
    """
    from concurrent.futures import ThreadPoolExecutor

    by_stem = {task.notebook.stem: task for task in tasks}
    waits = waits_for(list(by_stem))
    waiting = execution_order(list(by_stem))
    context = multiprocessing.get_context("spawn")  # a clean interpreter: no inherited threads or TensorFlow
    workers = [_Worker(context, slot) for slot in range(min(at_once, len(tasks)))]
    timings: dict[str, float] = {}
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="medlab-html") as renderer:
        rendered = []
        try:
            while waiting or any(worker.running for worker in workers):
                ready = [stem for stem in waiting if waits[stem] <= timings.keys()]
                _dispatch(workers, waiting, ready, by_stem, progress)
                # (something always runs here: a notebook waits only for earlier ones, so the first one waiting can start)
                for worker in _finished(workers):
                    stem, worker.running = worker.running, None
                    result = _result(worker.connection, worker.process)
                    if "seconds" not in result:
                        for other in workers:
                            if other.running:
                                print(f"[medlab] stopping {other.running}.ipynb", flush=True)
                        _stop([other.process for other in workers])
                        if by_stem[stem].output.exists():
                            render_html(by_stem[stem].output)
                        raise NotebookFailed(by_stem[stem].notebook, result["reason"], result["detail"])
                    timings[stem] = round(result["seconds"], 2)
                    rendered.append(renderer.submit(render_html, by_stem[stem].output))
                    print(f"[medlab] {stem}.ipynb done in {timings[stem]:.1f} s", flush=True)
            for worker in workers:
                worker.send(None)
                worker.process.join()
            for future in rendered:
                future.result()  # an HTML file that could not be written raises here
        finally:
            _stop([worker.process for worker in workers])
    return {stem: timings[stem] for stem in by_stem if stem in timings}


class _Worker:
    """This process's handle on a spawned :func:`_worker`: its pipe, the notebook it runs, whether it has a warm kernel."""

    def __init__(self, context, slot: int):
        self.connection, there = context.Pipe()
        self.process = context.Process(target=_worker, args=(there,), name=f"medlab-notebooks-{slot + 1}")
        self.process.start()
        there.close()
        self.slot, self.running, self.warm = slot, None, False

    def send(self, message) -> None:
        with contextlib.suppress(OSError):  # a worker that died (broken pipe, reset) is reported when its result is read
            self.connection.send(message)


def _dispatch(workers: list[_Worker], waiting: list[str], ready: list[str], by_stem: dict, progress: bool) -> None:
    """Start ``ready`` notebooks on idle workers, those with a warm kernel first; warm kernels for the rest waiting."""
    idle = sorted((worker for worker in workers if not worker.running), key=lambda worker: not worker.warm)
    for stem in ready[:len(idle)]:
        worker = idle.pop(0)
        bar = {"desc": stem, "position": worker.slot, "leave": False} if progress else False
        worker.send(("run", by_stem[stem], bar))
        worker.running, worker.warm = stem, False
        waiting.remove(stem)
        print(f"[medlab] {stem}.ipynb started ({sum(bool(other.running) for other in workers)} running)", flush=True)
    unwarmed = [worker for worker in idle if not worker.warm]
    for worker in unwarmed[:max(0, len(waiting) - (len(idle) - len(unwarmed)))]:
        worker.send(("warm", by_stem[waiting[0]]))
        worker.warm = True


def _finished(workers: list[_Worker]) -> list[_Worker]:
    """Wait until a running worker reports (or dies); return those that did."""
    busy = {}
    for worker in workers:
        if worker.running:
            busy[worker.connection] = busy[worker.process.sentinel] = worker
    finished = []
    for ready in wait(list(busy)):
        if busy[ready] not in finished:
            finished.append(busy[ready])
    return finished


def _result(receiver, process) -> dict:
    """What a finished child sent: its time, why its notebook failed, or (it sent nothing) how it exited."""
    try:
        if receiver.poll():
            return receiver.recv()
    except (EOFError, OSError):
        pass
    process.join(5)
    return {"reason": "ChildProcessError", "detail": f"the process running it exited with code {process.exitcode} "
            "(called from a script? guard the call with `if __name__ == \"__main__\":`, as multiprocessing needs)"}


def _stop(processes: list, grace_seconds: float = 10.0) -> None:
    """Interrupt workers still running (papermill then shuts its kernel down), terminate them if they hang."""
    for process in processes:
        if process.is_alive():
            os.kill(process.pid, signal.SIGINT)
    deadline = time.monotonic() + grace_seconds
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.terminate()
            process.join()
