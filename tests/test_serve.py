import contextlib
import io
import shutil
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from medlab.predict import Predictor
from medlab.serve import create_app


@pytest.fixture(scope="module")
def predictor(tiny_run):
    run, _ = tiny_run
    return Predictor(run)


@pytest.fixture(scope="module")
def client(predictor):
    return TestClient(create_app(predictor, max_upload_bytes=200_000))


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode) if mode != "I;16" else Image.fromarray(array.astype(np.uint16) * 257)
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def good_png(tiny_run):
    _run, dataset = tiny_run
    return png(dataset.test.images[0][..., 0])


def test_health_and_docs(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "scratch_cnn" and health["classes"] == ["normal", "pneumonia"]
    assert client.get("/openapi.json").json()["paths"]["/predict"]
    assert "Drop an image" in client.get("/").text


def test_good_image_matches_medlab_predict(client, good_png, predictor, tmp_path):
    response = client.post("/predict", files={"file": ("case.png", good_png, "image/png")})
    assert response.status_code == 200
    body = response.json()
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    path = tmp_path / "case.png"
    path.write_bytes(good_png)
    (cli,) = predictor.predict_files([path])
    assert body["predicted_class"] == cli.predicted_class
    assert body["probabilities"]["pneumonia"] == pytest.approx(cli.probabilities["pneumonia"], abs=1e-6)
    assert body["threshold"] == predictor.threshold and body["gradcam_png"]


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "I;16", "P"])
def test_any_mode_and_size_is_converted_like_training(client, mode):
    array = np.random.default_rng(0).integers(0, 255, (50, 70), dtype=np.uint8)
    response = client.post("/predict", files={"file": ("x.png", png(array, mode), "image/png")})
    assert response.status_code == 200, response.text


def test_error_cases_are_clear_json_never_500(client, good_png):
    cases = {
        "text": (("notes.txt", b"just some text", "text/plain"), 415),
        "corrupt": (("x.png", b"\x89PNG\r\n\x1a\n" + bytes(range(200)), "image/png"), 422),
        "truncated": (("x.png", good_png[: len(good_png) // 2], "image/png"), 422),
        "empty": (("x.png", b"", "image/png"), 422),
        "too large": (("x.png", b"\x00" * 300_000, "image/png"), 413),
    }
    for name, (upload, status) in cases.items():
        response = client.post("/predict", files={"file": upload})
        assert response.status_code == status, name
        assert isinstance(response.json()["detail"], str | list), name
    wrong_field = client.post("/predict", files={"image": ("x.png", good_png, "image/png")})
    assert wrong_field.status_code == 422 and "file" in str(wrong_field.json()["detail"])


def test_decompression_bomb_is_refused(client):
    buffer = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(buffer, format="PNG")  # 144 Mpx, a few kB on disk
    response = client.post("/predict", files={"file": ("bomb.png", buffer.getvalue(), "image/png")})
    assert response.status_code == 422 and "too large" in response.json()["detail"]


@contextlib.contextmanager
def serving(predictor):
    """The app on a real loopback port, as `medlab serve` runs it."""
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(predictor), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def live_server(predictor):
    with serving(predictor) as url:
        yield url


def test_loopback_load(live_server, good_png):
    """48 requests, 8 at a time: all succeed; median and p95 latency are printed."""
    import httpx

    def one(_):
        started = time.perf_counter()
        response = httpx.post(f"{live_server}/predict", files={"file": ("x.png", good_png, "image/png")}, timeout=60)
        return response.status_code, (time.perf_counter() - started) * 1000

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, range(48)))
    assert all(status == 200 for status, _ in results)
    latencies = sorted(ms for _, ms in results)
    print(f"\nload test: {len(results)} requests, 8 concurrent: median {statistics.median(latencies):.1f} ms, "
          f"p95 {latencies[int(0.95 * len(latencies)) - 1]:.1f} ms")


BROWSER = pytest.mark.skipif(
    not (shutil.which("chromium") and shutil.which("chromedriver")),
    reason="Debian chromium and chromium-driver not installed (make test installs them when run as root)")


def upload_in_browser(url: str, image: np.ndarray, tmp_path) -> tuple[str, int, int]:
    """Open the page in headless Chromium, drop ``image`` on it; return the predicted class, bars, chosen bars."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    image_path = tmp_path / "case.png"
    Image.fromarray(image[..., 0]).save(image_path)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(url)
        driver.find_element(By.ID, "file").send_keys(str(image_path))
        WebDriverWait(driver, 60).until(expected_conditions.visibility_of_element_located((By.ID, "result")))
        predicted = driver.find_element(By.ID, "predicted").text
        bars = driver.find_elements(By.CSS_SELECTOR, "#bars .bar")
        chosen = driver.find_elements(By.CSS_SELECTOR, "#bars .bar.chosen")
        assert driver.find_element(By.ID, "gradcam").get_attribute("src").startswith("data:image/png;base64,")
        driver.save_screenshot(str(tmp_path / "page.png"))
        return predicted, len(bars), len(chosen)
    finally:
        driver.quit()


@BROWSER
def test_upload_in_a_real_browser(live_server, tiny_run, tmp_path):
    _run, dataset = tiny_run
    predicted, bars, chosen = upload_in_browser(live_server, dataset.test.images[1], tmp_path)
    assert predicted in {"normal", "pneumonia"} and bars == 2 and chosen == 1


def test_four_classes_predict_and_show_four_bars(tiny_run_four_class, tmp_path):
    run, dataset = tiny_run_four_class
    predictor = Predictor(run)
    assert predictor.class_names == dataset.info.class_names and len(predictor.class_names) == 4
    client = TestClient(create_app(predictor))
    assert client.get("/health").json()["classes"] == dataset.info.class_names
    body = client.post("/predict", files={"file": ("x.png", png(dataset.test.images[2][..., 0]), "image/png")}).json()
    probabilities = body["probabilities"]
    assert list(probabilities) == dataset.info.class_names and sum(probabilities.values()) == pytest.approx(1, abs=1e-5)
    assert body["predicted_class"] == max(probabilities, key=probabilities.get)
    if shutil.which("chromium") and shutil.which("chromedriver"):
        with serving(predictor) as url:
            predicted, bars, chosen = upload_in_browser(url, dataset.test.images[2], tmp_path)
        assert predicted == body["predicted_class"] and bars == 4 and chosen == 1


def test_the_page_escapes_the_model_and_run_names(predictor, monkeypatch):
    monkeypatch.setattr(predictor, "model_name", "<script>alert(1)</script>")
    page = TestClient(create_app(predictor)).get("/").text
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
