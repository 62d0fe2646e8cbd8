"""Only uploaded files leave or enter the chat window: attacks through Gradio's real routes.

A started server, real HTTP: a message naming a server path (absolute, `..`, a URL) is refused
before the file is read or copied, nothing of it is served, and the routes that fetch URLs for a
client or serve what the chat does not use are closed. An uploaded image still works.
"""

import json
import logging
import os
from pathlib import Path

import pytest
from PIL import Image

from app_support import drop_mid_request, import_app, running_server

httpx = pytest.importorskip("httpx")
server = import_app("server")
uploads = import_app("uploads")

USER_TEMP_DIR = os.environ.get("GRADIO_TEMP_DIR")  # read at collection, before any app exists
SETTINGS = ["", 0.0, 1.0, 0, 16, "", False]  # system, temperature, top_p, top_k, max, pdf...


@pytest.fixture(scope="module")
def served(tiny_model_fp32):
    calls = []
    real = tiny_model_fp32.generate

    def generate(messages, **options):  # records what reaches the model
        calls.append(messages)
        return real(messages, **options)

    tiny_model_fp32.generate = generate
    try:
        with running_server(server.build_app(tiny_model_fp32, max_upload_mb=1)) as url:
            yield url, calls
    finally:
        del tiny_model_fp32.generate


@pytest.fixture
def secret(tmp_path) -> Path:
    path = tmp_path / "secret.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(path)
    return path


def call_submit(url: str, files: list[str], text: str = "hi") -> str:
    """POST /gradio_api/call/submit as a script would; the event stream of the answer."""
    box = {"text": text, "files": [{"path": p, "meta": {"_type": "gradio.FileData"}}
                                   for p in files]}
    r = httpx.post(f"{url}/gradio_api/call/submit", json={"data": [box, None, *SETTINGS]},
                   timeout=30)
    r.raise_for_status()
    return httpx.get(f"{url}/gradio_api/call/submit/{r.json()['event_id']}", timeout=60).text


def copies_of(data: bytes) -> list[Path]:
    """Files under this server's upload folder with these exact bytes."""
    root = Path(os.environ["GRADIO_TEMP_DIR"])
    return [p for p in root.rglob("*") if p.is_file() and p.read_bytes() == data]


@pytest.mark.parametrize("how", ["absolute", "dotdot", "url"])
def test_a_path_that_was_not_uploaded_is_refused_unread(served, secret, how):
    url, calls = served
    before = len(calls)
    upload_dir = os.environ["GRADIO_TEMP_DIR"]
    path = {"absolute": str(secret),
            "dotdot": os.path.join(upload_dir, os.path.relpath(secret, upload_dir)),
            "url": f"{url}/gradio_api/file={secret}"}[how]
    assert how != "dotdot" or path.startswith(upload_dir + "/..")
    events = call_submit(url, [path])
    assert "event: error" in events and "not uploaded" in events
    assert str(secret) not in events.replace(path, "")  # no link to a copy
    assert len(calls) == before  # nothing reached the model
    assert copies_of(secret.read_bytes()) == []
    r = httpx.get(f"{url}/gradio_api/file={secret}", timeout=30)
    assert r.status_code == 404 and r.content != secret.read_bytes()


def test_an_uploaded_image_reaches_the_model_and_is_served_back(served, tmp_path):
    url, calls = served
    image = tmp_path / "red.png"
    Image.new("RGB", (64, 48), (200, 80, 40)).save(image)
    with open(image, "rb") as f:
        r = httpx.post(f"{url}/gradio_api/upload", files={"files": ("red.png", f, "image/png")},
                       timeout=30)
    (uploaded,) = r.json()
    assert uploads.is_uploaded(uploaded, os.environ["GRADIO_TEMP_DIR"])
    events = call_submit(url, [uploaded], "Describe it.")
    assert "event: complete" in events, events[-500:]
    assert calls[-1][-1]["content"][0] == {"type": "image", "image": uploaded}
    last = json.loads(events.split("event: complete\ndata: ")[1].splitlines()[0])
    link = last[0][0]["content"][0]["file"]["url"]
    assert httpx.get(link, timeout=30).content == image.read_bytes()


