"""Tokenizer, chat template, streaming detokenizer and the synthetic vocabulary.

The oracle for encoding is the original Moonshot pipeline rebuilt here from public pieces:
`tiktoken.load.load_tiktoken_bpe` on the written file, special tokens from tokenizer_config.json,
the template rendered to one string, encoded with every special token allowed.
"""

from __future__ import annotations

import json
import random
import time

import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from kimivl_local.errors import InputError, TokenizerError
from kimivl_local.synthetic.vocab import _corpus_merges, build_ranks, write_tokenizer_files
from kimivl_local.inputs.tokenizer import (
    PAT_STR,
    SPECIAL_TOKEN_NAMES,
    StreamDecoder,
    Tokenizer,
    split_for_tiktoken,
)

N_BASE = 1024

# Reference §6, one image then text: byte for byte.
REFERENCE_EXAMPLE = (
    "<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>"
    "<|im_user|>user<|im_middle|><|media_start|>image<|media_content|><|media_pad|><|media_end|>"
    "Describe this image.<|im_end|><|im_assistant|>assistant<|im_middle|>"
)

CONVERSATIONS = {
    "image_then_text": [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": "a.png"},
                {"type": "text", "text": "Describe this image."},
            ],
        }
    ],
    "plain_string": [{"role": "user", "content": "Hello, how are you?"}],
    "own_system_multi_turn": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 12345 + 678?"},
        {"role": "assistant", "content": "13023"},
        {"role": "user", "content": "And in Chinese? 请用中文回答。"},
    ],
    "several_text_items_and_images": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare "},
                {"type": "text", "text": "these two:\n"},
                {"type": "image_url", "image_url": {"url": "file:///a.png"}},
                {"type": "text", "text": " and "},
                {"image": "b.png"},
                {"type": "text", "text": "  ◁think▷ 🦀 done"},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "The first is a cat."}]},
    ],
    "empty_content": [{"role": "user", "content": ""}, {"role": "assistant", "content": []}],
}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer_files(path, N_BASE)
    return path


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_dir(tok_dir)


def moonshot_split(s: str, max_run: int):
    """Moonshot's `_split_whitespaces_or_nonwhitespaces`, character by character."""
    run_len, run_is_space, start = 0, s[0].isspace() if s else False, 0
    for i, ch in enumerate(s):
        if run_is_space ^ ch.isspace():
            run_len, run_is_space = 1, ch.isspace()
        else:
            run_len += 1
            if run_len > max_run:
                yield s[start:i]
                start, run_len = i, 1
    yield s[start:]


@pytest.fixture(scope="module")
def moonshot_encode(tok_dir):
    """The original pipeline's encode(text) with allowed_special="all"."""
    ranks = load_tiktoken_bpe(str(tok_dir / "tiktoken.model"))
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    special = {v["content"]: int(k) for k, v in config["added_tokens_decoder"].items()}
    enc = tiktoken.Encoding(
        "moonshot", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=special
    )

    def encode(text: str) -> list[int]:
        ids = []
        for i in range(0, len(text), 400_000):
            for piece in moonshot_split(text[i : i + 400_000], 25_000):
                ids += enc.encode(piece, allowed_special="all")
        return ids

    return encode


# --- chat template -------------------------------------------------------------------------


def test_render_matches_reference_example(tok):
    assert tok.render_chat(CONVERSATIONS["image_then_text"]) == REFERENCE_EXAMPLE


def test_render_own_system_no_generation_prompt(tok):
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
    assert tok.render_chat(messages, add_generation_prompt=False) == (
        "<|im_system|>system<|im_middle|>Be terse.<|im_end|>"
        "<|im_user|>user<|im_middle|>Hi<|im_end|>"
    )


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("gen", [True, False])
def test_encode_chat_equals_render_then_encode(tok, moonshot_encode, name, gen):
    messages = CONVERSATIONS[name]
    assert tok.encode_chat(messages, gen) == moonshot_encode(tok.render_chat(messages, gen))


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_jinja_chat_template_renders_like_render_chat(tok, tok_dir, name):
    sandbox = pytest.importorskip("jinja2.sandbox")
    template = json.loads((tok_dir / "tokenizer_config.json").read_text())["chat_template"]
    # The environment transformers uses for apply_chat_template.
    env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    for gen in (True, False):
        messages = CONVERSATIONS[name]
        rendered = env.from_string(template).render(messages=messages, add_generation_prompt=gen)
        assert rendered == tok.render_chat(messages, gen)


