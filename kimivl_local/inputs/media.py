"""PDF and video message items -> the text and image items the chat template knows.

    {"type": "pdf", "pdf": path, "pages": "1-3,5", "text_layer": False}
    {"type": "video", "video": path, "fps": 1.0, "max_frames": 16}

Expanded items carry a `_media` tag (source, page or frame number), so that a prompt that does
not fit the context can say which document is too long and how much of it would fit.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import ContextLengthError, InputError
from .documents import check_pdf, format_pages, pdf_items
from PIL import Image

from .processor import ImageInput, ImageProcessor, open_image, token_count_for_size
from .tokenizer import Messages, Tokenizer, check_messages, is_image_item
from .video import DEFAULT_FPS, DEFAULT_MAX_FRAMES, check_video, video_items

TAG = "_media"


@dataclass(frozen=True, eq=False)  # compared by identity: one per expanded pdf/video item
class Source:
    name: str  # the file's name, for messages
    unit: str  # "page" or "frame"


def pdf_item(path: str | Path, pages: str | None = None, text_layer: bool = False) -> dict:
    item = {"type": "pdf", "pdf": str(path), "text_layer": text_layer}
    return {**item, "pages": pages} if pages is not None else item


def video_item(path: str | Path, fps: float = DEFAULT_FPS,
               max_frames: int = DEFAULT_MAX_FRAMES) -> dict:
    return {"type": "video", "video": str(path), "fps": fps, "max_frames": max_frames}


def check_item(item) -> None:
    """Refuse, before any model is loaded, an attachment that generate would refuse for its file
    or options: an image that does not decode, a PDF that does not open or a page range it does
    not have, a video that does not open or an fps/max_frames out of range. Limits that depend on
    the model (image grid, context) are checked by generate."""
    if not isinstance(item, Mapping):
        return  # not an attachment: the template refuses it
    if is_image_item(item):
        open_image(image_of(item))
    elif _is_media(item):
        kind = item["type"]
        path = _media_path(item)
        if kind == "pdf":
            check_pdf(path, item.get("pages"))
        else:
            check_video(path, item.get("fps", DEFAULT_FPS),
                        item.get("max_frames", DEFAULT_MAX_FRAMES))


def expand_media(messages: Messages, processor: ImageProcessor, tokenizer: Tokenizer | None = None,
                 max_context: int | None = None) -> list[dict]:
    """`messages` with every pdf/video item replaced by its text and image items.

    max_context: refuse a PDF whose page images alone exceed it, before rendering any page; with
    tokenizer too, raise ContextLengthError naming the document when the whole prompt does not
    fit (plain text and images are left to the engine's own check).
    """
    check_messages(messages)
    out = []
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, list) and any(_is_media(item) for item in content):
            message = {**message, "content": [x for item in content
                                              for x in expand_item(item, processor, max_context)]}
        out.append(message)
    if tokenizer is not None and max_context is not None:
        check_fits(out, tokenizer, max_context)
    return out


def expand_item(item, processor: ImageProcessor, max_context: int | None = None) -> list:
    """The items a pdf or video item stands for; any other item as it is."""
    if not _is_media(item):
        return [item]
    kind = item["type"]
    path = _media_path(item)
    if kind == "pdf":
        source = Source(Path(path).name, "page")
        text_layer = item.get("text_layer", False)
        if not isinstance(text_layer, bool):
            raise InputError(f"{path}: text_layer must be true or false, got {text_layer!r}")

        def refuse_early(numbers: list[int], sizes: list[tuple[int, int]]) -> None:
            if max_context is None:
                return
            tokens = [token_count_for_size(w, h, processor.in_token_limit) for w, h in sizes]
            if sum(tokens) >= max_context:
                raise _overflow(source, dict(zip(numbers, tokens)), 0, max_context)

        units = pdf_items(path, processor, item.get("pages"), text_layer, refuse_early)
    else:
        source = Source(Path(path).name, "frame")
        fps = item.get("fps", DEFAULT_FPS)
        max_frames = item.get("max_frames", DEFAULT_MAX_FRAMES)
        units = [(k, part) for k, (_, part) in enumerate(video_items(path, fps, max_frames), 1)]
    return [{**x, TAG: (source, number)} for number, part in units for x in part]


def check_fits(messages: Messages, tokenizer: Tokenizer, max_context: int) -> None:
    """Raise ContextLengthError naming the largest document or video when the prompt (plus one
    token to generate) does not fit; a no-op for prompts without one."""
    costs: dict[Source, dict[int, int]] = {}
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        for item in content if isinstance(content, list) else []:
            if isinstance(item, Mapping) and TAG in item:
                source, number = item[TAG]
                units = costs.setdefault(source, {})
                units[number] = units.get(number, 0) + _tokens(item, tokenizer)
    if not costs:
        return
    total = len(tokenizer.encode_chat(messages))
    if total < max_context:
        return
    source = max(costs, key=lambda s: sum(costs[s].values()))
    raise _overflow(source, costs[source], total - sum(costs[source].values()), max_context)


def _media_path(item: Mapping) -> str | Path:
    kind = item["type"]
    path = item.get(kind)
    if not isinstance(path, (str, Path)) or not str(path):
        raise InputError(f"a {kind} item needs a file path in {kind!r}, got {path!r}")
    return path


def _is_media(item) -> bool:
    return isinstance(item, Mapping) and item.get("type") in ("pdf", "video")


def _tokens(item: Mapping, tokenizer: Tokenizer) -> int:
    if is_image_item(item):
        # <|media_start|>image<|media_content|> placeholders <|media_end|>
        wrapper = 3 + len(tokenizer.encode("image"))
        return wrapper + (tokenizer.image_token_counter(item) if tokenizer.image_token_counter
                          else 1)
    return len(tokenizer.encode(item.get("text", "")))


def _overflow(source: Source, costs: dict[int, int], others: int,
              max_context: int) -> ContextLengthError:
    """The error for a document whose units cost `costs` tokens next to `others` tokens."""
    fit, used = 0, others
    for cost in costs.values():
        if used + cost >= max_context:  # one position stays free for the first new token
            break
        used, fit = used + cost, fit + 1
    unit = source.unit
    if fit:
        would = f"about {_count(fit, unit)} would fit"
        fewer = (f"--pages {format_pages(list(costs)[:fit])}" if unit == "page"
                 else f"--max-frames {fit}")
    else:
        would = f"not one {unit} fits beside the rest of the prompt"
        fewer = "--pages" if unit == "page" else "--max-frames"
    rest = f" (the rest of the prompt takes {others})" if others else ""
    return ContextLengthError(
        f"{source.name}: {_count(len(costs), unit)} need about {sum(costs.values())} tokens but "
        f"the context holds {max_context}{rest}; {would}. Use fewer {unit}s ({fewer}), raise "
        "--max-context, or lower --max-image-tokens")


def _count(n: int, unit: str) -> str:
    return f"{n} {unit}{'s' if n != 1 else ''}"


def image_of(item: Mapping) -> ImageInput:
    """The image of a message item: a PIL image, a path, a file:// or a data: URL (returned as
    the file's bytes: like every image, it is decoded only by processor.open_image)."""
    value = item.get("image", item.get("image_url"))
    if isinstance(value, Mapping):  # OpenAI style {"image_url": {"url": ...}}
        value = value.get("url")
    if isinstance(value, Image.Image):
        return value
    if not isinstance(value, str) or not value:
        raise InputError(f"an image item needs a PIL image, a path or a URL, got {value!r}")
    if value.startswith("data:"):
        try:
            header, payload = value.split(",", 1)
            if not header.endswith(";base64"):
                raise ValueError(header)
            return base64.b64decode(payload, validate=True)
        except ValueError:  # binascii.Error included
            raise InputError("cannot decode the data: URL image (expected data:image/...;base64,"
                             "...)") from None
    if value.startswith("file://"):
        return value[len("file://"):]
    if value.startswith(("http://", "https://")):
        raise InputError(f"kimivl-local runs offline and does not fetch {value}; pass a local file")
    return value


def image_items(messages: list[dict]) -> list[Mapping]:
    items = []
    for m in messages:
        content = m.get("content") if isinstance(m, Mapping) else None
        if isinstance(content, list):
            items += [it for it in content if isinstance(it, Mapping) and is_image_item(it)]
    return items
