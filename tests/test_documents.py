"""PDF input: page ranges, render size within the token budget, text layer, refused files, and
PDFs through KimiVL.generate and the CLI on the tiny checkpoint."""

import math
import re

import pytest
from PIL import Image

from kimivl_local.checkpoint.config import PreprocessorConfig
from kimivl_local.cli.main import main
from kimivl_local.errors import ContextLengthError, InputError
from kimivl_local.inputs.documents import (MAX_DPI, format_pages, parse_pages, pdf_items,
                                           render_scale)
from kimivl_local.inputs.media import expand_media
from kimivl_local.inputs.processor import ImageProcessor
from media_files import RECT_RGB, write_empty_pdf, write_pdf

pdfium = pytest.importorskip("pypdfium2")  # every test here reads or writes PDFs

LETTER, A4_LANDSCAPE = (612, 792), (842, 595)


@pytest.fixture(scope="module")
def doc(tmp_path_factory):
    """Three small pages; the second has no text layer."""
    return write_pdf(tmp_path_factory.mktemp("pdf") / "doc.pdf",
                     [(120, 90, "First page"), (100, 100, None), (90, 120, "Third page")])


def test_page_ranges():
    assert parse_pages(None, 3) == [1, 2, 3]
    assert parse_pages("1-3,5", 6) == [1, 2, 3, 5]
    assert parse_pages(" 4- ", 6) == [4, 5, 6]
    assert parse_pages("3,1-3", 6) == [3, 1, 2]  # the given order; a repeated page once
    for numbers in ([1, 2, 3, 5], [7], [2, 3, 9, 10, 11, 4]):
        assert parse_pages(format_pages(numbers), 20) == numbers
    assert format_pages([1, 2, 3, 5]) == "1-3,5"


@pytest.mark.parametrize("spec, says", [
    ("1-9", "has 5 pages"), ("6", "has 5 pages"), ("0", "numbered from 1"),
    ("4-2", "selects no page"), ("", "empty page range"), ("1,,2", "is not N"),
    ("two", "is not N"), (3, "is a string"),
])
def test_bad_page_ranges_name_the_range_and_page_count(spec, says):
    with pytest.raises(InputError, match=re.escape(says)) as err:
        parse_pages(spec, 5, "doc.pdf")
    assert str(err.value).startswith("doc.pdf: ")


