"""Video input: frame sampling and timestamps, frame size, refused files; and video next to
images and a PDF through KimiVL.generate, the CLI and the chat commands."""

import logging
import re

import pytest
from PIL import Image

from kimivl_local.cli.chat_repl import ChatRepl
from kimivl_local.cli.main import main
from kimivl_local.errors import ContextLengthError, InputError
from kimivl_local.inputs.video import sample_times, timestamp, video_items
from media_files import frame_index, write_pdf, write_video

av = pytest.importorskip("av")  # every test here decodes or writes video


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """4 s at 10 fps, lossless: frame i shows frame_color(i)."""
    return write_video(tmp_path_factory.mktemp("video") / "clip.mkv", frames=40, rate=10)


def _frames(items):
    return [(text["text"], frame_index(image["image"])) for _, (text, image) in items]


def test_sample_times_and_timestamps():
    assert sample_times(5.0, 1.0, 16) == [0, 1, 2, 3, 4]  # not a sixth frame at the very end
    assert sample_times(10.0, 2.0, 4) == [0, 2.5, 5, 7.5]  # too many: spread over the clip
    assert sample_times(0.04, 1.0, 16) == [0]  # a one-frame clip still gives its frame
    assert [timestamp(s) for s in (0, 12.46, 59.96, 3725)] == \
        ["[00:00.0]", "[00:12.5]", "[01:00.0]", "[1:02:05.0]"]


def test_frames_at_fps_with_timestamps(clip):
    items = video_items(clip, fps=2.0, max_frames=16)
    assert _frames(items) == [(timestamp(k / 2), 5 * k) for k in range(8)]
    assert [t for t, _ in items] == pytest.approx([k / 2 for k in range(8)])
    # A clip slower than the sampling rate gives each of its frames once.
    assert [i for _, i in _frames(video_items(clip, fps=30.0, max_frames=100))] == list(range(40))


def test_long_video_spreads_max_frames_over_the_whole_clip(tmp_path):
    # Two minutes at 2 fps, keyframes only every 12.5 s: sampling seeks between frames.
    path = write_video(tmp_path / "long.mp4", frames=240, rate=2, codec="libx264",
                       pix_fmt="yuv444p", options={"qp": "0", "x264-params":
                                                   "keyint=25:min-keyint=25:scenecut=0"})
    items = video_items(path, fps=1.0, max_frames=6)
    assert _frames(items) == [(timestamp(20 * k), 40 * k) for k in range(6)]


def _decoded_frames(caplog) -> int:
    (record,) = [r for r in caplog.records if r.name == "kimivl_local.inputs.video"]
    return record.args[1]


@pytest.mark.parametrize("keyint,most", [("infinite", 250), ("10", 8 * 10)])
def test_sparse_keyframes_decode_forward_once(tmp_path, caplog, keyint, most):
    # 250 s at 1 fps, 8 samples 31.25 s apart. One keyframe: seeking lands back at 0 s every
    # time (8 samples cost 1000 decoded frames before), so decode straight through; a keyframe
    # every 10 s: seek, decoding at most one GOP per sample.
    path = write_video(tmp_path / f"gop{keyint}.mp4", frames=250, rate=1, codec="libx264",
                       pix_fmt="yuv444p", options={"qp": "0", "x264-params":
                                                   f"keyint={keyint}:scenecut=0"})
    caplog.set_level(logging.DEBUG, logger="kimivl_local.inputs.video")
    items = video_items(path, fps=1.0, max_frames=8)
    on_screen = [int(31.25 * k) for k in range(8)]  # 1 fps: frame i shows from i s on
    assert _frames(items) == [(timestamp(i), i) for i in on_screen]
    assert _decoded_frames(caplog) <= most


def test_raw_stream_without_timestamps_or_duration(tmp_path):
    # A bare H.264 stream: no container, so the duration comes from counting packets and the
    # frame times from the frame rate in the stream.
    path = write_video(tmp_path / "raw.h264", frames=30, rate=10, codec="libx264",
                       pix_fmt="yuv444p", options={"qp": "0"})
    with av.open(str(path)) as container:
        assert container.duration is None and container.streams.video[0].duration is None
    assert _frames(video_items(path, fps=1.0)) == [("[00:00.0]", 0), ("[00:01.0]", 10),
                                                   ("[00:02.0]", 20)]


