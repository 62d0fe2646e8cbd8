"""Chat messages with images -> a `Prompt`: placeholder expansion, image features, cache keys.

Image features are memoised by the digest of the preprocessed pixels, and images whose
placeholders are all served from the latent cache are not encoded again, so a multi-turn chat
about one picture runs MoonViT once.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch

from ..inputs.media import image_items, image_of
from ..inputs.processor import ImageInput, ImageProcessor, describe
from ..inputs.tokenizer import Tokenizer
from ..model.kimivl import KimiVLForConditionalGeneration
from .generate import Prompt


class ImageEncoder:
    """Preprocessing + MoonViT + projector, with features memoised by pixel digest."""

    def __init__(self, model: KimiVLForConditionalGeneration, processor: ImageProcessor,
                 memo_size: int = 16):
        self.model = model
        self.processor = processor
        self.memo: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.memo_size = memo_size

    def preprocess(self, images: list[ImageInput]) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """(digest, pixel_values, grid_hw [1, 2]) per image."""
        out = []
        for i, image in enumerate(images):
            path = describe(image, "")
            where = f"image {i + 1} ({path})" if path else f"image {i + 1}"
            p = self.processor.preprocess([image], [where])
            h = hashlib.sha1(p.grid_hws.numpy().tobytes())
            h.update(p.pixel_values.numpy().tobytes())
            out.append((h.hexdigest(), p.pixel_values, p.grid_hws))
        return out

    @torch.inference_mode()
    def features(self, processed: list[tuple[str, torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """Projected features [tokens_i, hidden] per image, running the tower once for the misses."""
        missing = [(d, pv, g) for d, pv, g in processed if d not in self.memo]
        if missing:
            pixels = torch.cat([pv for _, pv, _ in missing])
            grids = torch.cat([g for _, _, g in missing])
            for (digest, _, _), feats in zip(missing, self.model.image_features(pixels, grids)):
                self.memo[digest] = feats
        result = []
        for digest, _, _ in processed:
            self.memo.move_to_end(digest)
            result.append(self.memo[digest])
        while len(self.memo) > self.memo_size:
            self.memo.popitem(last=False)
        return result


def build_prompt(model: KimiVLForConditionalGeneration, tokenizer: Tokenizer,
                 encoder: ImageEncoder, messages: list[dict]) -> Prompt:
    """Template, expand and key a conversation; image features are computed lazily in embed()."""
    images = [image_of(item) for item in image_items(messages)]
    processed = encoder.preprocess(images)
    kh, kw = model.config.vision.merge_kernel_size
    counts = [int(g[0, 0] * g[0, 1]) // (kh * kw) for _, _, g in processed]
    previous, remaining = tokenizer.image_token_counter, iter(counts)
    tokenizer.image_token_counter = lambda item: next(remaining)
    try:
        ids = tokenizer.encode_chat(messages)
    finally:
        tokenizer.image_token_counter = previous
    # Each image is one run of placeholders (runs are separated by <|media_end|><|media_start|>).
    pad = model.config.media_placeholder_token_id
    keys, starts = [], []
    for pos, token in enumerate(ids):
        if token != pad:
            keys.append(token)
            continue
        if pos == 0 or ids[pos - 1] != pad:
            starts.append(pos)
        k = len(starts) - 1
        keys.append(("image", processed[k][0], pos - starts[k]))
    device = model.language_model.model.embed_tokens.weight.device

    def embed(start: int) -> torch.Tensor:
        needed = [k for k, p in enumerate(starts) if p + counts[k] > start]
        feats = encoder.features([processed[k] for k in needed]) if needed else []
        parts = [f[max(0, start - starts[k]):] for k, f in zip(needed, feats)]
        return model.embed(torch.tensor(ids[start:], device=device), parts)

    return Prompt(ids, keys, embed)
