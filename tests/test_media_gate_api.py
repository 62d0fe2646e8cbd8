"""The image gate on the OpenAI API path, over real HTTP: bad images are 400s naming the image
(PIL's errors were HTTP 500s and a 178.8 Mpx PNG was decoded), and the server goes on."""

import base64
import io

import pytest
from PIL import Image

from app_support import import_app, running_server
from image_bytes import bilevel_png_bomb, encoded

httpx = pytest.importorskip("httpx")
server = import_app("server")


@pytest.fixture(scope="module")
def base_url(tiny_model_fp32):
    with running_server(server.build_app(tiny_model_fp32, max_upload_mb=1)) as url:
        yield url


def _ask(base_url: str, *images: bytes) -> httpx.Response:
    parts = [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(data).decode()}} for data in images]
    body = {"model": "tiny", "max_tokens": 2,
            "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "?"}]}]}
    return httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60)


def _corrupt_gif() -> bytes:
    """A GIF whose LZW data is broken (PIL raised OSError: "broken data stream")."""
    data = encoded("GIF")
    for offset in range(len(data) - 1, 0, -1):
        bad = data[:offset] + b"\xff" + data[offset + 1:]
        try:
            Image.open(io.BytesIO(bad)).convert("RGB")
        except OSError:
            return bad
    raise AssertionError("no corrupting byte found")


@pytest.mark.parametrize("data,says", [
    pytest.param(bilevel_png_bomb(), "image 2: refusing a possible decompression bomb: 13370x13370",
                 id="bomb"),
    pytest.param(encoded("PNG")[:400], "image 2: cannot decode the image, it is truncated",
                 id="truncated png"),
    pytest.param(encoded("JPEG")[:300], "image 2: cannot decode the image, it is truncated",
                 id="truncated jpeg"),
    pytest.param(_corrupt_gif(), "image 2: cannot decode the image", id="corrupt gif"),
    pytest.param(b"%PDF-1.4\n", "image 2: not an image", id="not an image"),
])
def test_bad_images_are_400s_naming_the_image(base_url, data, says):
    reply = _ask(base_url, encoded("PNG"), data)
    assert reply.status_code == 400, reply.text
    assert says in reply.json()["error"]["message"]
    assert _ask(base_url, encoded("PNG")).status_code == 200  # the server goes on
