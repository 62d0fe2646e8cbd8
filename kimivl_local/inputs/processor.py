"""Images -> MoonViT patches and placeholder counts (reference §4.1).

Per image: decode through `open_image`, the one gate for every path (CLI, app, API, PDF pages,
video frames): a pixel limit checked on the header before decoding, and every decoder failure an
InputError naming the image. Then (first frame, EXIF orientation applied, any mode to 8-bit RGB),
down-scale with PIL bicubic only above `in_token_limit` raw patches, zero-pad right/bottom to
multiples of patch x merge (pad_input) before normalising, then cut 14x14 patches in raster order.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from ..checkpoint.config import PreprocessorConfig
from ..errors import InputError

# A PIL image, a file path, or the bytes of an image file (a data: URL's payload).
ImageInput = Union[Image.Image, str, os.PathLike, bytes]

# MoonViT's 2-D RoPE table is 512x512; the reference refuses grids that reach it ("Exceed pos emb").
MAX_GRID = 512

# The most pixels an image may declare: PIL's default bomb threshold, fixed here so that nothing
# else in the process (PIL's global setting) can lift it. Checked on the header, before decoding.
MAX_PIXELS = 89_478_485

# PIL clips wider-than-8-bit samples to 0..255 when converting to RGB; scale them from their range
# instead ("I" is how older Pillow and some TIFFs carry 16-bit samples; float images are 0..1).
_WIDE_MODE_MAX = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0,
                  "I": 65535.0, "F": 1.0}


@dataclass(frozen=True)
class ProcessedImages:
    pixel_values: torch.Tensor  # float32 [sum_i h_i * w_i, 3, patch, patch], images concatenated
    grid_hws: torch.Tensor  # int64 [n_images, 2]: (h, w) in patches; tokens = h*w / merge area


def _scaled_size(width: int, height: int, patch: int, in_token_limit: int) -> tuple[int, int]:
    """Size after the reference's down-scale; unchanged when within the limit (never up-scales)."""
    raw = (width // patch) * (height // patch)
    if raw <= in_token_limit:
        return width, height
    scale = math.sqrt(in_token_limit / raw)
    # max(1, .): only reachable for shapes whose grid is refused anyway; keeps PIL from failing first.
    return max(1, int(width * scale)), max(1, int(height * scale))


def _grid(width: int, height: int, cfg: PreprocessorConfig, in_token_limit: int,
          where: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """((resized W, H), (grid h, grid w)) for an image of this size; InputError if it cannot fit."""
    patch = cfg.patch_size
    mh, mw = cfg.merge_kernel_size
    size = f"{width}x{height}"
    width, height = _scaled_size(width, height, patch, in_token_limit)
    if cfg.pad_input:
        gh = -(-height // (patch * mh)) * mh
        gw = -(-width // (patch * mw)) * mw
    else:  # centre-crop to whole patches (not used by Kimi-VL: it can leave an odd grid)
        gh, gw = height // patch, width // patch
        if gh % mh or gw % mw or gh == 0 or gw == 0:
            raise InputError(f"{where}: a {size} image cropped to whole patches gives a "
                             f"{gh}x{gw} grid, not a multiple of the {mh}x{mw} merge "
                             "(set pad_input to true)")
    if gh >= MAX_GRID or gw >= MAX_GRID:
        raise InputError(f"{where}: a {size} image needs a {gh}x{gw} patch grid; "
                         f"MoonViT's position table allows fewer than {MAX_GRID} patches per side "
                         "(lower in_token_limit or crop the image)")
    return (width, height), (gh, gw)


def token_count_for_size(width: int, height: int, in_token_limit: int) -> int:
    """Merged image tokens for a width x height image (Kimi-VL: 14-pixel patches, 2x2 merge, padded).

    Examples from the reference (in_token_limit 4096): 896x896 -> 1024, 640x480 -> 414,
    1920x1080 -> 1032; with 16384: 1920x1080 -> 2691, 1792x1792 -> 4096.
    """
    _, (gh, gw) = _grid(width, height, PreprocessorConfig(), in_token_limit, f"{width}x{height} image")
    return gh * gw // 4


def _to_rgb(img: Image.Image, where: str) -> Image.Image:
    """First frame, EXIF orientation applied, 8-bit RGB (alpha dropped, as `convert("RGB")` does)."""
    if getattr(img, "is_animated", False):
        img.seek(0)
    img = ImageOps.exif_transpose(img)
    if img.mode in _WIDE_MODE_MAX:
        top = _WIDE_MODE_MAX[img.mode]
        samples = np.asarray(img, dtype=np.float64).clip(0.0, top)
        img = Image.fromarray(np.rint(samples * (255.0 / top)).astype(np.uint8))  # 2-D uint8 -> "L"
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise InputError(f"{where}: cannot convert a {img.mode} image to RGB ({exc})") from None


def describe(image: ImageInput, default: str) -> str:
    """How messages name an image: its path, else `default` (e.g. "image 2")."""
    return os.fspath(image) if isinstance(image, (str, os.PathLike)) else default


def open_image(image: ImageInput, where: str | None = None) -> Image.Image:
    """The one gate every image passes (files, uploads, data: URLs, PDF pages, video frames):
    8-bit RGB, or InputError naming `where` (default: the path, else "image")."""
    return _decode(image, where or describe(image, "image"), header_only=False)


def image_size(image: ImageInput, where: str | None = None) -> tuple[int, int]:
    """(width, height) from the header alone, through the same checks as open_image."""
    return _decode(image, where or describe(image, "image"), header_only=True)


def _decode(image: ImageInput, where: str, header_only: bool):
    if isinstance(image, Image.Image):
        return _checked(image, where, header_only)
    if isinstance(image, (bytes, bytearray, memoryview)):
        source = io.BytesIO(image)
    elif isinstance(image, (str, os.PathLike)):
        source = _open_file(image, where)
    else:
        raise InputError(f"{where}: expected a PIL image, a path or image bytes, got "
                         f"{type(image).__name__}")
    with source:
        try:
            with warnings.catch_warnings():
                # Our own pixel limit decides; PIL's warning would only be noise.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(source)
        except Image.UnidentifiedImageError:
            raise InputError(f"{where}: not an image, or not in a format Pillow reads (PNG, "
                             "JPEG, GIF, WebP, BMP, TIFF, ...)") from None
        except Exception as exc:  # noqa: BLE001 - see _checked
            raise _corrupt(where, exc) from None
        with img:
            return _checked(img, where, header_only)


def _open_file(path: str | os.PathLike, where: str):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise InputError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{where}: is a folder, not an image file") from None
    except OSError as exc:
        raise InputError(f"{where}: cannot open the file ({exc.strerror})") from None
    except ValueError:  # a NUL byte in the path
        raise InputError(f"{where}: not a valid file path") from None


def _checked(img: Image.Image, where: str, header_only: bool):
    """The size, or the RGB image: the pixel limit is checked on the header, before decoding."""
    width, height = img.size
    if width < 1 or height < 1:
        raise InputError(f"{where}: the image is empty ({width}x{height} pixels)")
    if width * height > MAX_PIXELS:
        raise InputError(f"{where}: refusing a possible decompression bomb: {width}x{height} is "
                         f"{width * height / 1e6:.1f} Mpx, over the {MAX_PIXELS / 1e6:.1f} Mpx "
                         "limit")
    if header_only:
        return width, height
    try:
        return _to_rgb(img, where)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL's decoders raise OSError, SyntaxError,
        # ValueError, IndexError, struct.error, EOFError, DecompressionBombError, ... on corrupt
        # data: all mean the same to the user.
        raise _corrupt(where, exc) from None


def _corrupt(where: str, exc: Exception) -> InputError:
    if isinstance(exc, Image.DecompressionBombError):  # PIL's own limit, if set lower than ours
        return InputError(f"{where}: refusing a possible decompression bomb ({exc})")
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return InputError(f"{where}: cannot decode the image, it is truncated or corrupt ({detail})")


class ImageProcessor:
    """Turns images (PIL images or file paths) into MoonViT inputs."""

    def __init__(self, cfg: PreprocessorConfig, in_token_limit: int | None = None):
        self.cfg = cfg
        self.in_token_limit = cfg.in_token_limit if in_token_limit is None else in_token_limit
        if self.in_token_limit < 1:
            raise InputError(f"in_token_limit must be at least 1, got {self.in_token_limit}")
        self._mean = torch.tensor(cfg.image_mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(cfg.image_std, dtype=torch.float32).view(3, 1, 1)

    def num_tokens(self, image: ImageInput, where: str | None = None) -> int:
        """Merged tokens (placeholder count) for one image; a file is read for its header only.

        EXIF orientation is ignored here: swapping W and H leaves the count unchanged.
        """
        where = where or describe(image, "image")
        _, (gh, gw) = _grid(*image_size(image, where), self.cfg, self.in_token_limit, where)
        mh, mw = self.cfg.merge_kernel_size
        return gh * gw // (mh * mw)

    def preprocess(self, images: ImageInput | Sequence[ImageInput],
                   names: Sequence[str] | None = None) -> ProcessedImages:
        """names: how errors name each image (default: its path, else "image N")."""
        if isinstance(images, (Image.Image, str, os.PathLike, bytes)):
            images = [images]
        patches, grids = [], []
        for i, image in enumerate(images):
            p, grid = self._one(image, names[i] if names else describe(image, f"image {i + 1}"))
            patches.append(p)
            grids.append(grid)
        size = self.cfg.patch_size
        pixel_values = torch.cat(patches) if patches else torch.empty(0, 3, size, size)
        return ProcessedImages(pixel_values, torch.tensor(grids, dtype=torch.int64).view(-1, 2))

    def _one(self, image: ImageInput, where: str) -> tuple[torch.Tensor, tuple[int, int]]:
        img = open_image(image, where)
        (width, height), (gh, gw) = _grid(*img.size, self.cfg, self.in_token_limit, where)
        if (width, height) != img.size:
            img = img.resize((width, height), Image.Resampling.BICUBIC)  # antialiased, as the reference
        p = self.cfg.patch_size
        pixels = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        if self.cfg.pad_input:  # zeros at right/bottom, before normalising: pads become -mean/std
            canvas = torch.zeros(3, gh * p, gw * p, dtype=torch.uint8)
            canvas[:, :height, :width] = pixels
        else:  # centre crop, rounding the offsets as torchvision's center_crop does
            top, left = int(round((height - gh * p) / 2.0)), int(round((width - gw * p) / 2.0))
            canvas = pixels[:, top:top + gh * p, left:left + gw * p]
        x = (canvas.to(torch.float32) / 255.0 - self._mean) / self._std
        x = x.view(3, gh, p, gw, p).permute(1, 3, 0, 2, 4).reshape(gh * gw, 3, p, p)
        return x, (gh, gw)
