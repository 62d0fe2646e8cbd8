"""Images through the whole model: placeholder expansion, feature splicing, prefix reuse."""

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from kimivl_local.engine.generate import Engine
from kimivl_local.engine.multimodal import build_prompt
from kimivl_local.errors import InputError
from kimivl_local.inputs.media import image_of


def _image(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("img")
    paths = []
    for i, (w, h) in enumerate([(150, 100), (60, 60)]):
        paths.append(folder / f"{i}.png")
        _image(w, h, i).save(paths[-1])
    return paths


def _chat(images):
    content = [{"type": "image", "image": str(p)} for p in images]
    return [{"role": "user", "content": content + [{"type": "text", "text": "Compare them."}]}]


def test_placeholders_expand_to_token_counts(tiny_model_fp32, images):
    tok = tiny_model_fp32.tokenizer
    ids = tok.encode_chat(_chat(images))
    pad = tiny_model_fp32.config.media_placeholder_token_id
    # 150x100 -> padded 168x112 -> 12x8 patches -> 6x4 merged = 24; 60x60 -> 84x84 -> 9.
    assert ids.count(pad) == 24 + 9
    first = ids.index(pad)
    assert ids[first - 1] == tok.special_ids["<|media_content|>"]
    assert ids[first + 24] == tok.special_ids["<|media_end|>"]


def test_logits_with_images_splice_features_in_order(tiny_model_fp32, images):
    model = tiny_model_fp32
    ids = torch.tensor(model.tokenizer.encode_chat(_chat(images)))
    got = model.logits(ids, images=images)
    # Independently: embed the tokens, overwrite placeholder rows with each image's features.
    feats = model.image_features(images)
    lm = model.model.language_model
    embeds = lm.embed(ids).clone()
    slots = (ids == model.config.media_placeholder_token_id).nonzero().flatten()
    embeds[slots[:24]] = feats[0]
    embeds[slots[24:]] = feats[1]
    want = lm.logits(lm.hidden_states(embeds))
    assert torch.allclose(got, want, atol=1e-5)
    text_only = model.logits(ids.masked_fill(ids == model.config.media_placeholder_token_id, 0))
    assert not torch.allclose(got[-1], text_only[-1], atol=1e-3)  # the images matter


def test_placeholder_count_mismatch_is_an_error(tiny_model_fp32, images):
    ids = torch.tensor(tiny_model_fp32.tokenizer.encode_chat(_chat(images)))
    with pytest.raises(InputError, match="33 image placeholder tokens but the images give 24"):
        tiny_model_fp32.logits(ids, images=images[:1])


def test_multi_turn_reuses_cached_image_prefix(tiny_model_fp32, images):
    model = tiny_model_fp32
    first = _chat(images[:1])
    later = first + [{"role": "assistant", "content": "One picture."},
                     {"role": "user", "content": [{"type": "image", "image": str(images[1])},
                                                  {"type": "text", "text": "And this?"}]}]
    calls = []
    original = model.model.image_features

    def counting(pixels, grids):
        calls.append(len(grids))
        return original(pixels, grids)

    engine = Engine(model.model, max_context=256)
    model.model.image_features = counting
    try:
        model.images.memo.clear()
        engine.prefill(build_prompt(model.model, model.tokenizer, model.images, first))
        logits, reused = engine.prefill(build_prompt(model.model, model.tokenizer, model.images, later))
    finally:
        model.model.image_features = original
    first_len = len(model.tokenizer.encode_chat(first))
    assert reused == first_len  # the first image's placeholders came from the cache
    assert calls == [1, 1]  # each image went through MoonViT once
    fresh, _ = Engine(model.model, max_context=256).prefill(
        build_prompt(model.model, model.tokenizer, model.images, later))
    assert torch.allclose(logits, fresh, atol=1e-4 * fresh.abs().max())


def test_same_ids_other_image_is_not_reused(tiny_model_fp32, tmp_path):
    model = tiny_model_fp32
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    _image(60, 60, 10).save(a)
    _image(60, 60, 11).save(b)  # same size: identical token ids, different pixels
    engine = Engine(model.model, max_context=256)
    engine.prefill(build_prompt(model.model, model.tokenizer, model.images, _chat([a])))
    _, reused = engine.prefill(build_prompt(model.model, model.tokenizer, model.images, _chat([b])))
    first_pad = model.tokenizer.encode_chat(_chat([b])).index(model.config.media_placeholder_token_id)
    assert reused == first_pad


def test_image_item_forms(tmp_path):
    img = _image(30, 20, 3)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    assert image_of({"type": "image_url", "image_url": {"url": url}}) == buf.getvalue()
    assert image_of({"type": "image", "image": "file:///x/y.png"}) == "/x/y.png"
    assert image_of({"image": img}) is img
    with pytest.raises(InputError, match="offline"):
        image_of({"image_url": "https://example.com/cat.png"})
    with pytest.raises(InputError, match="data: URL"):
        image_of({"image_url": "data:image/png;base64,@@@"})


def test_generate_with_image_and_bad_image(tiny_model_fp32, images, tmp_path):
    text = "".join(tiny_model_fp32.generate(_chat(images), max_new_tokens=4))
    assert tiny_model_fp32.last_stats.prompt_tokens > 33 and isinstance(text, str)
    bogus = tmp_path / "not-an-image.png"
    bogus.write_text("hello")
    with pytest.raises(InputError, match="not-an-image.png"):
        list(tiny_model_fp32.generate(_chat([bogus]), max_new_tokens=4))
