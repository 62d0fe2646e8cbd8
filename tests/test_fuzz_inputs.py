"""Property-based fuzzing of what users send: image, PDF and video files from mutated or cut
bytes of valid ones, and arbitrary chat message structures. Each must end as a result or our own
error (KimiVLError), never another exception.

The budget is small so that the default run stays fast; raise it for a long local hunt with
KIMIVL_FUZZ_EXAMPLES=2000.
"""

import base64
import os
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from image_bytes import encoded
from kimivl_local.checkpoint.config import PreprocessorConfig
from kimivl_local.errors import KimiVLError
from kimivl_local.inputs.documents import pdf_items
from kimivl_local.inputs.media import check_item
from kimivl_local.inputs.processor import ImageProcessor
from kimivl_local.inputs.video import video_items
from media_files import write_pdf, write_video

FUZZ = settings(max_examples=int(os.environ.get("KIMIVL_FUZZ_EXAMPLES", 100)), deadline=None,
                database=None, suppress_health_check=[HealthCheck.too_slow])
PROC = ImageProcessor(PreprocessorConfig(), in_token_limit=256)  # small renders: fast examples


def _pdf_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        return write_pdf(Path(folder) / "a.pdf", [(100, 80, "Hello"), (80, 100, None)],
                         rotate=90).read_bytes()


def _video_bytes(name: str, **options) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        return write_video(Path(folder) / name, frames=12, rate=4, **options).read_bytes()


IMAGES = {fmt: encoded(fmt) for fmt in ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")}
PDF = _pdf_bytes()
VIDEOS = {"clip.mkv": _video_bytes("clip.mkv"),
          "clip.mp4": _video_bytes("clip.mp4", codec="mpeg4", pix_fmt="yuv420p",
                                   options={"g": "5"})}


@st.composite
def mutated(draw, originals: dict[str, bytes]) -> tuple[str, bytes]:
    """(name, bytes): a valid file with some bytes overwritten, inserted or removed, or cut."""
    name = draw(st.sampled_from(sorted(originals)))
    data = bytearray(originals[name])
    for _ in range(draw(st.integers(0, 6))):
        at = draw(st.integers(0, max(0, len(data) - 1)))
        edit = draw(st.sampled_from(["set", "insert", "delete", "number"]))
        if edit == "set":
            data[at:at + 1] = bytes([draw(st.integers(0, 255))])
        elif edit == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif edit == "delete":
            del data[at:at + draw(st.integers(1, 64))]
        else:  # a plausible-looking field value: sizes, counts, offsets
            data[at:at] = draw(st.sampled_from([b"0", b"-1", b"99999999", b"1e308", b"\xff" * 4,
                                                b"\x00" * 4, b"\x7f\xff\xff\xff"]))
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    return name, bytes(data)


def _ours_or_result(call) -> None:
    try:
        call()
    except KimiVLError as exc:
        event(type(exc).__name__)  # --hypothesis-show-statistics: how far examples got
    else:
        event("result")


@FUZZ
@given(mutated(IMAGES))
def test_fuzz_images(case):
    name, data = case
    _ours_or_result(lambda: PROC.preprocess(data))
    _ours_or_result(lambda: PROC.num_tokens(data))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(mutated({"doc.pdf": PDF}), st.sampled_from([None, "1", "2-", "1-2,1", "3"]),
       st.booleans())
def test_fuzz_pdfs(scratch, case, pages, text_layer):
    path = scratch / "doc.pdf"
    path.write_bytes(case[1])
    _ours_or_result(lambda: pdf_items(path, PROC, pages, text_layer))
    _ours_or_result(lambda: check_item({"type": "pdf", "pdf": str(path), "pages": pages}))


@FUZZ
@given(mutated(VIDEOS), st.sampled_from([0.5, 1.0, 4.0, 1000.0]), st.integers(1, 6))
# Found by this test: an MP4 cut inside its moov box has a stream without a decoder.
@example(("clip.mp4", VIDEOS["clip.mp4"][:VIDEOS["clip.mp4"].index(b"dref") + 12]), 1.0, 1)
def test_fuzz_videos(scratch, case, fps, max_frames):
    name, data = case
    path = scratch / name
    path.write_bytes(data)
    _ours_or_result(lambda: video_items(path, fps, max_frames, frame_patches=64))
    _ours_or_result(lambda: check_item({"type": "video", "video": str(path), "fps": fps,
                                        "max_frames": max_frames}))


# Chat messages: mostly the right shape, with wrong values and wrong shapes mixed in.
_FILES = tempfile.TemporaryDirectory()  # removed at exit
_PDF_PATH = Path(_FILES.name, "doc.pdf")
_PDF_PATH.write_bytes(PDF)
_VIDEO_PATH = Path(_FILES.name, "clip.mkv")
_VIDEO_PATH.write_bytes(VIDEOS["clip.mkv"])
_DATA_URLS = ["data:image/png;base64," + base64.b64encode(IMAGES[f]).decode()
              for f in ("PNG", "GIF")] + ["data:image/png;base64,iVBORw0KGgo=", "data:,"]

_scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
            | st.binary(max_size=8))
_junk = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
_text_item = st.fixed_dictionaries({"type": st.just("text"), "text": st.text()})
_image_item = st.one_of(
    st.fixed_dictionaries({"type": st.just("image"),
                           "image": st.sampled_from(_DATA_URLS + ["/dev/null", "\x00", "",
                                                                  str(_PDF_PATH)]) | _junk}),
    st.fixed_dictionaries({"type": st.just("image_url"),
                           "image_url": st.fixed_dictionaries(
                               {"url": st.sampled_from(_DATA_URLS) | _junk}) | _junk}))
_pdf_item = st.fixed_dictionaries(
    {"type": st.just("pdf"), "pdf": st.just(str(_PDF_PATH)) | _junk},
    optional={"pages": st.sampled_from(["1", "2", "1-2", "2-1", "3", "", "x"]) | _junk,
              "text_layer": st.booleans() | _junk})
_video_item = st.fixed_dictionaries(
    {"type": st.just("video"), "video": st.just(str(_VIDEO_PATH)) | _junk},
    optional={"fps": st.floats() | st.integers() | _junk,
              "max_frames": st.integers(-2, 4) | _junk})
_odd_item = st.fixed_dictionaries({"type": st.text(max_size=8) | _junk},
                                  optional={"text": _junk, "image": _junk})


def _mostly(valid, odds: int = 8):
    """`valid`, and about one time in `odds` junk instead."""
    return st.integers(1, 2 * odds).flatmap(lambda k: _junk if k == odds else valid)


_items = _mostly(st.one_of(_text_item, _image_item, _pdf_item, _video_item, _odd_item))
_message = st.fixed_dictionaries(
    {"role": _mostly(st.sampled_from(["user", "assistant", "system"])),
     "content": _mostly(st.text() | st.lists(_items, max_size=3))})
_messages = _mostly(st.lists(_mostly(_message), max_size=3))


@FUZZ
@given(_messages, st.booleans())
def test_fuzz_chat_encoder(tiny_model_fp32, messages, add_generation_prompt):
    # The loaded model's tokenizer: image items are sized and pdf/video items expanded by it.
    tokenizer = tiny_model_fp32.tokenizer
    _ours_or_result(lambda: tokenizer.encode_chat(messages, add_generation_prompt))
    _ours_or_result(lambda: tokenizer.render_chat(messages, add_generation_prompt))
