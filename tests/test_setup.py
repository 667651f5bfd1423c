"""The project's own set-up promises: CI runs the README's commands, the pins agree."""

import re
import sys

import pytest

from medlab import config

ROOT = config.PROJECT_ROOT


def _commands(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("make setup &&")]


def test_ci_runs_exactly_the_readme_commands():
    readme = _commands((ROOT / "README.md").read_text())
    ci = _commands((ROOT / ".ci" / "run").read_text())
    assert readme == ["make setup && make reports", "make setup && make test"]
    assert ci == readme


def test_environment_yml_pins_equal_the_lock_file():
    lock = set(re.findall(r"^([A-Za-z0-9_.\-\[\]]+==[^\s\\;]+)", (ROOT / "requirements.lock").read_text(), re.M))
    environment = set(re.findall(r"^\s+- ([A-Za-z0-9_.\-\[\]]+==\S+)$", (ROOT / "environment.yml").read_text(), re.M))
    assert lock and environment == lock


def test_core_packages_are_locked():
    lock = (ROOT / "requirements.lock").read_text()
    for package in ("tensorflow", "keras", "jupyterlab", "papermill", "nbconvert", "pandas", "matplotlib",
                    "seaborn", "scikit-learn", "nbval", "ipykernel"):
        assert re.search(rf"^{package}==", lock, re.M), package


def test_the_medlab_kernel_asks_for_onednn_and_loads_tensorflow_before_the_first_cell():
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec("medlab")
    except NoSuchKernel:
        pytest.skip("no medlab kernel registered here (`make setup` registers it)")
    assert spec.env.get("TF_ENABLE_ONEDNN_OPTS") == "1"  # notebooks import TensorFlow before medlab
    from medlab.execution import LESSON_PRELOAD

    assert spec.argv[-1] == f"--IPKernelApp.exec_lines={LESSON_PRELOAD}"  # TensorFlow's loading lines out of cells


def test_medlab_kernel_registers_the_kernel_the_notebooks_name(tmp_path):
    import json

    from medlab.cli import build_parser
    from medlab.execution import LESSON_PRELOAD, install_kernel

    spec = json.loads((install_kernel(prefix=str(tmp_path)) / "kernel.json").read_text())
    assert spec["display_name"] == "Python (medlab)" and spec["env"] == {"TF_ENABLE_ONEDNN_OPTS": "1"}
    assert spec["argv"][:3] == [sys.executable, "-Xfrozen_modules=off", "-m"]
    assert spec["argv"][-1] == f"--IPKernelApp.exec_lines={LESSON_PRELOAD}"
    notebook = json.loads((ROOT / "notebooks" / "03_scratch_cnn.ipynb").read_text())
    assert (tmp_path / "share" / "jupyter" / "kernels" / notebook["metadata"]["kernelspec"]["name"]).is_dir()
    assert build_parser().parse_args(["kernel", "--user"]).user  # `medlab kernel --user`, the README's conda step
