"""Byte-reproducible, atomic ``.npz`` and text writing, and file fingerprints.

``numpy.savez`` stamps the current time into its zip entries, so the same
arrays give different bytes on every save. Here every entry gets a fixed
timestamp, so the same arrays always give the same file (and sha256). Files
are written to a temporary name in the same folder and renamed into place:
an interrupted write leaves no half-written file that a later run could trust.
The temporary name is unique to the writing process and thread, so two
writers of the same file (two lessons generating the same dataset at once)
never rename each other's temporary file away.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import threading
import zipfile
from pathlib import Path

import numpy as np

_FIXED_TIME = (1980, 1, 1, 0, 0, 0)


def _temporary_name(path: Path) -> Path:
    """A name beside ``path`` that no other process or thread writes to."""
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` under a temporary name, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_name(path)
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path


def write_npz_atomic(path: Path, arrays: dict[str, np.ndarray], compress: bool = True) -> Path:
    """Write ``arrays`` to ``path`` as a deterministic ``.npz``, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_name(path)
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


class FileLockedError(BlockingIOError):
    """Another process holds :func:`one_writer`'s lock, and the caller asked not to wait."""


@contextlib.contextmanager
def one_writer(path: Path, progress: bool = True, wait: bool = True):
    """Hold an exclusive lock for building ``path`` (a file lock beside it, ``.<name>.lock``).

    Two lessons started together on the same data (``make reports`` runs 03 and 04 side by side) would
    otherwise both generate or decode it; inside this block, check for a finished file first: the second
    one finds what the first wrote. With ``wait=False`` a held lock raises :class:`FileLockedError` instead.
    Without POSIX locks (Windows) the block only runs: both build, and the unique temporary names still
    keep every write whole.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        lock = _open_lock(path)
    except OSError:  # a read-only folder (a shared, prepared data set): nothing can be written there to guard
        yield
        return
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise FileLockedError(f"another process is writing {path}") from None
            if progress:
                print(f"[medlab] waiting for another process to finish {path.name}", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _open_lock(path: Path):
    return open(path.with_name(f".{path.name}.lock"), "a")


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
