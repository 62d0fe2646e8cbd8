"""Small valid image files as bytes, and a real decompression bomb, for the image-gate tests."""

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encoded(fmt: str, size=(24, 16), **options) -> bytes:
    """A small noisy image in `fmt` (PNG, JPEG, GIF (two frames), WEBP, BMP, TIFF)."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    if fmt == "GIF":
        img.save(buf, "GIF", save_all=True, append_images=[img.rotate(90)], **options)
    else:
        img.save(buf, fmt, **options)
    return buf.getvalue()


def bilevel_png_bomb(width: int = 13370, height: int = 13370) -> bytes:
    """A 1-bit PNG of all-black rows: 178.8 Mpx in about 21 KB (decoded to RGB: over 500 MB).

    Written by hand so that making it costs one 22 MB zlib pass, not a 178 Mpx image."""
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, grayscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))
