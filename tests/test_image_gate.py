"""processor.open_image is the one gate for images from files, uploads and data: URLs: a bomb is
refused from its header on every path, and every broken file is an InputError naming the image."""

import base64
import subprocess
import sys

import pytest
from PIL import Image

from image_bytes import bilevel_png_bomb, encoded
from kimivl_local.checkpoint.config import PreprocessorConfig
from kimivl_local.errors import InputError
from kimivl_local.inputs.media import image_of
from kimivl_local.inputs.processor import ImageProcessor, image_size, open_image

PROC = ImageProcessor(PreprocessorConfig())


def data_url(data: bytes, mime="image/png") -> dict:
    return {"type": "image_url",
            "image_url": {"url": f"data:{mime};base64," + base64.b64encode(data).decode()}}


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    path.write_bytes(bilevel_png_bomb())
    return path


def test_bomb_is_refused_on_every_path(bomb, monkeypatch):
    data = bomb.read_bytes()
    assert len(data) < 22_000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # PIL's own guard off: ours still holds
    lazy = Image.open(bomb)  # what an API caller may hand over: opened, not decoded
    for image in [bomb, str(bomb), data, image_of(data_url(data)), lazy]:
        with pytest.raises(InputError, match=r"decompression bomb: 13370x13370 is 178\.8 Mpx"):
            PROC.preprocess(image)
        with pytest.raises(InputError, match="decompression bomb"):
            PROC.num_tokens(image)
    lazy.close()


def test_bomb_costs_no_memory(bomb):
    # The API path (data: URL bytes) in a fresh process: peak RSS must not grow by the decode
    # (over 500 MB as RGB; +1 GB before the gate).
    code = f"""
import base64, resource
from kimivl_local.checkpoint.config import PreprocessorConfig
from kimivl_local.errors import InputError
from kimivl_local.inputs.media import image_of
from kimivl_local.inputs.processor import ImageProcessor
proc = ImageProcessor(PreprocessorConfig())
url = "data:image/png;base64," + base64.b64encode(open({str(bomb)!r}, "rb").read()).decode()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    proc.preprocess(image_of({{"image_url": url}}))
except InputError:
    pass
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""
    grew_kb = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 check=True).stdout)
    assert grew_kb < 20_000


@pytest.mark.parametrize("fmt,cut,says", [
    ("PNG", 0.5, "truncated"),
    ("JPEG", 0.5, "truncated"),
    ("JPEG", 0.97, "truncated"),
    ("GIF", 0.5, "truncated"),
    ("WEBP", 0.5, "cannot decode"),
    ("BMP", 0.5, "truncated"),
    ("TIFF", 0.5, "truncated"),
])
def test_truncated_files_name_the_image(tmp_path, fmt, cut, says):
    data = encoded(fmt)
    broken = data[: int(len(data) * cut)]
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(broken)
    with pytest.raises(InputError, match=f"cut.{fmt.lower()}: .*{says}"):
        PROC.preprocess(path)
    with pytest.raises(InputError, match=f"image 2: .*{says}"):
        PROC.preprocess([encoded("PNG"), image_of(data_url(broken))])


def test_corrupt_gifs():
    # Every byte of a two-frame GIF set to 0xFF in turn: some still decode (to other pixels),
    # the rest must be InputErrors naming the item (a broken LZW stream was an OSError, an HTTP
    # 500 on the API path before the gate).
    data = encoded("GIF")
    outcomes = set()
    for offset in range(len(data)):
        try:
            image = open_image(data[:offset] + b"\xff" + data[offset + 1:], "frame.gif")
        except InputError as exc:
            assert str(exc).startswith("frame.gif: ")
            outcomes.add(str(exc).split(",")[0])
        else:
            assert image.mode == "RGB"
    assert outcomes == {"frame.gif: not an image", "frame.gif: cannot decode the image"}


def test_unsupported_and_empty(tmp_path):
    for name, data in [("drawing.svg", b"<svg xmlns='http://www.w3.org/2000/svg'/>"),
                       ("empty.png", b""), ("doc.png", b"%PDF-1.4\n")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(InputError, match=f"{name}: not an image, or not in a format Pillow "
                                             "reads"):
            open_image(tmp_path / name)
    with pytest.raises(InputError, match="is a folder"):
        open_image(tmp_path)
    with pytest.raises(InputError, match="data: URL"):
        image_of({"image_url": {"url": "data:image/png,notbase64"}})
    with pytest.raises(InputError, match="expected a PIL image, a path or image bytes, got int"):
        open_image(3)


def test_gate_returns_rgb_and_size_from_header():
    data = encoded("PNG", size=(40, 30))
    assert image_size(data) == (40, 30)
    img = open_image(data)
    assert img.mode == "RGB" and img.size == (40, 30)


def test_generate_names_the_bad_image(tiny_model_fp32, tmp_path):
    good, cut = encoded("PNG"), encoded("JPEG")[:300]
    messages = [{"role": "user", "content": [data_url(good), data_url(cut, "image/jpeg"),
                                             {"type": "text", "text": "hi"}]}]
    with pytest.raises(InputError, match="image 2: cannot decode the image, it is truncated"):
        list(tiny_model_fp32.generate(messages, max_new_tokens=1))