@pytest.mark.parametrize("size", [LETTER, A4_LANDSCAPE, (72, 72), (200, 6000), (14400, 100)])
@pytest.mark.parametrize("limit", [1024, 4096, 16384])
def test_render_scale_is_the_largest_within_budget(size, limit):
    def pixels(scale):
        return math.ceil(size[0] * scale), math.ceil(size[1] * scale)

    def fits(scale):
        w, h = pixels(scale)
        return (w // 14) * (h // 14) <= limit and max(w, h) <= 7140

    scale = render_scale(*size, limit, 14, 7140)  # 7140 = 255 merged patches of 28
    assert fits(scale)
    assert scale == MAX_DPI / 72 or not fits(scale * 1.001)  # no needlessly small renders
    # The processor then keeps the size (no second resampling) and accepts the grid.
    w, h = pixels(scale)
    tokens = ImageProcessor(PreprocessorConfig(), limit).num_tokens(Image.new("L", (w, h)))
    assert tokens == math.ceil(w / 28) * math.ceil(h / 28)


def test_pages_render_at_budget_size_upright(tmp_path):
    path = write_pdf(tmp_path / "a.pdf", [(*LETTER, "Letter"), (72, 72, None)])
    processor = ImageProcessor(PreprocessorConfig(), in_token_limit=1024)
    (_, letter), (_, small) = pdf_items(path, processor)
    image = letter[1]["image"]
    w, h = image.size
    assert 0.97 * 1024 <= (w // 14) * (h // 14) <= 1024 and abs(w / h - 612 / 792) < 0.01
    assert small[1]["image"].size == (200, 200)  # capped at 200 dpi, not blown up
    # The rectangle fills the page's lower-left quarter: the render is upright and not blank.
    assert image.getpixel((w // 4, 3 * h // 4)) == RECT_RGB
    assert image.getpixel((3 * w // 4, 3 * h // 4)) == (255, 255, 255)

    rotated = write_pdf(tmp_path / "r.pdf", [(*LETTER, None)], rotate=90)
    (_, items), = pdf_items(rotated, processor)
    assert items[1]["image"].width > items[1]["image"].height


def test_labels_images_and_text_layer(doc):
    processor = ImageProcessor(PreprocessorConfig())
    pages = pdf_items(doc, processor, pages="3,1-2", text_layer=True)
    assert [n for n, _ in pages] == [3, 1, 2]
    third = pages[0][1]
    assert [x["type"] for x in third] == ["text", "image", "text"]
    assert third[0]["text"] == "Page 3:" and third[2]["text"] == "Page 3 text: Third page\n"
    assert [x["type"] for x in pages[2][1]] == ["text", "image"]  # page 2 has no text layer
    without = pdf_items(doc, processor, pages="1")
    assert [x["type"] for x in without[0][1]] == ["text", "image"]


def test_encrypted_pdfs(doc, tmp_path):
    from pypdf import PdfWriter

    locked = tmp_path / "locked.pdf"
    writer = PdfWriter(clone_from=doc)
    writer.encrypt("secret", algorithm="AES-256")
    writer.write(locked)
    with pytest.raises(InputError, match="locked.pdf: the PDF is encrypted with a password"):
        pdf_items(locked, ImageProcessor(PreprocessorConfig()))
    # Encrypted with only an owner password: readable by anyone, so it opens.
    owner_only = tmp_path / "owner.pdf"
    writer = PdfWriter(clone_from=doc)
    writer.encrypt("", owner_password="owner", algorithm="RC4-128")
    writer.write(owner_only)
    assert len(pdf_items(owner_only, ImageProcessor(PreprocessorConfig()))) == 3


def test_corrupt_missing_and_empty_pdfs(doc, tmp_path):
    processor = ImageProcessor(PreprocessorConfig())
    garbage = tmp_path / "garbage.pdf"
    garbage.write_bytes(b"%PDF-1.4\n" + bytes(range(256)) * 4)
    png = tmp_path / "picture.pdf"
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    no_pages = write_empty_pdf(tmp_path / "empty.pdf")
    for path in (garbage, png, no_pages):
        with pytest.raises(InputError, match=f"{path.name}: not a PDF, or a corrupt one"):
            pdf_items(path, processor)
    for path in (tmp_path / "nope.pdf", tmp_path):
        with pytest.raises(InputError, match="no such file"):
            pdf_items(path, processor)
    with pytest.raises(InputError, match="has 3 pages"):
        pdf_items(doc, processor, pages="2-4")


def test_too_long_document_is_refused_before_rendering(tmp_path, monkeypatch):
    from kimivl_local.inputs import documents

    processor = ImageProcessor(PreprocessorConfig())
    (_, page), = pdf_items(write_pdf(tmp_path / "one.pdf", [(*LETTER, None)]), processor)
    per_page = processor.num_tokens(page[1]["image"])  # about 1000 for the 4096-patch budget
    path = write_pdf(tmp_path / "book.pdf", [(*LETTER, None)] * 12)
    monkeypatch.setattr(documents, "_page_items", lambda *a: pytest.fail("rendered a page"))
    messages = [{"role": "user", "content": [{"type": "pdf", "pdf": str(path)}]}]
    with pytest.raises(ContextLengthError) as err:
        expand_media(messages, processor, max_context=8192)
    fit = 8191 // per_page  # one position stays free for the first new token
    assert (f"book.pdf: 12 pages need about {12 * per_page} tokens but the context holds 8192; "
            f"about {fit} pages would fit") in str(err.value)
    assert f"--pages 1-{fit}" in str(err.value)


def test_generate_with_pdf_equals_pages_as_images(tiny_model_fp32, doc):
    """The pdf item means exactly its labelled page images (rendered here with pypdfium2)."""
    pdf = pdfium.PdfDocument(str(doc))
    manual = []
    for n in (3, 1):
        manual += [{"type": "text", "text": f"Page {n}:"},
                   {"type": "image", "image": pdf[n - 1].render(scale=MAX_DPI / 72).to_pil()}]
    pdf.close()
    ask = {"type": "text", "text": "What is on these pages?"}
    via_pdf = [{"role": "user", "content": [{"type": "pdf", "pdf": str(doc), "pages": "3,1"}, ask]}]
    via_images = [{"role": "user", "content": manual + [ask]}]
    model = tiny_model_fp32
    first = "".join(model.generate(via_pdf, max_new_tokens=6))
    stats = model.last_stats
    assert first and "".join(model.generate(via_images, max_new_tokens=6)) == first
    assert model.last_stats.prompt_tokens == stats.prompt_tokens
    assert stats.prompt_tokens == len(model.tokenizer.encode_chat(via_pdf))  # same expansion


def test_context_overflow_says_how_many_pages_fit(tiny_model_fp32, tmp_path):
    model = tiny_model_fp32
    path = write_pdf(tmp_path / "report.pdf", [(*LETTER, f"Page {i}") for i in range(1, 6)])
    words = {"type": "text", "text": "word " * 4000}

    def chat(pages):
        return [{"role": "user", "content": [
            {"type": "pdf", "pdf": str(path), "pages": pages}, words]}]

    with pytest.raises(ContextLengthError) as err:
        next(model.generate(chat("1-5"), max_new_tokens=4))
    message = str(err.value)
    assert "report.pdf: 5 pages need about" in message and "context holds 8192" in message
    fit = int(re.search(r"about (\d+) pages? would fit", message)[1])
    assert f"--pages {format_pages(range(1, fit + 1))}" in message
    assert "--max-context" in message and "--max-image-tokens" in message
    # The claim holds: `fit` pages leave room for a new token, one more page does not.
    assert len(model.tokenizer.encode_chat(chat(f"1-{fit}"))) < 8192
    assert len(model.tokenizer.encode_chat(chat(f"1-{fit + 1}"))) >= 8192


def test_cli_generate_with_pdf(tiny_checkpoint, tiny_model_fp32, doc, capsys):
    rc = main(["generate", str(tiny_checkpoint), "--pdf", str(doc), "--pages", "1,3",
               "--pdf-text", "-p", "Summarise.", "--max-new-tokens", "3", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.strip()
    expected = [{"role": "user", "content": [
        {"type": "pdf", "pdf": str(doc), "pages": "1,3", "text_layer": True},
        {"type": "text", "text": "Summarise."}]}]
    prompt_tokens = int(re.search(r"\[(\d+) prompt tokens", err)[1])
    assert prompt_tokens == len(tiny_model_fp32.tokenizer.encode_chat(expected))

    rc = main(["generate", str(tiny_checkpoint), "--pdf", str(doc), "--pages", "2-7", "-p", "x"])
    assert rc == 2 and "has 3 pages" in capsys.readouterr().err
