"""A small web app around a run's model: ``medlab serve --run reports/<run>`` (or ``make serve``).

- ``GET /``: a page where a person drops or picks an image and sees the
  predicted class, a bar per class, the threshold in use and a Grad-CAM overlay;
- ``POST /predict`` (multipart field ``file``): the same as JSON;
- ``GET /health``; FastAPI's OpenAPI docs at ``/docs``.

Uploads are checked before any model runs: over ``max_upload_bytes`` is 413,
not an image is 415, corrupt or truncated or a decompression bomb (Pillow's
pixel limit) is 422, a missing ``file`` field is 422. Accepted images are
decoded by the training pipeline's own code (:meth:`Predictor.predict_files`).
The server listens on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import base64
import io
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
from fastapi import FastAPI, File, HTTPException, UploadFile
from fastapi.responses import HTMLResponse

from medlab.html import render
from medlab.predict import Predictor

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000  # Pillow refuses (as a decompression bomb) anything over twice this


IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def _looks_like_an_image(content: bytes) -> bool:
    """True when the bytes start like an image format Pillow reads (so a failure means corruption)."""
    return content.startswith(IMAGE_SIGNATURES) or (content[:4] == b"RIFF" and content[8:12] == b"WEBP")


def _check_image(content: bytes) -> str:
    """Return Pillow's format name, or raise the HTTP error the upload deserves."""
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    if content[128:132] == b"DICM":  # DICOM Part 10: medlab.data.dicom checks and decodes it
        return "DICOM"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(content)) as image:
                image_format = image.format
                image.load()  # full decode: catches truncation and corruption
    except UnidentifiedImageError:
        if _looks_like_an_image(content):
            raise HTTPException(422, "corrupt image: it starts like an image file but cannot be read") from None
        raise HTTPException(415, "not an image file that medlab can read (PNG, JPEG, BMP, GIF, TIFF, WebP, DICOM)") \
            from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise HTTPException(422, f"image too large to decode safely: {error}") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise HTTPException(422, f"corrupt or truncated image: {error}") from None
    return image_format or "unknown"


def create_app(predictor: Predictor, max_upload_bytes: int = MAX_UPLOAD_BYTES) -> FastAPI:
    app = FastAPI(title="medlab", description="Predictions from a medlab run's model. Not for clinical use.",
                  version="1")
    lock = threading.Lock()  # one inference at a time: Keras and LiteRT models are not re-entrant

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "run": predictor.run_dir.name, "model": predictor.model_name,
                "kind": predictor.kind, "classes": predictor.class_names, "threshold": predictor.threshold,
                "synthetic": predictor.synthetic}

    @app.post("/predict")
    def predict(file: UploadFile = File(...)) -> dict:  # noqa: B008  (FastAPI's declaration style)
        content = file.file.read(max_upload_bytes + 1)
        if len(content) > max_upload_bytes:
            raise HTTPException(413, f"upload larger than {max_upload_bytes // (1024 * 1024)} MiB")
        if not content:
            raise HTTPException(422, "empty upload")
        _check_image(content)
        suffix = Path(file.filename or "upload").suffix or ".img"
        with tempfile.TemporaryDirectory(prefix="medlab-upload-") as folder:
            path = Path(folder) / f"upload{suffix}"
            path.write_bytes(content)
            with lock:
                images, _indices, errors = predictor.decode([path])
                if errors:
                    raise HTTPException(422, f"image not usable: {errors[0]}")
                result = predictor.describe(predictor.probabilities(images)[0], file.filename or "upload")
                heatmaps = predictor.gradcam(images)
        overlay = None if heatmaps is None else _overlay_png(images[0], heatmaps[0])
        body = result.as_dict()
        body.update({"file": file.filename, "threshold": predictor.threshold, "model": predictor.model_name,
                     "synthetic_model": predictor.synthetic, "gradcam_png": overlay})
        return body

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        threshold = "none" if predictor.threshold is None else f"{predictor.threshold:.3f}"
        return render("serve.html.j2", run=predictor.run_dir.name, model=predictor.model_name,
                      threshold=threshold, synthetic=predictor.synthetic)

    return app


def _overlay_png(image: np.ndarray, heatmap: np.ndarray) -> str:
    """Base64 PNG of ``heatmap`` (jet, half transparent) over the image as the model saw it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(3, 3), dpi=100)
    axis.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=255)
    axis.imshow(heatmap, cmap="jet", alpha=0.4, vmin=0, vmax=1)
    axis.axis("off")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight", pad_inches=0)
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()


def run_server(predictor: Predictor, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    uvicorn.run(create_app(predictor), host=host, port=port, log_level="info")
