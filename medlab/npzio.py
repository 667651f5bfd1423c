"""Byte-reproducible, atomic ``.npz`` writing and file fingerprints.

``numpy.savez`` stamps the current time into its zip entries, so the same
arrays give different bytes on every save. Here every entry gets a fixed
timestamp, so the same arrays always give the same file (and sha256). Files
are written to a temporary name in the same folder and renamed into place:
an interrupted write leaves no half-written file that a later run could trust.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from pathlib import Path

import numpy as np

_FIXED_TIME = (1980, 1, 1, 0, 0, 0)


def write_npz_atomic(path: Path, arrays: dict[str, np.ndarray], compress: bool = True) -> Path:
    """Write ``arrays`` to ``path`` as a deterministic ``.npz``, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    compression = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    try:
        with zipfile.ZipFile(temporary, "w", compression=compression) as archive:
            for key in sorted(arrays):
                buffer = io.BytesIO()
                np.lib.format.write_array(buffer, np.asarray(arrays[key]), allow_pickle=False)
                info = zipfile.ZipInfo(f"{key}.npy", date_time=_FIXED_TIME)
                info.compress_type = compression
                archive.writestr(info, buffer.getvalue())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
