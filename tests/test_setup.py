"""The project's own set-up promises: CI runs the README's commands, the pins agree."""

import re

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


def test_the_medlab_kernel_asks_for_onednn_as_import_medlab_does():
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec("medlab")
    except NoSuchKernel:
        pytest.skip("no medlab kernel registered here (`make setup` registers it)")
    assert spec.env.get("TF_ENABLE_ONEDNN_OPTS") == "1"  # notebooks import TensorFlow before medlab