def test_uploads_stop_when_the_folder_is_full(served, tmp_path):
    """A port others can reach must not let them fill the disk: past STORED_UPLOADS x
    --max-upload-mb (1 MiB here) in the upload folder, an upload is refused, unread."""
    url, _ = served
    filler = Path(os.environ["GRADIO_TEMP_DIR"]) / "filler.bin"
    image = tmp_path / "red.png"
    Image.new("RGB", (8, 8), (200, 80, 40)).save(image)

    def upload():
        with open(image, "rb") as f:
            return httpx.post(f"{url}/gradio_api/upload",
                              files={"files": ("red.png", f, "image/png")}, timeout=30)

    try:
        with open(filler, "wb") as f:
            f.truncate(uploads.STORED_UPLOADS * 2**20)  # sparse: counts, costs no disk
        r = upload()
        assert r.status_code == 507 and "restart it to clear them" in r.json()["error"]["message"]
        assert copies_of(image.read_bytes()) == []
    finally:
        filler.unlink()
    assert upload().status_code == 200


@pytest.mark.parametrize("route", [
    "/gradio_api/file=http://127.0.0.1:9/x.png",  # the server would fetch a URL for the client
    "/gradio_api/file=https%3A//example.com/x.png",
    "/gradio_api/proxy=http://127.0.0.1:9/x",
    "/monitoring/summary",  # other users' event statistics
    "/gradio_api/run-history/buckets",
    "/gradio_api/custom_component/x/client/..%2F/uploads.py",
])
def test_routes_the_chat_does_not_use_are_closed(served, route):
    r = httpx.get(served[0] + route, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_files_outside_the_upload_folder_are_not_served(served, tmp_path, monkeypatch):
    # Gradio itself would serve its examples cache, a folder relative to the working directory
    cached = tmp_path / ".gradio" / "cached_examples" / "x.png"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"cached")
    monkeypatch.chdir(tmp_path)
    upload_dir = os.environ["GRADIO_TEMP_DIR"]
    for path in ("/etc/hostname", str(cached), ".gradio/cached_examples/x.png",
                 f"{upload_dir}/../{os.path.relpath('/etc/hostname', upload_dir + '/..')}"):
        for route in ("file=", "file/"):
            r = httpx.get(f"{served[0]}/gradio_api/{route}{path}", timeout=30)
            assert r.status_code == 404, (route, path)


@pytest.mark.skipif(bool(USER_TEMP_DIR), reason="GRADIO_TEMP_DIR chosen by the user is used")
def test_uploads_go_to_a_private_folder(served):
    folder = Path(os.environ["GRADIO_TEMP_DIR"])
    assert folder.name.startswith("kimivl-uploads-")  # ours, not the shared /tmp/gradio
    assert folder.stat().st_mode & 0o777 == 0o700


def test_is_uploaded_resolves_links_and_dotdot(tmp_path):
    root = tmp_path / "uploads"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.png").write_bytes(b"x")
    (tmp_path / "outside.png").write_bytes(b"y")
    os.symlink(tmp_path / "outside.png", root / "a" / "link.png")
    assert uploads.is_uploaded(str(root / "a" / "x.png"), str(root))
    assert not uploads.is_uploaded(str(root / "a" / "link.png"), str(root))
    assert not uploads.is_uploaded(str(root / ".." / "outside.png"), str(root))
    assert not uploads.is_uploaded(str(root), str(root))
    assert not uploads.is_uploaded(str(tmp_path / "uploads-other" / "x"), str(root))


def test_an_upload_the_client_drops_is_one_log_line(served, caplog, capfd):
    caplog.set_level(logging.INFO, "kimivl_local")
    line = drop_mid_request(
        served[0], b"POST /gradio_api/upload HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/"
        b"form-data; boundary=B\r\nContent-Length: 500000\r\n\r\n--B\r\nContent-"
        b"Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n\r\n" + b"x" * 20000,
        caplog, pause=0.3)
    assert line.startswith("POST /gradio_api/upload 499 ")
    assert "Traceback" not in capfd.readouterr().err
