"""Calibration samples for GPTQ: a built-in synthetic set (generated prompts and drawn images),
or the user's folder / JSONL file.

The built-in set needs no download: prompts mix English and Chinese prose, lists, arithmetic and
code from templates, and every fourth sample asks about a drawn picture (gradients, shapes,
lines and printed text), so the image tokens that MoonViT feeds the same experts are covered.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from kimivl_local.errors import InputError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}
IMAGE_PROMPT = "Describe this image in detail."

_TEMPLATES = [
    "Explain how {a} relates to {b} in simple terms, and give one concrete example.",
    "Write a short story in which a {a} and a {b} meet on a rainy evening.",
    "Summarize the main differences between {a} and {b} as a bulleted list.",
    "Compute {n} * {m} + {k} step by step, then check the result another way.",
    "def {f}(values):\n    return [v * {n} for v in values if v > {m}]\n\n"
    "What does {f}([1, {k}, {m}]) return, and why?",
    "请用三句话介绍{zh}，并说明它和{zh2}有什么不同。",
    "Translate into French and German: 'The {a} is next to the {b}, near the station.'",
    "Give a JSON object describing a {a} with fields name, size and color.",
    "Is {n} a prime number? Answer, then explain how you checked.",
    "List five questions a student might ask about {a}, with short answers.",
]
_WORDS = ["photosynthesis", "a compiler", "the moon", "a violin", "inflation", "a glacier", "tea",
          "a bicycle", "graph theory", "the immune system", "a lighthouse", "jazz", "a volcano",
          "machine translation", "a spreadsheet", "origami", "the printing press", "a coral reef"]
_ZH = ["长城", "人工智能", "中秋节", "熊猫", "量子计算", "丝绸之路", "太阳能", "京剧"]
_FUNCS = ["scale_all", "pick_large", "transform", "filter_map"]
_IMAGE_PROMPTS = [IMAGE_PROMPT, "What shapes and colors are in this picture?",
                  "Read any text in the image and say where it is.",
                  "Count the objects in the image and describe their layout."]


@dataclass(frozen=True)
class Sample:
    text: str
    image: Image.Image | str | None = None

    def messages(self) -> list[dict]:
        if self.image is None:
            return [{"role": "user", "content": self.text}]
        return [{"role": "user", "content": [{"type": "image", "image": self.image},
                                             {"type": "text", "text": self.text}]}]


def default_samples(n: int, seed: int = 0) -> list[Sample]:
    """n samples: 3-6 generated prompts each; every fourth has a drawn image."""
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        text = "\n\n".join(_prompt(rng) for _ in range(rng.randint(3, 6)))
        if i % 4 == 3:
            samples.append(Sample(rng.choice(_IMAGE_PROMPTS) + "\n\n" + text, _drawing(rng)))
        else:
            samples.append(Sample(text))
    return samples


def _prompt(rng: random.Random) -> str:
    a, b = rng.sample(_WORDS, 2)
    zh, zh2 = rng.sample(_ZH, 2)
    return rng.choice(_TEMPLATES).format(a=a, b=b, zh=zh, zh2=zh2, f=rng.choice(_FUNCS),
                                         n=rng.randint(2, 997), m=rng.randint(2, 97),
                                         k=rng.randint(2, 9999))


def _drawing(rng: random.Random) -> Image.Image:
    """A 224x224 or 280x168 picture: gradient background, shapes, lines and a text label."""
    w, h = rng.choice([(224, 224), (280, 168)])
    top, bottom = [tuple(rng.randrange(256) for _ in range(3)) for _ in range(2)]
    img = Image.new("RGB", (w, h))
    draw = ImageDraw.Draw(img)
    for y in range(h):
        t = y / (h - 1)
        draw.line([(0, y), (w, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom)))
    for _ in range(rng.randint(2, 6)):
        x0, y0 = rng.randrange(w - 20), rng.randrange(h - 20)
        box = [x0, y0, x0 + rng.randint(10, w // 2), y0 + rng.randint(10, h // 2)]
        color = tuple(rng.randrange(256) for _ in range(3))
        rng.choice([draw.rectangle, draw.ellipse])(box, fill=color)
    for _ in range(rng.randint(1, 4)):
        draw.line([rng.randrange(w), rng.randrange(h), rng.randrange(w), rng.randrange(h)],
                  fill=tuple(rng.randrange(256) for _ in range(3)), width=rng.randint(1, 4))
    draw.text((rng.randrange(w // 2), rng.randrange(h - 12)), rng.choice(_WORDS), fill=(0, 0, 0))
    return img


def load_samples(path: Path, n: int) -> list[Sample]:
    """The first n samples of a folder (each .txt file; each image, with the same-named .txt as
    its prompt when there is one) or of a JSONL file ({"text": ..., "image": optional path})."""
    path = Path(path)
    if path.is_dir():
        samples = _folder(path)
    elif path.is_file():
        samples = _jsonl(path)
    else:
        raise InputError(f"--calib-data {path}: no such file or folder")
    if not samples:
        raise InputError(f"--calib-data {path}: no samples found (expected .txt and image files, "
                         "or JSONL lines with a \"text\" field)")
    return samples[:n]


def _folder(path: Path) -> list[Sample]:
    files = sorted(p for p in path.iterdir() if p.is_file())
    images = {p.stem for p in files if p.suffix.lower() in IMAGE_SUFFIXES}
    samples = []
    for p in files:
        if p.suffix.lower() in IMAGE_SUFFIXES:
            prompt = p.with_suffix(".txt")
            samples.append(Sample(_read_text(prompt) if prompt.is_file() else IMAGE_PROMPT, str(p)))
        elif p.suffix == ".txt" and p.stem not in images:
            samples.append(Sample(_read_text(p)))
    return samples


def _jsonl(path: Path) -> list[Sample]:
    samples = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{i}: not valid JSON ({exc.msg})") from None
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            raise InputError(f"{path}:{i}: expected an object with a \"text\" string")
        image = item.get("image")
        if image is not None:
            image = Path(image) if Path(image).is_absolute() else path.parent / image
            if not image.is_file():
                raise InputError(f"{path}:{i}: image {image} not found")
            image = str(image)
        samples.append(Sample(item["text"], image))
    return samples


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--calib-data: cannot read {path} as UTF-8 text ({exc})") from None