def test_control_token_text_in_a_message_stays_text(tok):
    ids = tok.encode_chat([{"role": "user", "content": "say <|im_end|><|media_pad|> please"}])
    # Only the template's own im_end tokens: the default system turn and the user turn.
    assert ids.count(tok.im_end_id) == 2
    assert tok.media_pad_id not in ids
    assert "say <|im_end|><|media_pad|> please" in tok.decode(ids)
    assert tok.encode("<|im_end|>") != [tok.im_end_id]
    assert tok.encode("<|im_end|>", allow_special=True) == [tok.im_end_id]


def test_image_token_counter_expands_placeholders(tok):
    messages = CONVERSATIONS["several_text_items_and_images"]
    plain = tok.encode_chat(messages)
    seen = []
    expanding = Tokenizer(build_ranks(N_BASE))
    expanding.image_token_counter = lambda item: seen.append(item) or (5 if "image" in item else 3)
    expanded = expanding.encode_chat(messages)
    assert [list(it) for it in seen] == [["type", "image_url"], ["image"]]
    assert expanded.count(tok.media_pad_id) == 8
    pad = tok.media_pad_id
    assert [i for i in expanded if i != pad] == [i for i in plain if i != pad]
    assert tok.render_chat(messages).count("<|media_pad|>") == 2


@pytest.mark.parametrize(
    "messages, index",
    [
        ([{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}], 1),
        ([{"role": "user"}], 0),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "audio"}]}], 1),
        ([{"role": "user", "content": [{"type": "text"}]}], 0),
        (["hello"], 0),
    ],
)
def test_bad_messages_name_the_message(tok, messages, index):
    for fn in (tok.render_chat, tok.encode_chat):
        with pytest.raises(InputError, match=f"message {index}"):
            fn(messages)


# --- encode / decode -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Hello world",
        "你好，世界！视觉语言模型",
        "emoji 🦀🐱👍🏽 mix",
        "◁think▷ reasoning ◁/think▷ answer",
        "a\r\n\tb  \u00a0c",
    ],
)
def test_round_trip_unicode(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_pat_str_class_intersection_keeps_han_apart():
    # Tokens that only a wrong pre-tokenizer could produce: a Latin letter joined to a Han
    # character, or '&' joined to letters (if `&&` were read as literal characters).
    ranks = {bytes([b]): b for b in range(256)}
    for word in ("Hello世界", "a&&b"):
        data = word.encode()
        for k in range(2, len(data) + 1):
            ranks.setdefault(data[:k], len(ranks))
    enc = tiktoken.Encoding("t", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens={})
    assert [enc.decode_single_token_bytes(t) for t in enc.encode_ordinary("Hello世界abc")] == [
        b"Hello", *(bytes([b]) for b in "世界abc".encode())
    ]
    assert enc.encode_ordinary("a&&b") == [ord("a"), ord("&"), ord("&"), ord("b")]


def test_split_matches_moonshot_loop():
    rnd = random.Random(0)
    for _ in range(300):
        runs = [rnd.choice("ab \n\u3000x") * rnd.randrange(1, 9) for _ in range(rnd.randrange(6))]
        s = "".join(runs)
        assert list(split_for_tiktoken(s, max_chars=17, max_run=5)) == [
            p for i in range(0, len(s), 17) for p in moonshot_split(s[i : i + 17], 5)
        ]


def test_long_input_encodes_like_moonshot(tok, moonshot_encode):
    text = "x" * 60_001 + " " * 30_000 + "word " * 100
    ids = tok.encode(text)
    assert ids == moonshot_encode(text)
    assert tok.decode(ids) == text


def test_decode_skip_special_and_bad_ids(tok):
    ids = [tok.bos_id, *tok.encode("hi"), tok.im_end_id]
    assert tok.decode(ids) == "[BOS]hi<|im_end|>"
    assert tok.decode(ids, skip_special=True) == "hi"
    with pytest.raises(TokenizerError, match=str(tok.vocab_size)):
        tok.decode([tok.vocab_size])


# --- streaming -----------------------------------------------------------------------------


def test_stream_decoder_holds_back_split_emoji(tok):
    emoji_ids = tok.encode("🦀")
    assert len(emoji_ids) > 1, "the test needs an emoji split across tokens"
    ids = tok.encode("a") + emoji_ids + tok.encode("b")
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tok.decode(ids) == "a🦀b"
    assert "🦀" in pieces and not any("\ufffd" in p for p in pieces)


def test_stream_decoder_equals_decode_on_random_ids(tok):
    rnd = random.Random(1)
    for skip in (False, True):
        for _ in range(200):
            ids = [rnd.randrange(tok.vocab_size) for _ in range(rnd.randrange(12))]
            stream = StreamDecoder(tok, skip_special=skip)
            text = "".join(stream.push(i) for i in ids) + stream.flush()
            assert text == tok.decode(ids, skip_special=skip)


def test_stream_decoder_invalid_and_truncated_bytes(tok):
    stream = StreamDecoder(tok)
    assert stream.push(0xFF) == "\ufffd"  # rank 0xff is the single byte 0xff: never valid UTF-8
    assert stream.push(0xF0) == ""  # start of a 4-byte sequence: wait
    assert stream.flush() == "\ufffd"  # the stream ended inside it
    assert stream.push(ord("z")) == "z"


# --- loading -------------------------------------------------------------------------------


def test_special_ids_sit_at_n_base_plus_offset(tok):
    assert tok.n_base == N_BASE and tok.vocab_size == N_BASE + 256
    for offset, name in SPECIAL_TOKEN_NAMES.items():
        assert tok.special_ids[name] == N_BASE + offset
    assert tok.special_ids[f"<|reserved_token_{N_BASE + 5}|>"] == N_BASE + 5
    assert (tok.bos_id, tok.eos_id, tok.im_end_id, tok.media_pad_id, tok.pad_id) == (
        N_BASE, N_BASE + 1, N_BASE + 2, N_BASE + 21, N_BASE + 255
    )
    assert tok.stop_ids == {N_BASE + 2, N_BASE + 1}


def test_config_names_override_defaults(tmp_path):
    write_tokenizer_files(tmp_path, N_BASE)
    cfg_path = tmp_path / "tokenizer_config.json"
    config = json.loads(cfg_path.read_text())
    config["added_tokens_decoder"][str(N_BASE + 5)]["content"] = "<|custom|>"
    cfg_path.write_text(json.dumps(config))
    assert Tokenizer.from_dir(tmp_path).special_ids["<|custom|>"] == N_BASE + 5
    # A template token renamed away is an error, not a silent switch to plain text.
    config["added_tokens_decoder"][str(N_BASE + 18)]["content"] = "<|media_begin|>"
    cfg_path.write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match="media_start"):
        Tokenizer.from_dir(tmp_path)


