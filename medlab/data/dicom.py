"""DICOM files inside class-per-folder trees: detect, check, and turn into 8-bit pictures.

A DICOM file is recognised by its ``.dcm`` suffix or, without a suffix, by the
``DICM`` marker at byte 128 (what the standard's Part 10 files carry). Each file
must hold one 2D image: multi-frame files are refused with a message naming the
file, and so are files without pixel data (RT plans, reports) and compressed
ones no installed plugin decodes. Pixels become 8-bit as a radiologist's viewer
would show them:

1. the modality LUT (rescale slope and intercept: CT values in Hounsfield units);
2. the window stored in the file (centre +- width / 2; the first, if it suggests several) or its VOI
   LUT; otherwise a window from the 0.5th to the 99.5th percentile of the image
   (:data:`PERCENTILE_WINDOW`), which ignores a few extreme pixels;
3. MONOCHROME1 (white = low values) inverted so that bright means dense everywhere;
4. scaled to 0-255. Colour files (RGB, YBR) are converted to RGB.

``PatientID`` from the header (:func:`patient_id`) groups the validation carve-out,
so one patient's images never end up in two splits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

PERCENTILE_WINDOW = (0.5, 99.5)  # the display window when the file has none: these percentiles of the image
_MAGIC_OFFSET = 128


def is_dicom(path: Path) -> bool:
    """``.dcm`` files, and any other file that carries the DICOM Part 10 ``DICM`` marker (often no suffix)."""
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as file:
            file.seek(_MAGIC_OFFSET)
            return file.read(4) == b"DICM"
    except OSError:
        return False


def read_header(path: Path) -> tuple[str, str, tuple[int, int]] | str:
    """``("DICOM", "L" or "RGB", (width, height))`` for a usable file, else why it cannot be used (one line)."""
    import pydicom

    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        return _check_header(header)
    except Exception as error:  # pydicom raises many types for broken files; the message is what matters
        return f"not a readable DICOM file ({type(error).__name__}: {str(error).splitlines()[0][:120]})"


def _check_header(header) -> tuple[str, str, tuple[int, int]] | str:
    from pydicom.pixels import get_decoder

    if "Rows" not in header or "Columns" not in header:
        kind = getattr(header.get("SOPClassUID"), "name", "unknown SOP class")
        return f"DICOM file without an image ({kind})"
    frames = int(header.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        return f"multi-frame DICOM ({frames} frames): medlab reads one 2D image per file; save each frame as a file"
    syntax = getattr(getattr(header, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None and syntax.is_compressed:
        try:
            available = get_decoder(syntax).is_available
        except (NotImplementedError, ValueError, KeyError):  # no decoder for this transfer syntax at all
            available = False
        if not available:
            return (f"compressed DICOM ({syntax.name}) that no installed plugin decodes: install "
                    "pylibjpeg with pylibjpeg-libjpeg and pylibjpeg-openjpeg, or decompress the file")
    photometric = str(header.get("PhotometricInterpretation", "MONOCHROME2"))
    mode = "L" if photometric.startswith("MONOCHROME") else "RGB"
    return "DICOM", mode, (int(header.Columns), int(header.Rows))


def pixels(path: Path | str, channels: int) -> np.ndarray:
    """The file's image as uint8 (H, W, channels), windowed as described in the module docstring."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, convert_color_space

    dataset = pydicom.dcmread(path)
    if int(dataset.get("NumberOfFrames", 1) or 1) > 1:
        raise ValueError(f"{path}: multi-frame DICOM")
    array = dataset.pixel_array
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric.startswith("MONOCHROME"):
        image = _to_uint8_grey(dataset, array, apply_modality_lut, apply_voi_lut)
        image = image[..., None]
        return image if channels == 1 else np.repeat(image, 3, axis=-1)
    if photometric.startswith("YBR") and dataset.get("PlanarConfiguration", 0) == 0:
        array = convert_color_space(array, photometric, "RGB")
    top = float(2 ** int(dataset.get("BitsStored", 8)) - 1)
    if photometric == "PALETTE COLOR":  # the colour table's entries, not the stored indices, set the range
        from pydicom.pixels import apply_color_lut

        array = apply_color_lut(array, dataset)
        top = float(np.iinfo(array.dtype).max) if np.issubdtype(array.dtype, np.integer) else 255.0
    image = _scale(array.astype(np.float64), 0.0, top)
    if channels == 1:
        image = np.round(image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)[..., None]
    return image


def _to_uint8_grey(dataset, array: np.ndarray, apply_modality_lut, apply_voi_lut) -> np.ndarray:
    values = apply_modality_lut(array, dataset).astype(np.float64)
    if "WindowCenter" in dataset and "WindowWidth" in dataset:  # the window stored with the image
        centre, width = _first(dataset.WindowCenter), _first(dataset.WindowWidth)
        low, high = centre - width / 2, centre + width / 2
    elif "VOILUTSequence" in dataset:  # a lookup table instead of a window: its output range
        values = apply_voi_lut(values, dataset, index=0).astype(np.float64)
        low, high = 0.0, float(2 ** int(dataset.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    else:
        low, high = np.percentile(values, PERCENTILE_WINDOW)
    image = _scale(values, low, high)
    if str(dataset.PhotometricInterpretation) == "MONOCHROME1":  # low values are white: invert
        image = 255 - image
    return image


def _first(value) -> float:
    """Window centre/width may hold several values (several suggested windows): the first is the default."""
    from pydicom.multival import MultiValue

    return float(value[0]) if isinstance(value, MultiValue) else float(value)


def _scale(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.clip(np.round((values - low) / (high - low) * 255.0), 0, 255).astype(np.uint8)


def patient_id(path: Path) -> str:
    """``PatientID`` from the header ('' when absent or unreadable)."""
    import pydicom

    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"]).get("PatientID", ""))
    except Exception:  # an unreadable header has no patient to group by
        return ""
