import dataclasses
import json
import os
import subprocess
import sys
import time

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from medlab import config, execution
from medlab.execution import NotebookFailed, Task, execution_order, run_notebooks, waits_for

LESSONS = ["01_eda", "02_augmentation", "03_scratch_cnn", "04_transfer_learning", "05_fine_tuning",
           "06_evaluation", "07_tflite"]


def test_what_each_lesson_waits_for():
    waits = waits_for(LESSONS)
    assert waits["03_scratch_cnn"] == set() and waits["04_transfer_learning"] == set()
    assert waits["05_fine_tuning"] == {"04_transfer_learning"}
    assert waits["06_evaluation"] == {"03_scratch_cnn", "04_transfer_learning", "05_fine_tuning"}
    assert waits["07_tflite"] == set(LESSONS[:-1])  # it times inference: nothing may run beside it
    assert waits_for(["05_fine_tuning", "06_evaluation"])["06_evaluation"] == {"05_fine_tuning"}  # only those run
    assert waits_for([*LESSONS, "08_mine"])["08_mine"] == set(LESSONS)  # not in NEEDS: waits for every earlier one


def test_the_longest_chain_starts_first():
    # 04 -> 05 -> 06 -> 07 is the longest chain; 03 -> 06 -> 07 is shorter, 01 and 02 only feed 07
    assert execution_order(LESSONS) == ["04_transfer_learning", "05_fine_tuning", "06_evaluation", "07_tflite",
                                        "03_scratch_cnn", "01_eda", "02_augmentation"]
    assert execution_order(["01_eda", "08_mine"]) == ["01_eda", "08_mine"]


def test_every_lesson_is_declared():
    assert {stem.split("_")[0] for stem in LESSONS} == set(execution.NEEDS)
    assert sorted(path.stem for path in config.NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb")) == LESSONS


def _notebook(folder, stem, body):
    path = folder / f"{stem}.ipynb"
    notebook = new_notebook(cells=[new_code_cell(body)])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, path)
    return Task(path, folder / "out" / path.name, kernel="python3")


def _timed(stem, seconds):
    """A cell that records when it started and ended (and its kernel's process id), sleeping in between."""
    return (f"import json, os, time\nstarted = time.time()\ntime.sleep({seconds})\n"
            f"open({stem + '.json'!r}, 'w').write(json.dumps([started, time.time(), os.getpid()]))")


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "NOTEBOOKS_DIR", tmp_path)  # the notebooks' working directory
    (tmp_path / "out").mkdir()
    return tmp_path


def test_independent_notebooks_run_side_by_side_and_a_dependent_one_waits(folder):
    tasks = [_notebook(folder, "01_first", _timed("01_first", 3)),
             _notebook(folder, "04_second", _timed("04_second", 3)),
             _notebook(folder, "05_needs_04", "import json\nprint(json.load(open('04_second.json')))")]
    timings = run_notebooks(tasks, at_once=2, progress=False)
    assert list(timings) == ["01_first", "04_second", "05_needs_04"]
    first, second = (json.loads((folder / f"{stem}.json").read_text()) for stem in ("01_first", "04_second"))
    assert first[0] < second[1] and second[0] < first[1]  # each started before the other ended
    assert (folder / "out" / "05_needs_04.html").exists()  # it found lesson 04's file: it ran after it


def test_one_at_a_time_runs_in_order(folder):
    tasks = [_notebook(folder, "01_first", _timed("01_first", 1)), _notebook(folder, "02_second", _timed("02_second", 1))]
    assert list(run_notebooks(tasks, at_once=1, progress=False)) == ["01_first", "02_second"]
    first, second = (json.loads((folder / f"{stem}.json").read_text()) for stem in ("01_first", "02_second"))
    assert first[1] <= second[0]
    with pytest.raises(ValueError, match="at least 1"):
        run_notebooks(tasks, at_once=0)


@pytest.mark.skipif(os.name != "posix", reason="Unix sockets")
def test_kernels_talk_over_unix_sockets_that_cannot_collide(folder):
    """TCP ports picked by two processes at once collided once in make test: the kernel died at start."""
    task = _notebook(folder, "01_transport", "import ipykernel, json\n"
                                             "info = json.loads(ipykernel.get_connection_info())\n"
                                             "open('transport.json', 'w').write(json.dumps(info))")
    run_notebooks([task], progress=False)
    info = json.loads((folder / "transport.json").read_text())
    assert info["transport"] == "ipc" and "medlab-kernel-" in info["ip"]


