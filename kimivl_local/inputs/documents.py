"""PDF pages -> chat items (pypdfium2): a "Page N:" label, the rendered page, optionally its text.

Each page is rendered at the largest scale whose raw 14x14 patch count stays within the image
processor's in_token_limit (capped at MAX_DPI), so the page is rasterised once at the best
resolution the token budget allows and the processor never re-samples it.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence

from ..errors import InputError
from .processor import ImageProcessor, MAX_GRID

# Sharp enough for small print; larger renders of small pages only cost tokens.
MAX_DPI = 200
POINTS_PER_INCH = 72

_RANGE = re.compile(r"(\d+)(?:\s*-\s*(\d*))?")


def parse_pages(spec: str | None, page_count: int, where: str = "PDF") -> list[int]:
    """1-based page numbers of a spec like "1-3,5" or "7-" (to the end); None selects every page.

    Pages keep the order given; a page named twice is kept once.
    """
    if spec is None:
        return list(range(1, page_count + 1))
    if not isinstance(spec, str):
        raise InputError(f"{where}: a page range is a string like '1-3,5', not {spec!r}")
    if not spec.strip():
        raise InputError(f"{where}: empty page range {spec!r} (use e.g. 1-3,5; the document has "
                         f"{page_count} pages)")
    numbers: dict[int, None] = {}
    for part in spec.split(","):
        match = _RANGE.fullmatch(part.strip())
        if not match:
            raise InputError(f"{where}: page range {spec!r}: {part.strip()!r} is not N, N-M or N- "
                             "(1-based, e.g. 1-3,5)")
        first = int(match[1])
        last = first if match[2] is None else int(match[2]) if match[2] else page_count
        if first < 1 or first > last:
            raise InputError(f"{where}: page range {spec!r}: {part.strip()!r} selects no page "
                             "(pages are numbered from 1)")
        if last > page_count:
            raise InputError(f"{where}: page range {spec!r} goes past the last page: the document "
                             f"has {page_count} page{'s' if page_count != 1 else ''}")
        numbers.update(dict.fromkeys(range(first, last + 1)))
    return list(numbers)


def format_pages(numbers: Sequence[int]) -> str:
    """The shortest spec parse_pages reads back as `numbers`: [1, 2, 3, 5] -> "1-3,5"."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def render_scale(width_pt: float, height_pt: float, patch_limit: int, patch_size: int,
                 max_side: int) -> float:
    """The largest scale (pixels per point, at most MAX_DPI/72) at which a width x height page
    renders to at most `patch_limit` raw patches with no side over `max_side` pixels."""

    def fits(scale: float) -> bool:
        # pypdfium2 sizes the bitmap as ceil(points * scale).
        w, h = math.ceil(width_pt * scale), math.ceil(height_pt * scale)
        return (w // patch_size) * (h // patch_size) <= patch_limit and max(w, h) <= max_side

    hi = MAX_DPI / POINTS_PER_INCH
    if fits(hi):
        return hi
    lo = 0.0  # fits: a 1-pixel render has no whole patch
    for _ in range(50):  # the patch count only grows with the scale, so bisect to its step
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def check_pdf(path: str | os.PathLike, pages: str | None = None) -> list[int]:
    """The selected page numbers, after the checks pdf_items makes before rendering: the file
    opens (not encrypted, not corrupt, has pages) and `pages` is a valid range for it."""
    where = os.fspath(path)
    pdfium = _pdfium()
    with _open(pdfium, where) as pdf:
        return parse_pages(pages, len(pdf), where)


def pdf_items(path: str | os.PathLike, processor: ImageProcessor, pages: str | None = None,
              text_layer: bool = False,
              before_render: Callable[[list[int], list[tuple[int, int]]], None] | None = None,
              ) -> list[tuple[int, list[dict]]]:
    """(page number, its items) for the selected pages of a PDF.

    Items per page: {"type": "text", "text": "Page N:"}, {"type": "image", "image": PIL RGB}, and
    with text_layer, when the page has any text, {"type": "text", "text": "Page N text: ...\n"}.
    before_render(page numbers, rendered (width, height) in pixels) runs before anything is
    rendered, so a caller can refuse a document that cannot fit without paying for it.
    """
    where = os.fspath(path)
    cfg = processor.cfg
    merge = max(cfg.merge_kernel_size)
    # Largest side whose padded patch grid stays inside MoonViT's position table.
    max_side = (MAX_GRID - 1) // merge * merge * cfg.patch_size
    pdfium = _pdfium()
    with _open(pdfium, where) as pdf:
        numbers = parse_pages(pages, len(pdf), where)
        scales, sizes = [], []
        for n in numbers:
            try:
                width, height = pdf.get_page_size(n - 1)
            except pdfium.PdfiumError as exc:
                raise InputError(f"{where}: cannot read page {n} ({exc})") from None
            scale = render_scale(width, height, processor.in_token_limit, cfg.patch_size, max_side)
            scales.append(scale)
            sizes.append((math.ceil(width * scale), math.ceil(height * scale)))
        if before_render is not None:
            before_render(numbers, sizes)
        return [(n, _page_items(pdfium, pdf, n, scale, text_layer, where))
                for n, scale in zip(numbers, scales)]


def _page_items(pdfium, pdf, number: int, scale: float, text_layer: bool,
                where: str) -> list[dict]:
    try:
        page = pdf[number - 1]
        image = page.render(scale=scale).to_pil()  # RGB, a copy of the bitmap
        text = page.get_textpage().get_text_bounded() if text_layer else ""
    except pdfium.PdfiumError as exc:
        raise InputError(f"{where}: cannot render page {number} ({exc})") from None
    items = [{"type": "text", "text": f"Page {number}:"}, {"type": "image", "image": image}]
    text = text.replace("\r\n", "\n").strip()
    if text:  # scanned pages have no text layer; an empty one would only cost tokens
        items.append({"type": "text", "text": f"Page {number} text: {text}\n"})
    return items


def _pdfium():
    try:
        import pypdfium2 as pdfium
    except ImportError:
        raise InputError("PDF input needs pypdfium2: pip install pypdfium2") from None
    return pdfium


def _open(pdfium, where: str):
    if not os.path.isfile(where):
        raise InputError(f"{where}: no such file")
    try:
        return pdfium.PdfDocument(where)
    except pdfium.PdfiumError as exc:
        if exc.err_code in (pdfium.raw.FPDF_ERR_PASSWORD, pdfium.raw.FPDF_ERR_SECURITY):
            raise InputError(f"{where}: the PDF is encrypted with a password; save an unlocked "
                             "copy first") from None
        if exc.err_code == pdfium.raw.FPDF_ERR_FILE:
            raise InputError(f"{where}: cannot read the file") from None
        # PDFium also refuses a document without pages, reporting no particular error.
        raise InputError(f"{where}: not a PDF, or a corrupt one (or one without pages)") from None
