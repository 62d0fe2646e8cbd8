"""PDFs and videos written by the tests: hand-written PDF objects, PyAV-encoded clips."""

from pathlib import Path

import numpy as np

# The filled rectangle every test page carries (PDF user space: origin bottom-left, points).
RECT_RGB = (51, 102, 204)  # 0.2 0.4 0.8 rg


def write_pdf(path: Path, pages: list[tuple[float, float, str | None]],
              rotate: int = 0) -> Path:
    """A PDF with one page per (width_pt, height_pt, text or None): a blue rectangle over the
    lower-left quarter of the page, and the text (Helvetica, a real text layer) near the top."""
    n = len(pages)
    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(n))
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               f"<< /Type /Pages /Kids [{kids}] /Count {n} >>".encode(),
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    for i, (w, h, text) in enumerate(pages):
        ops = f"0.2 0.4 0.8 rg 0 0 {w / 2} {h / 2} re f\n"
        if text:
            ops += f"0 0 0 rg BT /F1 10 Tf 4 {h - 14} Td ({text}) Tj ET\n"
        stream = ops.encode()
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {w} {h}] /Rotate {rotate} "
                       f"/Resources << /Font << /F1 3 0 R >> >> /Contents {5 + 2 * i} 0 R >>"
                       .encode())
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"endstream")
    return _write_objects(path, objects)


def write_empty_pdf(path: Path) -> Path:
    return _write_objects(path, [b"<< /Type /Catalog /Pages 2 0 R >>",
                                 b"<< /Type /Pages /Kids [] /Count 0 >>"])


def _write_objects(path: Path, objects: list[bytes]) -> Path:
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1,
                                                                            xref)
    path.write_bytes(bytes(out))
    return path


def frame_color(i: int) -> tuple[int, int, int]:
    """Frame i's flat colour: its index in two coarse channels, readable after lossy YUV."""
    return 16 * (i // 16) + 8, 16 * (i % 16) + 8, 128


def frame_index(image) -> int:
    r, g, _ = image.getpixel((image.width // 2, image.height // 2))
    return (r // 16) * 16 + g // 16


def write_video(path: Path, frames: int, rate: int, size=(32, 32), codec="ffv1", pix_fmt="bgr0",
                options=None, rotation: int = 0, stripe: bool = False) -> Path:
    """`frames` flat frames of frame_color(i) at `rate` fps; with stripe, the left eighth white."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, options=options or {})
        stream.width, stream.height = size
        stream.pix_fmt = pix_fmt
        if rotation:
            stream.set_display_rotation(rotation)
        container.start_encoding()
        for i in range(frames):
            pixels = np.empty((size[1], size[0], 3), np.uint8)
            pixels[...] = frame_color(i)
            if stripe:
                pixels[:, : size[0] // 8] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
