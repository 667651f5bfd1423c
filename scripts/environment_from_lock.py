"""Write environment.yml from requirements.lock (same pins, no hashes): `make lock` runs this."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADER = """# Conda users: `conda env create -f environment.yml && conda activate medlab`,
# then, from the project folder, `python -m medlab.cli kernel --user` (registers the notebooks' kernel).
# The pip pins below are requirements.lock without its hashes (tests/test_setup.py keeps them equal);
# `make setup` (venv + pip, hash-checked) is the reference installation.
name: medlab
channels:
  - conda-forge
dependencies:
  - python=3.11
  - pip
  - pip:
"""


def pins(lock_text: str) -> list[str]:
    return re.findall(r"^([A-Za-z0-9_.\-\[\]]+==[^\s\\;]+)", lock_text, re.M)


def main() -> None:
    lock = (ROOT / "requirements.lock").read_text()
    body = "".join(f"      - {pin}\n" for pin in pins(lock)) + "      - -e .\n"
    (ROOT / "environment.yml").write_text(HEADER + body)


if __name__ == "__main__":
    main()
