"""Kimi-VL tokenizer: tiktoken BPE, the chat template and a streaming detokenizer (reference §6).

Reads a checkpoint's `tiktoken.model` and `tokenizer_config.json` the way Moonshot's
`tokenization_moonshot.py` does, without executing any of the checkpoint's code. Chat messages are
encoded segment by segment, so text typed by a user can never become a control token.
"""

from __future__ import annotations

import base64
import codecs
import numbers
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import tiktoken

from ..checkpoint.config import read_json
from ..errors import InputError, TokenizerError

# Moonshot's pre-tokenizer as authored (Rust-regex syntax). tiktoken's regex engine supports the
# class intersection `&&[^\p{Han}]`, so Han characters never join a run of other letters.
PAT_STR = "|".join(
    [
        r"[\p{Han}]+",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)

NUM_RESERVED_SPECIAL = 256
# Special-token names by offset from n_base; tokenizer_config.json's added_tokens_decoder wins.
SPECIAL_TOKEN_NAMES = {
    0: "[BOS]",
    1: "[EOS]",
    2: "<|im_end|>",
    3: "<|im_user|>",
    4: "<|im_assistant|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    9: "[EOT]",
    10: "<|im_system|>",
    17: "<|im_middle|>",
    18: "<|media_start|>",
    19: "<|media_content|>",
    20: "<|media_end|>",
    21: "<|media_pad|>",
    254: "[UNK]",
    255: "[PAD]",
}

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant"
ROLE_TOKENS = {"system": "<|im_system|>", "user": "<|im_user|>", "assistant": "<|im_assistant|>"}
_TEMPLATE_TOKENS = (
    *ROLE_TOKENS.values(),
    "<|im_middle|>",
    "<|im_end|>",
    "<|media_start|>",
    "<|media_content|>",
    "<|media_pad|>",
    "<|media_end|>",
)

# Same limits as Moonshot's encode(): tiktoken panics above ~400k chars per call and is quadratic in
# the length of one pre-token, so very long runs of (non-)whitespace are cut (tiktoken issue 195).
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000

# [{"role": "system"|"user"|"assistant", "content": str | [{"type": "text", "text": ...} | image]}]
Messages = Sequence[Mapping[str, Any]]


def default_special_name(offset: int, n_base: int) -> str:
    return SPECIAL_TOKEN_NAMES.get(offset, f"<|reserved_token_{n_base + offset}|>")


def split_for_tiktoken(
    text: str, max_chars: int = MAX_ENCODE_CHARS, max_run: int = MAX_RUN_CHARS
) -> Iterator[str]:
    """Cut `text` exactly where Moonshot's encode() does: into `max_chars` chunks, then inside each
    chunk every `max_run` characters of a run of whitespace or of non-whitespace."""
    # The look-behinds anchor a match at the start of a maximal run, keeping the scan linear.
    long_run = re.compile(rf"(?<!\S)\S{{{max_run + 1},}}|(?<!\s)\s{{{max_run + 1},}}")
    for i in range(0, len(text), max_chars):
        chunk = text[i : i + max_chars]
        start = 0
        for m in long_run.finditer(chunk):
            for cut in range(m.start() + max_run, m.end(), max_run):
                yield chunk[start:cut]
                start = cut
        yield chunk[start:]


def _read_ranks(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken BPE file (`base64(token) rank` per line) with errors that name the line."""
    if not path.is_file():
        raise TokenizerError(f"{path.name} is missing from {path.parent}")
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{path} cannot be read as a tiktoken BPE file: {exc}") from None
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
        except ValueError:  # binascii.Error included
            raise TokenizerError(
                f"{path}: line {lineno} is not 'base64-token rank': {line[:80]!r}"
            ) from None
    if not ranks:
        raise TokenizerError(f"{path} holds no tokens")
    if set(ranks.values()) != set(range(len(ranks))):
        raise TokenizerError(f"{path}: ranks must be 0..N-1 with every token distinct")
    return ranks


def _token_name(value: Any) -> str | None:
    """bos_token etc. are a string or a serialized AddedToken {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """Kimi-VL's tiktoken tokenizer: n_base BPE tokens, then 256 reserved special tokens."""

    # Maps an image item to its number of placeholder tokens; set by the processor. When None,
    # encode_chat keeps the template's single <|media_pad|> per image.
    image_token_counter: Callable[[dict], int] | None = None
    # Turns pdf/video items into text and image items before templating; set by the model.
    media_expander: Callable[[Messages], Messages] | None = None

    def __init__(
        self,
        mergeable_ranks: dict[bytes, int],
        special_names: Mapping[int, str] | None = None,
        *,
        bos_token: str = "[BOS]",
        eos_token: str = "[EOS]",
        pad_token: str = "[PAD]",
        unk_token: str = "[UNK]",
    ):
        """`special_names` maps token ids to names and overrides the defaults; ids outside the
        reserved range are ignored, as Moonshot's tokenizer does."""
        n_base = len(mergeable_ranks)
        id_to_name = {
            n_base + k: default_special_name(k, n_base) for k in range(NUM_RESERVED_SPECIAL)
        }
        id_to_name.update({i: n for i, n in (special_names or {}).items() if i in id_to_name})
        special = {name: i for i, name in id_to_name.items()}
        if len(special) != NUM_RESERVED_SPECIAL:
            shared = sorted(n for n, c in Counter(id_to_name.values()).items() if c > 1)
            raise TokenizerError(f"several special tokens are named {', '.join(shared)}")
        self._n_base = n_base
        self._special = special
        self._enc = tiktoken.Encoding(
            name=f"kimi-vl-{n_base}",
            pat_str=PAT_STR,
            mergeable_ranks=mergeable_ranks,
            special_tokens=special,
        )
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = (
            self._special_id(t) for t in (bos_token, eos_token, pad_token, unk_token)
        )
        # The template refers to control tokens by name, so a renamed one must fail here, not
        # silently encode as text.
        self._ctl = {name: self._special_id(name) for name in _TEMPLATE_TOKENS}
        self.im_end_id = self._ctl["<|im_end|>"]
        self.media_start_id = self._ctl["<|media_start|>"]
        self.media_end_id = self._ctl["<|media_end|>"]
        self.media_pad_id = self._ctl["<|media_pad|>"]

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        ranks = _read_ranks(path / "tiktoken.model")
        cfg_path = path / "tokenizer_config.json"
        cfg = read_json(cfg_path, required=False, error=TokenizerError)
        decoder = cfg.get("added_tokens_decoder", {})
        try:
            names = {int(i): tok["content"] for i, tok in decoder.items()}
            if not all(isinstance(n, str) for n in names.values()):
                raise TypeError
        except (AttributeError, KeyError, TypeError, ValueError):
            raise TokenizerError(
                f"{cfg_path}: added_tokens_decoder must map token ids to {{'content': name}}"
            ) from None
        roles = {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            if cfg.get(key) is not None:
                name = _token_name(cfg[key])
                if not isinstance(name, str):
                    raise TokenizerError(f"{cfg_path}: {key} must be a token name")
                roles[key] = name
        try:
            return cls(ranks, names, **roles)
        except TokenizerError as exc:
            raise TokenizerError(f"{path}: {exc}") from None

    def _special_id(self, name: str) -> int:
        if name not in self._special:
            raise TokenizerError(f"special token {name} is not defined")
        return self._special[name]

    @property
    def n_base(self) -> int:
        """Number of ordinary BPE tokens; special ids start here."""
        return self._n_base

    @property
    def vocab_size(self) -> int:
        return self._n_base + NUM_RESERVED_SPECIAL

    @property
    def special_ids(self) -> dict[str, int]:
        return dict(self._special)

    @property
    def stop_ids(self) -> frozenset[int]:
        """Generation ends on <|im_end|> or [EOS] (reference §6)."""
        return frozenset((self.im_end_id, self.eos_id))

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Plain text by default: `<|im_end|>` typed by a user stays ordinary bytes. With
        allow_special, special-token names become their ids (Moonshot's behaviour)."""
        ids: list[int] = []
        for piece in split_for_tiktoken(text):
            if allow_special:
                ids += self._enc.encode(piece, allowed_special="all")
            else:
                ids += self._enc.encode_ordinary(piece)
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token; a special token gives its name."""
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(
                f"token id {token_id} is outside the vocabulary 0..{self.vocab_size - 1}"
            )
        return self._enc.decode_single_token_bytes(token_id)

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Invalid UTF-8 (e.g. a cut multi-byte character) decodes to U+FFFD."""
        return b"".join(
            self.token_bytes(i) for i in ids if not (skip_special and i >= self._n_base)
        ).decode("utf-8", errors="replace")

    def render_chat(self, messages: Messages, add_generation_prompt: bool = True) -> str:
        """The prompt string of Kimi-VL's chat template, with one <|media_pad|> per image."""
        parts = _chat_parts(self._expand(messages), add_generation_prompt)
        return "".join("<|media_pad|>" if kind == "image" else value for kind, value in parts)

    def encode_chat(self, messages: Messages, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the chat template. Equal to encoding render_chat() with all special tokens
        allowed, except that message text never becomes a control token. (Runs of over 25k
        non-whitespace characters touching a control token may also cut elsewhere than Moonshot's
        whole-string split, which counts the control token's characters into the run.)"""
        ids: list[int] = []
        text: list[str] = []
        for kind, value in _chat_parts(self._expand(messages), add_generation_prompt):
            if kind == "text":
                text.append(value)
                continue
            ids += self.encode("".join(text))
            text.clear()
            if kind == "control":
                ids.append(self._ctl[value])
            else:
                ids += [self.media_pad_id] * self._image_tokens(value)
        return ids + self.encode("".join(text))

    def _expand(self, messages: Messages) -> Messages:
        return self.media_expander(messages) if self.media_expander else messages

    def _image_tokens(self, item: dict) -> int:
        if self.image_token_counter is None:
            return 1
        n = self.image_token_counter(item)
        if not isinstance(n, numbers.Integral) or n < 1:
            raise InputError(
                f"image_token_counter returned {n!r}; an image needs at least one token"
            )
        return int(n)


def _chat_parts(messages: Messages, add_generation_prompt: bool) -> list[tuple[str, Any]]:
    """The template as ("control", name) / ("text", str) / ("image", item) parts. render_chat and
    encode_chat both walk this list, so the string and the ids cannot disagree."""
    parts: list[tuple[str, Any]] = []

    def turn(role: str) -> None:
        parts.extend([("control", ROLE_TOKENS[role]), ("text", role), ("control", "<|im_middle|>")])

    check_messages(messages)
    for index, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise InputError(f"message {index} must be a dict with 'role' and 'content'")
        role = msg.get("role")
        if not isinstance(role, str) or role not in ROLE_TOKENS:
            raise InputError(
                f"message {index}: role must be one of {sorted(ROLE_TOKENS)}, not {role!r}"
            )
        if index == 0 and role != "system":
            turn("system")
            parts += [("text", DEFAULT_SYSTEM_PROMPT), ("control", "<|im_end|>")]
        turn(role)
        content = msg.get("content")
        if isinstance(content, str):
            parts.append(("text", content))
        elif isinstance(content, Sequence):
            for k, item in enumerate(content):
                parts += _item_parts(item, f"message {index}, item {k}")
        else:
            raise InputError(f"message {index}: content must be a string or a list of items")
        parts.append(("control", "<|im_end|>"))
    if add_generation_prompt:
        turn("assistant")
    return parts


def check_messages(messages: Any) -> None:
    """InputError unless `messages` is a list (or other sequence) of messages."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise InputError("messages must be a list of {'role': ..., 'content': ...} dicts, not "
                         f"{type(messages).__name__}")


def _item_parts(item: Any, where: str) -> list[tuple[str, Any]]:
    if not isinstance(item, Mapping):
        raise InputError(f"{where}: an item must be a dict, not {type(item).__name__}")
    if is_image_item(item):
        return [
            ("control", "<|media_start|>"),
            ("text", "image"),
            ("control", "<|media_content|>"),
            ("image", item),
            ("control", "<|media_end|>"),
        ]
    if item.get("type") != "text":
        raise InputError(
            f"{where}: unknown item type {item.get('type')!r} (expected 'text' or 'image')"
        )
    if not isinstance(item.get("text"), str):
        raise InputError(f"{where}: a text item needs a string 'text'")
    return [("text", item["text"])]


def is_image_item(item: Mapping) -> bool:
    """Same test as the official template: an image by type, or by an image/image_url key."""
    return item.get("type") == "image" or "image" in item or "image_url" in item


class StreamDecoder:
    """Turns tokens into text as they arrive. A character split across tokens is held back until
    complete; bytes that can never complete become U+FFFD, exactly as decode() would give."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._tok = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        data = self._tok.token_bytes(token_id)
        if self._skip_special and token_id >= self._tok.n_base:
            return ""
        return self._utf8.decode(data)

    def flush(self) -> str:
        """End of stream: held-back bytes become U+FFFD; the decoder is ready for a new stream."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