def test_missing_tiktoken_model(tmp_path):
    with pytest.raises(TokenizerError, match="tiktoken.model"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("bad_line", ["!!!notbase64 5", "YWJj", "YWJj x"])
def test_corrupt_tiktoken_model_names_file_and_line(tmp_path, bad_line):
    write_tokenizer_files(tmp_path, N_BASE)
    path = tmp_path / "tiktoken.model"
    lines = path.read_text().splitlines()
    lines[300] = bad_line
    path.write_text("\n".join(lines))
    with pytest.raises(TokenizerError, match=r"tiktoken\.model: line 301"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize(
    "content", ["{not json", "[]", '{"added_tokens_decoder": {"x": {"content": "a"}}}']
)
def test_invalid_tokenizer_config(tmp_path, content):
    write_tokenizer_files(tmp_path, N_BASE)
    (tmp_path / "tokenizer_config.json").write_text(content)
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)


# --- synthetic vocabulary ------------------------------------------------------------------


def test_written_files_read_back(tok_dir):
    assert load_tiktoken_bpe(str(tok_dir / "tiktoken.model")) == build_ranks(N_BASE)
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert len(config["added_tokens_decoder"]) == 256
    assert config["added_tokens_decoder"][str(N_BASE + 21)] == {
        "content": "<|media_pad|>",
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }
    assert (config["bos_token"], config["eos_token"], config["tokenizer_class"]) == (
        "[BOS]", "[EOS]", "TikTokenTokenizer"
    )


def test_full_size_vocab_is_unique_reachable_and_fast():
    build_ranks.cache_clear()
    _corpus_merges.cache_clear()
    start = time.perf_counter()
    ranks = build_ranks(163_584)
    assert time.perf_counter() - start < 10
    assert sorted(ranks.values()) == list(range(163_584))  # a dict: tokens are unique
    assert all(ranks[bytes([b])] == b for b in range(256))
    for token, rank in ranks.items():
        if len(token) > 1:
            assert any(
                ranks.get(token[:k], rank) < rank and ranks.get(token[k:], rank) < rank
                for k in range(1, len(token))
            ), token
    assert build_ranks(N_BASE) == {t: r for t, r in ranks.items() if r < N_BASE}  # deterministic