def test_a_failure_stops_the_notebook_beside_it(folder):
    tasks = [_notebook(folder, "01_fails", "import time\ntime.sleep(2)\nraise RuntimeError('planted failure')"),
             _notebook(folder, "02_slow", "import os\nopen('02_slow.pid', 'w').write(str(os.getpid()))\n"
                                          "import time\ntime.sleep(120)")]
    started = time.monotonic()
    with pytest.raises(NotebookFailed, match="01_fails.ipynb failed: RuntimeError: planted failure"):
        run_notebooks(tasks, at_once=2, progress=False)
    assert time.monotonic() - started < 60  # not the 120 s the other notebook would have slept
    assert "planted failure" in (folder / "out" / "01_fails.html").read_text()
    kernel = int((folder / "02_slow.pid").read_text())
    deadline = time.monotonic() + 15
    while _alive(kernel) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive(kernel), "the stopped notebook's kernel is still running"


def _alive(pid: int) -> bool:
    """Whether a process runs (a zombie waiting to be reaped does not)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_notebooks_at_once_from_the_environment(monkeypatch):
    monkeypatch.delenv("MEDLAB_NOTEBOOKS_AT_ONCE", raising=False)
    assert config.notebooks_at_once() == min(2, config.cpu_count())
    monkeypatch.setenv("MEDLAB_NOTEBOOKS_AT_ONCE", "3")
    assert config.notebooks_at_once() == 3
    monkeypatch.setenv("MEDLAB_NOTEBOOKS_AT_ONCE", "zero")
    with pytest.raises(ValueError, match="MEDLAB_NOTEBOOKS_AT_ONCE"):
        config.notebooks_at_once()


def test_a_script_without_a_main_guard_is_told_so(folder):
    """Worker processes are spawned: they re-import the calling script, which must guard its call."""
    tasks = [_notebook(folder, stem, "print('ran')") for stem in ("01_first", "02_second")]
    script = folder / "unguarded.py"
    listed = ", ".join(f"Task(Path({str(task.notebook)!r}), Path({str(task.output)!r}), kernel='python3')"
                       for task in tasks)
    script.write_text("from pathlib import Path\nfrom medlab.execution import Task, run_notebooks\n"
                      f"run_notebooks([{listed}], at_once=2, progress=False)\n")
    finished = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                              cwd=folder, env={**os.environ, "PYTHONPATH": str(config.PROJECT_ROOT)})
    assert finished.returncode != 0
    assert "ChildProcessError" in finished.stderr and "__main__" in finished.stderr


def test_a_waiting_notebook_runs_in_a_kernel_started_ahead_with_its_preload(folder):
    """While 05 waits for 04, the idle worker starts 05's kernel and runs the preload: 05 then runs in it."""
    preload = "import os as _preloaded; open('preloaded.pid', 'w').write(str(_preloaded.getpid())); del _preloaded"
    tasks = [_notebook(folder, "01_quick", "print('quick')"), _notebook(folder, "04_slow", _timed("04_slow", 4)),
             _notebook(folder, "05_needs_04", "import os\nassert '_preloaded' not in globals()\n"
                                              "open('05.pid', 'w').write(str(os.getpid()))")]
    tasks = [dataclasses.replace(task, preload=preload) for task in tasks]
    run_notebooks(tasks, at_once=2, progress=False)
    assert (folder / "05.pid").read_text() == (folder / "preloaded.pid").read_text()


def test_a_notebook_run_at_once_gets_its_preload_and_its_output_stays_out_of_the_cells(folder):
    """No kernel was started ahead (one at a time): the preload still runs first, in the notebook's own kernel,
    and what it prints (TensorFlow's loading lines in the lessons; file descriptor 2 here) is not in a cell."""
    preload = ("import os as _preloaded; _preloaded.write(2, b'PRELOAD-CHATTER\\n'); "
               "open('preloaded.pid', 'w').write(str(_preloaded.getpid())); del _preloaded")
    task = dataclasses.replace(_notebook(folder, "01_first", "import os\nopen('01.pid', 'w').write(str(os.getpid()))"),
                               preload=preload)
    run_notebooks([task], at_once=1, progress=False)
    assert (folder / "01.pid").read_text() == (folder / "preloaded.pid").read_text()
    assert "PRELOAD-CHATTER" not in task.output.read_text()


