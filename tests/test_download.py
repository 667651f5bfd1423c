import hashlib
import http.server
import threading

import pytest

from medlab import download
from medlab.download import DownloadError, download_medmnist, fetch, parse_medmnist_name


@pytest.fixture
def payload(tmp_path):
    source = tmp_path / "source.npz"
    source.write_bytes(b"pretend npz bytes" * 100)
    return source, hashlib.md5(source.read_bytes()).hexdigest()


def test_fetch_checks_md5_and_writes_atomically(tmp_path, payload):
    source, md5 = payload
    target = fetch(source.as_uri(), tmp_path / "out" / "file.npz", md5, progress=False)
    assert target.read_bytes() == source.read_bytes()


def test_checksum_mismatch_keeps_nothing(tmp_path, payload):
    source, _md5 = payload
    target = tmp_path / "out" / "file.npz"
    with pytest.raises(DownloadError, match="checksum mismatch"):
        fetch(source.as_uri(), target, "0" * 32, progress=False)
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_unreachable_server_says_where_to_put_the_file(tmp_path):
    with pytest.raises(DownloadError, match=r"put it at .*file.npz"):
        fetch("http://127.0.0.1:9/file.npz", tmp_path / "file.npz", None, timeout=2, progress=False)


def test_download_over_http_from_a_local_server(tmp_path, payload, monkeypatch):
    source, md5 = payload

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(source.parent), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setitem(download.MEDMNIST, "pneumoniamnist", download.MedMNISTInfo(
            "pneumoniamnist", ("normal", "pneumonia"), 1, {28: md5}))
        url = f"http://127.0.0.1:{server.server_address[1]}/{source.name}"
        path = download_medmnist("pneumoniamnist", 28, tmp_path / "medmnist", progress=False, url=url)
        assert path.name == "pneumoniamnist.npz" and path.read_bytes() == source.read_bytes()
        # Already verified: a second call does not fetch again (the server is gone).
        server.shutdown()
        assert download_medmnist("pneumoniamnist", 28, tmp_path / "medmnist", progress=False, url=url) == path
    finally:
        server.shutdown()
        server.server_close()


def test_official_urls_and_names():
    info = download.MEDMNIST["pneumoniamnist"]
    assert info.url(28) == "https://zenodo.org/records/10519652/files/pneumoniamnist.npz?download=1"
    assert info.url(64).endswith("pneumoniamnist_64.npz?download=1")
    assert info.md5[28] == "28209eda62fecd6e6a2d98b1501bb15f"
    assert parse_medmnist_name("pneumoniamnist_128") == ("pneumoniamnist", 128)
    assert parse_medmnist_name("/x/breastmnist.npz") == ("breastmnist", 28)
    assert parse_medmnist_name("chest_xray") is None
    with pytest.raises(ValueError, match="unknown MedMNIST flag"):
        download_medmnist("nosuchmnist")
    with pytest.raises(ValueError, match="sizes"):
        download_medmnist("pneumoniamnist", 32)
