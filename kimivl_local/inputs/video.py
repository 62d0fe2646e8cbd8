"""Video -> chat items (PyAV): sampled frames, each an image after a "[mm:ss.s]" timestamp.

Kimi-VL has no video path of its own (reference §8): a clip is fed as frames, each a separate
image. Frames are taken at `fps` from the start; when that gives more than `max_frames`, the
frames are spread uniformly over the whole clip instead. The image gate's pixel limit
(processor.MAX_PIXELS) applies to the stream's frame size, before anything is decoded.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os

from PIL import Image

from ..errors import InputError
from .processor import MAX_PIXELS

log = logging.getLogger(__name__)

DEFAULT_FPS = 1.0
DEFAULT_MAX_FRAMES = 16
# Raw 14x14 patches per frame (~256 image tokens): the default 16 frames then fit the default
# 8192-token context, where full-budget frames (~1024 tokens each) would not.
FRAME_PATCHES = 1024
# Past this gap to the next sample, consider seeking (to the keyframe before it) instead of
# decoding through.
SEEK_GAP_S = 10.0
# Sampling faster than any camera records only repeats frames; the bound keeps the frame count
# finite (1e308 fps overflowed).
MAX_FPS = 1000.0
# Frames of ~256 tokens: 512 of them fill the model's 131072-token context, so more can never be
# answered; the bound stops a request from decoding (and holding) frames by the thousand first.
MAX_FRAMES = 512


def sample_times(duration: float, fps: float, max_frames: int) -> list[float]:
    """Seconds from the start at which to take frames."""
    n = max(1, math.ceil(duration * fps - 1e-9))  # a 5.0 s clip at 1 fps: 0..4 s, not 0..5 s
    if n <= max_frames:
        return [i / fps for i in range(n)]
    return [i * duration / max_frames for i in range(max_frames)]


def timestamp(seconds: float) -> str:
    """[mm:ss.s], or [h:mm:ss.s] from one hour on."""
    tenths = round(seconds * 10)
    minutes, tenths = divmod(tenths, 600)
    hours, minutes = divmod(minutes, 60)
    clock = f"{minutes:02d}:{tenths // 10:02d}.{tenths % 10}"
    return f"[{hours}:{clock}]" if hours else f"[{clock}]"


def check_options(fps, max_frames, where: str = "video") -> None:
    """InputError unless fps is a number in (0, MAX_FPS] and max_frames an integer in
    [1, MAX_FRAMES]."""
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= MAX_FPS:
        raise InputError(f"{where}: fps must be a number above 0 and at most {MAX_FPS:g}, "
                         f"got {fps!r}")
    if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1:
        raise InputError(f"{where}: max_frames must be a positive integer, got {max_frames!r}")
    if max_frames > MAX_FRAMES:
        raise InputError(f"{where}: max_frames must be at most {MAX_FRAMES} (more frames never fit "
                         f"the model's context), got {max_frames}")


def check_video(path: str | os.PathLike, fps: float = DEFAULT_FPS,
                max_frames: int = DEFAULT_MAX_FRAMES) -> None:
    """Refuse, without decoding the clip, what video_items would refuse for its options or the
    file: missing, not a video, no video stream, no first frame."""
    where = os.fspath(path)
    check_options(fps, max_frames, where)
    with _opened(where) as container:
        if next(iter(container.decode(_video_stream(container, where))), None) is None:
            raise InputError(f"{where}: the video has no frames")


def video_items(path: str | os.PathLike, fps: float = DEFAULT_FPS,
                max_frames: int = DEFAULT_MAX_FRAMES,
                frame_patches: int = FRAME_PATCHES) -> list[tuple[float, list[dict]]]:
    """(seconds, [timestamp text item, image item]) per sampled frame, in time order.

    Each frame is the one on screen at its sample time, shown upright (the stream's display
    rotation applied) and down-scaled to at most `frame_patches` raw 14x14 patches.
    """
    where = os.fspath(path)
    check_options(fps, max_frames, where)
    # Opened three times: finding the duration may read every packet, raw streams cannot seek
    # back to the start, and the keyframe probe must not move the decoder.
    with _opened(where) as container:
        duration = _duration(container, _video_stream(container, where))
    with _opened(where) as container, _KeyframeProbe(where) as probe:
        stream = _video_stream(container, where)
        stream.thread_type = "AUTO"
        times = sample_times(duration, fps, max_frames)
        frames, decoded = _frames_at(container, stream, times, probe.before)
    log.debug("%s: decoded %d frames for %d samples", where, decoded, len(times))
    if not frames:
        raise InputError(f"{where}: the video has no frames")
    return [(t, [{"type": "text", "text": timestamp(t)},
                 {"type": "image", "image": _shrink(image, frame_patches)}])
            for t, image in frames]


@contextlib.contextmanager
def _opened(where: str):
    """An input container; InputError for a missing file, no PyAV, or FFmpeg failing on the file
    (when opening it or in the with block)."""
    try:
        import av
    except ImportError:
        raise InputError("video input needs PyAV: pip install av") from None
    if not os.path.isfile(where):
        raise InputError(f"{where}: no such file")
    try:
        with av.open(where, metadata_errors="replace") as container:
            yield container
    except av.error.FFmpegError as exc:
        raise InputError(f"{where}: not a video PyAV can read ({exc})") from None


class _KeyframeProbe:
    """Where a backward seek would land, read by a second demuxer so the decoder keeps its place."""

    def __init__(self, where: str):
        self.where = where
        self.container = None

    def __enter__(self) -> _KeyframeProbe:
        return self

    def __exit__(self, *exc) -> None:
        if self.container is not None:
            self.container.close()

    def before(self, seconds: float) -> float | None:
        """Stream time of the keyframe a backward seek to `seconds` lands on; None if unknown."""
        import av

        try:
            if self.container is None:
                self.container = av.open(self.where, metadata_errors="replace")
            stream = self.container.streams.video[0]
            self.container.seek(round(seconds / stream.time_base), stream=stream, backward=True)
            for packet in self.container.demux(stream):
                if packet.pts is not None:
                    return float(packet.pts * stream.time_base) if packet.is_keyframe else None
        except av.error.FFmpegError:
            pass  # then the caller decodes on, which is always correct
        return None


def _video_stream(container, where: str):
    if not container.streams.video:
        raise InputError(f"{where}: has no video stream")
    stream = container.streams.video[0]
    if stream.codec_context is None:  # e.g. an MP4 cut before its sample description
        raise InputError(f"{where}: no decoder for its video stream (corrupt, or a codec "
                         "FFmpeg lacks)")
    width, height = stream.codec_context.width, stream.codec_context.height
    if width * height > MAX_PIXELS:
        raise InputError(f"{where}: refusing {width}x{height} frames ({width * height / 1e6:.1f} "
                         f"Mpx, over the {MAX_PIXELS / 1e6:.1f} Mpx limit for one image)")
    return stream


def _start(stream) -> float:
    return float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0


def _rate(stream) -> float:
    return float(stream.guessed_rate or stream.average_rate or 25)


def _duration(container, stream) -> float:
    """Seconds, from the headers or else from packet timestamps (browser WebM, raw streams)."""
    if stream.duration is not None and stream.duration > 0:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and container.duration > 0:
        return container.duration / 1_000_000  # AV_TIME_BASE
    count, end = 0, None
    for packet in container.demux(stream):
        if packet.size:
            count += 1
            if packet.pts is not None:
                stop = float((packet.pts + packet.duration) * stream.time_base)
                end = stop if end is None else max(end, stop)
    return end - _start(stream) if end is not None else count / _rate(stream)


def _frames_at(container, stream, times: list[float], keyframe_before,
               ) -> tuple[list[tuple[float, Image.Image]], int]:
    """((seconds, RGB image) of the frame on screen at each time, frames decoded); a frame is
    taken once. keyframe_before(stream seconds) says where a seek there would land."""
    start, rate = _start(stream), _rate(stream)
    taken: list[tuple[float, Image.Image]] = []

    def take(frame, t: float) -> None:
        if taken and taken[-1][0] == t:  # sparser frames than samples: on screen twice
            return
        image = frame.to_image()
        if frame.rotation:  # counter-clockwise degrees, from the display matrix
            image = image.rotate(frame.rotation, expand=True)
        taken.append((t, image))

    frames = iter(container.decode(stream))
    index, decoded, previous, k, probed = 0, 0, None, 0, -1
    while k < len(times):
        frame = next(frames, None)
        if frame is None:  # past the end: the last frame stays on screen
            if previous is not None:
                take(*previous)
            break
        decoded += 1
        # Raw streams carry no timestamps: count frames at the nominal rate.
        t = frame.time - start if frame.time is not None else index / rate
        index += 1
        while k < len(times) and t > times[k] + 1e-6:
            take(*(previous or (frame, t)))
            k += 1
        previous = (frame, t)
        # Far from the next sample, seek only when the keyframe the seek lands on lies ahead:
        # with keyframes sparser than samples, starting again from one behind us would decode
        # the same stretch of the clip once per sample.
        if k < len(times) and k != probed and frame.time is not None \
                and times[k] - t > SEEK_GAP_S:
            probed = k
            key = keyframe_before(times[k] + start)
            if key is not None and t < key - start <= times[k] + 1e-6:
                container.seek(round((times[k] + start) / stream.time_base), stream=stream,
                               backward=True)
                frames, previous = iter(container.decode(stream)), None
    return taken, decoded


def _shrink(image: Image.Image, patches: int, patch_size: int = 14) -> Image.Image:
    if (image.width // patch_size) * (image.height // patch_size) <= patches:
        return image
    # From the exact area, not the whole-patch count, so the result is within budget for sure.
    scale = math.sqrt(patches * patch_size**2 / (image.width * image.height))
    size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)