def test_frames_are_shrunk_and_upright(tmp_path):
    big = write_video(tmp_path / "big.mkv", frames=2, rate=1, size=(640, 480))
    image = video_items(big)[0][1][1]["image"]
    assert (image.width // 14) * (image.height // 14) <= 1024  # ~256 tokens a frame
    assert image.width / image.height == pytest.approx(640 / 480, rel=0.01)
    # Shot sideways: a display rotation of 90 degrees counter-clockwise puts the left edge at
    # the bottom.
    turned = write_video(tmp_path / "phone.mp4", frames=2, rate=1, size=(64, 32), codec="mpeg4",
                         pix_fmt="yuv420p", rotation=90, stripe=True)
    image = video_items(turned)[0][1][1]["image"].convert("L")
    assert image.size == (32, 64)
    assert image.getpixel((16, 62)) > 200 and image.getpixel((16, 2)) < 200


def test_bad_videos_and_options(clip, tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    with pytest.raises(InputError, match="notes.mp4: not a video PyAV can read"):
        video_items(text)
    with pytest.raises(InputError, match="no such file"):
        video_items(tmp_path / "gone.mp4")
    sound = tmp_path / "sound.wav"
    with av.open(str(sound), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame(format="s16", layout="mono", samples=800)
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    with pytest.raises(InputError, match="sound.wav: has no video stream"):
        video_items(sound)
    empty = write_video(tmp_path / "empty.avi", frames=0, rate=10, codec="mpeg4",
                        pix_fmt="yuv420p")
    with pytest.raises(InputError, match="empty.avi: the video has no frames"):
        video_items(empty)
    for options, says in [({"fps": 0}, "fps must be a number above 0 and at most 1000, got 0"),
                          ({"fps": 1e308}, r"at most 1000, got 1e\+308"),
                          ({"fps": float("nan")}, "fps must be a number"),
                          ({"max_frames": 0}, "max_frames must be a positive integer"),
                          ({"max_frames": 2.5}, "max_frames must be a positive integer"),
                          ({"max_frames": 10**9}, "max_frames must be at most 512")]:
        with pytest.raises(InputError, match=says):
            video_items(clip, **options)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, clip):
    """Two images, a two-page PDF and the clip: what a user attaches to one question."""
    folder = tmp_path_factory.mktemp("mixed")
    images = [folder / "a.png", folder / "b.png"]
    Image.new("RGB", (90, 60), (200, 30, 30)).save(images[0])
    Image.new("RGB", (40, 70), (30, 200, 30)).save(images[1])
    return images, write_pdf(folder / "doc.pdf", [(100, 80, "Hello"), (80, 100, None)]), clip


def _question(images, pdf, video, frames):
    return [{"role": "user", "content": [
        *[{"type": "image", "image": str(p)} for p in images],
        {"type": "pdf", "pdf": str(pdf), "text_layer": True},
        {"type": "video", "video": str(video), "fps": 1.0, "max_frames": frames},
        {"type": "text", "text": "What do these show?"}]}]


def test_generate_with_images_pdf_and_video(tiny_model_fp32, mixed):
    model = tiny_model_fp32
    images, pdf, video = mixed
    messages = _question(images, pdf, video, frames=3)
    reply = "".join(model.generate(messages, max_new_tokens=5))
    assert reply and model.last_stats.generated_tokens >= 1
    # One placeholder run per image: 2 images, 2 pages, 3 frames, in that order.
    ids = model.tokenizer.encode_chat(messages)
    assert model.last_stats.prompt_tokens == len(ids)
    assert ids.count(model.tokenizer.media_start_id) == 7
    template = model.tokenizer.render_chat(messages)
    labels = ["Page 1:", "Page 1 text: Hello", "Page 2:", "[00:00.0]", "[00:01.3]", "[00:02.6]",
              "What do these show?"]
    positions = [template.index(label) for label in labels]
    assert positions == sorted(positions)
    # 0, 4/3 and 8/3 s show frames 0, 13 and 26: the same answer from those frames as images.
    with av.open(str(video)) as container:
        decoded = [f.to_image() for f in container.decode(video=0)]
    content = []
    for item in messages[0]["content"]:
        if item["type"] != "video":
            content.append(item)
            continue
        for label, k in [("[00:00.0]", 0), ("[00:01.3]", 13), ("[00:02.6]", 26)]:
            content += [{"type": "text", "text": label}, {"type": "image", "image": decoded[k]}]
    as_images = [{"role": "user", "content": content}]
    assert "".join(model.generate(as_images, max_new_tokens=5)) == reply


def test_video_overflow_says_how_many_frames_fit(tiny_model_fp32, tmp_path):
    path = write_video(tmp_path / "hd.mkv", frames=16, rate=1, size=(448, 448))  # 256 tokens
    messages = [{"role": "user", "content": [
        {"type": "video", "video": str(path), "max_frames": 16},
        {"type": "text", "text": "word " * 5000}]}]
    with pytest.raises(ContextLengthError) as err:
        next(tiny_model_fp32.generate(messages, max_new_tokens=4))
    message = str(err.value)
    fit = int(re.search(r"about (\d+) frames? would fit", message)[1])
    assert message.startswith("hd.mkv: 16 frames need about") and f"--max-frames {fit}" in message
    messages[0]["content"][0]["max_frames"] = fit
    assert len(tiny_model_fp32.tokenizer.encode_chat(messages)) < 8192
    messages[0]["content"][0]["max_frames"] = fit + 1
    assert len(tiny_model_fp32.tokenizer.encode_chat(messages)) >= 8192


def test_cli_generate_with_everything(tiny_checkpoint, tiny_model_fp32, mixed, capsys):
    images, pdf, video = mixed
    rc = main(["generate", str(tiny_checkpoint), "--image", str(images[0]), "--image",
               str(images[1]), "--pdf", str(pdf), "--pdf-text", "--video", str(video),
               "--max-frames", "3", "-p", "What do these show?", "--max-new-tokens", "3",
               "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.strip()
    expected = len(tiny_model_fp32.tokenizer.encode_chat(_question(images, pdf, video, 3)))
    assert int(re.search(r"\[(\d+) prompt tokens", err)[1]) == expected

    rc = main(["generate", str(tiny_checkpoint), "--video", str(pdf), "-p", "x"])
    assert rc == 2 and "doc.pdf: not a video" in capsys.readouterr().err
    rc = main(["generate", str(tiny_checkpoint), "--pdf", str(pdf.with_name("no.pdf")), "-p", "x"])
    assert rc == 2 and "no.pdf: no such file" in capsys.readouterr().err


def test_chat_attaches_pdf_and_video(tiny_model_fp32, mixed, capsys, monkeypatch):
    images, pdf, video = mixed
    options = {"text_layer": False, "fps": 1.0, "max_frames": 2}
    repl = ChatRepl(tiny_model_fp32, None, {"max_new_tokens": 3}, [], options)
    repl.command("/help")
    assert "/pdf PATH [PAGES]" in capsys.readouterr().out
    repl.command(f"/pdf {pdf} 3")
    assert "has 2 pages" in capsys.readouterr().out and not repl.pending
    repl.command(f"/pdf {pdf} 2")
    repl.command(f"/video {video}")
    repl.command(f"/image {images[0]}")
    out = capsys.readouterr().out
    assert "attached doc.pdf: 1 page;" in out and "attached clip.mkv: 2 frames;" in out
    assert [x.get("text") for x in repl.pending if x["type"] == "text"] == \
        ["Page 2:", "[00:00.0]", "[00:02.0]"]
    repl.answer("Describe them.")
    assert re.search(r"prompt \d+ tokens", capsys.readouterr().out)
    assert not repl.pending
    sent = repl.history[0]["content"]
    assert sum(1 for x in sent if x["type"] == "image") == 4  # page, two frames, the image
