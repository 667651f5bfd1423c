"""Official MedMNIST files: where they live, how to fetch them, how to check them.

``make data`` calls :func:`download_medmnist`, which fetches the official
file from Zenodo and checks its MD5 against the value MedMNIST publishes.
Without internet it stops with a message that says where to put the file.
A local copy with other bytes (for example one rebuilt from partial copies)
is still accepted by :func:`medlab.data.load_dataset` when given by path: the
MD5 check guards downloads, the sha256 fingerprint in every report says
exactly which bytes a result came from.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from medlab import config

ZENODO_RECORD = "https://zenodo.org/records/10519652/files"
MEDMNIST_LICENCE = "CC BY 4.0 (MedMNIST v2, Yang et al., Scientific Data 10, 41, 2023)"
SIZES = (28, 64, 128, 224)


@dataclass(frozen=True)
class MedMNISTInfo:
    """What MedMNIST publishes about one 2D, single-label dataset."""

    flag: str
    class_names: tuple[str, ...]
    channels: int
    md5: dict[int, str]  # image size -> MD5 of the official file
    licence: str = MEDMNIST_LICENCE

    def file_name(self, size: int = 28) -> str:
        return f"{self.flag}.npz" if size == 28 else f"{self.flag}_{size}.npz"

    def url(self, size: int = 28) -> str:
        return f"{ZENODO_RECORD}/{self.file_name(size)}?download=1"


# MD5 values as published in MedMNIST's own ``info.py`` (v3, Zenodo record 10519652).
MEDMNIST: dict[str, MedMNISTInfo] = {
    info.flag: info
    for info in (
        MedMNISTInfo(
            "pneumoniamnist", ("normal", "pneumonia"), 1,
            {28: "28209eda62fecd6e6a2d98b1501bb15f", 64: "8f4eceb4ccffa70c672198ea285246c6",
             128: "05b46931834c231683c68f40c47b2971", 224: "d6a3c71de1b945ea11211b03746c1fe1"},
        ),
        MedMNISTInfo(
            "breastmnist", ("malignant", "normal, benign"), 1,
            {28: "750601b1f35ba3300ea97c75c52ff8f6", 64: "742edef2a1fd1524b2efff4bd7ba9364",
             128: "363e4b3f8d712e9b5de15470a2aaadf1", 224: "b56378a6eefa9fed602bb16d192d4c8b"},
        ),
        MedMNISTInfo(
            "octmnist",
            ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"), 1,
            {28: "c68d92d5b585d8d81f7112f81e2d0842", 64: "e229e9440236b774d9f0dfef9d07bdaf",
             128: "0a97e76651ace45c5d943ee3f65b63ae", 224: "abc493b6d529d5de7569faaef2773ba3"},
        ),
        MedMNISTInfo(
            "bloodmnist",
            ("basophil", "eosinophil", "erythroblast", "immature granulocytes", "lymphocyte",
             "monocyte", "neutrophil", "platelet"), 3,
            {28: "7053d0359d879ad8a5505303e11de1dc", 64: "2b94928a2ae4916078ca51e05b6b800b",
             128: "adace1e0ed228fccda1f39692059dd4c", 224: "b718ff6835fcbdb22ba9eacccd7b2601"},
        ),
        MedMNISTInfo(
            "pathmnist",
            ("adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
             "normal colon mucosa", "cancer-associated stroma",
             "colorectal adenocarcinoma epithelium"), 3,
            {28: "a8b06965200029087d5bd730944a56c1", 64: "55aa9c1e0525abe5a6b9d8343a507616",
             128: "ac42d08fb904d92c244187169d1fd1d9", 224: "2c51a510bcdc9cf8ddb2af93af1eadec"},
        ),
        MedMNISTInfo(
            "dermamnist",
            ("actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
             "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
             "vascular lesions"), 3,
            {28: "0744692d530f8e62ec473284d019b0c7", 64: "b70a2f5635c6199aeaa28c31d7202e1f",
             128: "2defd784463fa5243564e855ed717de1", 224: "8974907d8e169bef5f5b96bc506ae45d"},
            licence="CC BY-NC 4.0 (DermaMNIST, MedMNIST v2)",
        ),
    )
}

_FLAG_PATTERN = re.compile(r"^(?P<flag>[a-z0-9]+mnist)(?:_(?P<size>\d+))?$")


class DownloadError(RuntimeError):
    """A file could not be fetched or failed its checksum; the message says what to do."""


def parse_medmnist_name(name: str) -> tuple[str, int] | None:
    """``'pneumoniamnist_64'`` -> ``('pneumoniamnist', 64)``; None if not a MedMNIST name."""
    match = _FLAG_PATTERN.match(Path(name).stem.lower())
    if not match:
        return None
    return match["flag"], int(match["size"] or 28)


def medmnist_path(flag: str, size: int = 28, directory: Path | None = None) -> Path:
    """Where ``make data`` puts (and ``load_dataset`` looks for) an official file."""
    info = _info(flag)
    return Path(directory or config.medmnist_dir()) / info.file_name(size)


def _info(flag: str) -> MedMNISTInfo:
    if flag not in MEDMNIST:
        raise ValueError(
            f"unknown MedMNIST flag {flag!r}; known 2D single-label flags: {', '.join(sorted(MEDMNIST))}. "
            "Any other MedMNIST .npz file can still be loaded by path."
        )
    return MEDMNIST[flag]


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(url: str, destination: Path, md5: str | None, timeout: float = 30.0,
          progress: bool = True) -> Path:
    """Download ``url`` to ``destination`` atomically, checking ``md5`` when given.

    The file is written under a temporary name and only renamed into place
    after the checksum matches, so a failed or interrupted download never
    leaves a file that a later run would trust.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.with_name(f".{destination.name}.{os.getpid()}.part")
    try:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(temporary, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0) or None
                bar = None
                if progress:
                    # text bars (tqdm.auto warns "IProgress not found" in Jupyter without ipywidgets)
                    from tqdm import tqdm

                    bar = tqdm(total=total, unit="B", unit_scale=True, desc=destination.name)
                for chunk in iter(lambda: response.read(1 << 16), b""):
                    out.write(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
                if bar is not None:
                    bar.close()
        except (urllib.error.URLError, OSError, TimeoutError) as error:
            reason = getattr(error, "reason", error)
            raise DownloadError(
                f"could not download {url} ({reason}).\n"
                f"If this machine is offline, fetch the file elsewhere and put it at {destination}, "
                "or pass its path as the dataset (DATASET=/path/to/file.npz)."
            ) from None
        if md5 is not None:
            actual = file_md5(temporary)
            if actual != md5:
                raise DownloadError(
                    f"checksum mismatch for {url}: expected MD5 {md5}, got {actual}. "
                    "The download is incomplete or the file changed upstream; nothing was kept."
                )
        os.replace(temporary, destination)
    finally:
        if temporary.exists():
            temporary.unlink()
    return destination


def download_medmnist(flag: str = "pneumoniamnist", size: int = 28, directory: Path | None = None,
                      progress: bool = True, url: str | None = None) -> Path:
    """Fetch an official MedMNIST file into ``data/medmnist/`` (skipped when already verified)."""
    info = _info(flag)
    if size not in info.md5:
        raise ValueError(f"{flag} comes in sizes {sorted(info.md5)}, not {size}")
    destination = medmnist_path(flag, size, directory)
    if destination.exists() and file_md5(destination) == info.md5[size]:
        return destination
    return fetch(url or info.url(size), destination, info.md5[size], progress=progress)