def test_stopping_a_kernel_started_ahead_closes_the_clients_made_for_it(folder):
    """papermill leaves open the channels of a client of a kernel it did not start; collected later, the client
    warned "Could not destroy zmq context" into make reports' log."""
    warm = execution._WarmKernel(_notebook(folder, "01_first", "print(1)"))
    client = warm.manager.client()
    client.start_channels()
    client.wait_for_ready(timeout=60)  # as papermill's client is by the time stop() runs (its channels all started)
    assert client.channels_running
    warm.stop()
    assert not client.channels_running


def test_a_preload_the_kernel_already_runs_is_not_run_twice(folder, tmp_path, monkeypatch):
    """medlab's registered kernel runs the lessons' preload itself (install_kernel): a task's own copy is not added."""
    preload = f"open({str(tmp_path / 'count.txt')!r}, 'a').write('x')"
    monkeypatch.setattr(execution, "LESSON_PRELOAD", preload)
    execution.install_kernel("medlab-preloaded", prefix=str(tmp_path / "env"))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "env" / "share" / "jupyter"))
    task = dataclasses.replace(_notebook(folder, "01_first", "print(1)"), kernel="medlab-preloaded", preload=preload)
    warm = execution._WarmKernel(task)
    client = warm.manager.client()
    client.start_channels()
    client.wait_for_ready(timeout=60)  # the kernel has run its start-up lines by now
    warm.stop()
    assert (tmp_path / "count.txt").read_text() == "x"


def test_the_lessons_preload_loads_tensorflow_and_keras_and_binds_no_names():
    # a fresh interpreter: in this one, other tests may have imported them already
    script = ("import sys\nnamespace = {}\nexec(sys.argv[1], namespace)\n"
              "print(sorted(namespace), sorted({'medlab', 'tensorflow', 'keras'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", script, execution.LESSON_PRELOAD], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[-2] == "['__builtins__'] ['keras', 'medlab', 'tensorflow']"


def test_the_html_page_gives_figures_their_alternative_text(tmp_path):
    """A PNG output with ``alt`` metadata (medlab.plots.show_alt_text) keeps it in the HTML; others get nbconvert's."""
    from nbformat.v4 import new_output

    cell = new_code_cell("plt.show()", outputs=[
        new_output("display_data", data={"image/png": "iVBORw0KGgo=\n"},
                   metadata={"image/png": {"alt": 'Figure: ROC "curves" <both>.', "width": 320}}),
        new_output("display_data", data={"image/png": "iVBORw0KGgp=\n"})])
    path = tmp_path / "figures.ipynb"
    nbformat.write(new_notebook(cells=[cell]), path)
    from bs4 import BeautifulSoup  # nbconvert's own HTML parser

    images = BeautifulSoup(execution.render_html(path).read_text(), "html.parser").find_all("img")
    assert [(image["src"].strip(), image["alt"]) for image in images] == [
        ("data:image/png;base64,iVBORw0KGgo=", 'Figure: ROC "curves" <both>.'),
        ("data:image/png;base64,iVBORw0KGgp=", "No description has been provided for this image")]
    assert images[0]["width"] == "320"  # a retina PNG's display size kept
    assert "text/html" not in nbformat.read(path, as_version=4).cells[0].outputs[0].data  # the notebook is unchanged


def test_the_html_page_shows_a_progress_bar_once_in_its_last_state(tmp_path):
    """A text progress bar arrives as many stream outputs joined by carriage returns; the page shows its end."""
    from nbformat.v4 import new_output

    bar = ["\rimages:   0%| | 0/90", "\rimages:  50%|5| 45/90", "\rimages: 100%|#| 90/90\n"]
    cell = new_code_cell("load()", outputs=[new_output("stream", name="stderr", text=text) for text in bar]
                         + [new_output("stream", name="stdout", text="loaded 90 images\n")])
    path = tmp_path / "bar.ipynb"
    nbformat.write(new_notebook(cells=[cell]), path)
    page = execution.render_html(path).read_text()
    assert "90/90" in page and "loaded 90 images" in page
    assert "45/90" not in page and "0/90" not in page.replace("90/90", "")
    assert len(nbformat.read(path, as_version=4).cells[0].outputs) == 4  # the notebook is unchanged
