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
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(content)) as image:
                image_format = image.format
                image.load()  # full decode: catches truncation and corruption
    except UnidentifiedImageError:
        if _looks_like_an_image(content):
            raise HTTPException(422, "corrupt image: it starts like an image file but cannot be read") from None
        raise HTTPException(415, "not an image file that medlab can read (PNG, JPEG, BMP, GIF, TIFF, WebP)") from None
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
                    raise HTTPException(422, f"image could not be decoded: {errors[0]}")
                result = predictor.describe(predictor.probabilities(images)[0], file.filename or "upload")
                heatmaps = predictor.gradcam(images)
        overlay = None if heatmaps is None else _overlay_png(images[0], heatmaps[0])
        body = result.as_dict()
        body.update({"file": file.filename, "threshold": predictor.threshold, "model": predictor.model_name,
                     "synthetic_model": predictor.synthetic, "gradcam_png": overlay})
        return body

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.replace("{{THRESHOLD}}", "none" if predictor.threshold is None else f"{predictor.threshold:.3f}") \
            .replace("{{MODEL}}", predictor.model_name).replace("{{RUN}}", predictor.run_dir.name) \
            .replace("{{SYNTHETIC}}", "block" if predictor.synthetic else "none")

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


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>medlab: try the model</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font-family: system-ui, sans-serif; max-width: 760px; margin: 2rem auto; color: #222; padding: 0 1rem; }
#drop { border: 2px dashed #888; border-radius: 8px; padding: 2rem; text-align: center; cursor: pointer; }
#drop.over { background: #eef5ff; border-color: #36c; }
.warning { background: #fde8e8; color: #9b1c1c; padding: .5rem; border-radius: 4px; font-weight: bold; }
.bar { display: flex; align-items: center; margin: .3rem 0; }
.bar .name { width: 12rem; } .bar .track { flex: 1; background: #eee; height: 1.1rem; border-radius: 3px; }
.bar .fill { background: #4c72b0; height: 100%; border-radius: 3px; }
.bar.chosen .name { font-weight: bold; } .bar.chosen .fill { background: #c44e52; }
.bar .value { width: 4.5rem; text-align: right; font-variant-numeric: tabular-nums; }
#result { display: none; margin-top: 1.5rem; } #images { display: flex; gap: 1rem; margin-top: 1rem; }
#images img { width: 220px; border: 1px solid #ccc; }
#error { color: #b00; font-weight: bold; }
</style></head><body>
<h1>medlab: try the model</h1>
<p class="warning">Not for clinical use.</p>
<p class="warning" style="display: {{SYNTHETIC}}">This model was trained on SYNTHETIC phantoms, not patients.</p>
<p>Run <code>{{RUN}}</code>, model <code>{{MODEL}}</code>, decision threshold <b id="threshold">{{THRESHOLD}}</b>
(chosen on validation data).</p>
<div id="drop">Drop an image here, or <label><u>pick a file</u>
<input id="file" type="file" accept="image/*" style="display:none"></label></div>
<p id="error"></p>
<div id="result">
  <h2>Prediction: <span id="predicted"></span></h2>
  <p id="decision"></p>
  <div id="bars"></div>
  <div id="images"><div><div>image</div><img id="preview" alt="uploaded image"></div>
  <div><div>Grad-CAM</div><img id="gradcam" alt="Grad-CAM overlay"></div></div>
</div>
<script>
const drop = document.getElementById("drop"), input = document.getElementById("file");
drop.addEventListener("click", () => input.click());
drop.addEventListener("dragover", e => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", e => { e.preventDefault(); drop.classList.remove("over"); send(e.dataTransfer.files[0]); });
input.addEventListener("change", () => send(input.files[0]));
async function send(file) {
  if (!file) return;
  document.getElementById("error").textContent = "";
  const form = new FormData(); form.append("file", file);
  const response = await fetch("predict", { method: "POST", body: form });
  const body = await response.json();
  if (!response.ok) { document.getElementById("error").textContent = "Error " + response.status + ": " + body.detail;
                      document.getElementById("result").style.display = "none"; return; }
  document.getElementById("predicted").textContent = body.predicted_class;
  document.getElementById("decision").textContent = body.crossed_threshold === null ? "" :
    (body.crossed_threshold ? "Above" : "Below") + " the threshold of " + body.threshold.toFixed(3) + ".";
  const bars = document.getElementById("bars"); bars.innerHTML = "";
  for (const [name, p] of Object.entries(body.probabilities)) {
    const row = document.createElement("div"); row.className = "bar" + (name === body.predicted_class ? " chosen" : "");
    row.innerHTML = `<span class="name"></span><span class="track"><div class="fill" style="width:${(100 * p).toFixed(1)}%"></div></span><span class="value">${(100 * p).toFixed(1)}%</span>`;
    row.querySelector(".name").textContent = name; bars.appendChild(row);
  }
  document.getElementById("preview").src = URL.createObjectURL(file);
  const cam = document.getElementById("gradcam");
  if (body.gradcam_png) { cam.src = "data:image/png;base64," + body.gradcam_png; cam.parentElement.style.display = ""; }
  else { cam.parentElement.style.display = "none"; }
  document.getElementById("result").style.display = "block";
}
</script>
</body></html>
"""
