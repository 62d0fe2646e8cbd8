"""A tiktoken vocabulary of our own, for synthetic checkpoints (the real one cannot be shipped).

Ranks 0..255 are the single bytes, then byte-pair merges learned from a small multilingual corpus,
then, up to the requested size, filler tokens. Every multi-byte token is the concatenation of two
lower-ranked tokens, so BPE can reach all of them, as in a real vocabulary.
"""

from __future__ import annotations

import base64
import functools
import heapq
import json
from collections import Counter
from pathlib import Path

import regex

from ..inputs.tokenizer import (NUM_RESERVED_SPECIAL,
    PAT_STR,
    SPECIAL_TOKEN_NAMES,
    default_special_name)

CORPUS = """\
The quick brown fox jumps over the lazy dog. A local model runs on your own machine: no server,
no account, and nothing leaves the computer. It reads an image, splits it into small patches, and
turns each patch into a vector that the language model can attend to, just like the words of the
question. When the answer streams back, every token is shown as soon as it is ready.

Quantization stores each weight in four or eight bits with one scale per group of 128 values. The
model then needs about a quarter of the memory, and the matrix products read far fewer bytes, which
is what limits decoding speed on a consumer GPU. Mixture-of-experts layers send each token to six of
sixty-four experts, so only three billion of the sixteen billion parameters work for any one token.

She said: "Don't worry, we'll check the numbers again tomorrow." They're sure it's right; I'm not.
Prices rose 3.5% in 2024, from $1,299.99 to $1,345.50; call 555-0142 or write to help@example.com.
Dates: 2025-04-10, 12:30:45 UTC. Sizes: 1024 x 768, 3840x2160, 0.5 GB, 33 GB, 16384 tokens.

def attention(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v

for (int i = 0; i < n; ++i) {
    out[i] = a[i] * b[i] + c;  // fused multiply-add
}

{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}

◁think▷ The picture shows a cat on a sofa; the user wants a short answer. ◁/think▷ A cat. 🐱👍

视觉语言模型可以同时理解图片和文字。用户上传一张照片，模型先把图像切成小块，再转换成向量，
然后和问题一起输入语言模型，最后生成回答。本地运行不需要联网，数据不会离开你的电脑。
今天天气很好，我们去公园散步吧。这个模型有十六亿个参数吗？不，它有一百六十亿个参数。

Ein kleines Modell läuft schnell. Le modèle répond en français. El modelo funciona sin conexión.
"""


@functools.lru_cache(maxsize=1)
def _corpus_merges() -> tuple[bytes, ...]:
    """Every token of word-frequency BPE over CORPUS, in merge order, until no pair is left."""
    words = Counter(regex.findall(PAT_STR, CORPUS, flags=regex.V1))  # V1: `&&` is intersection
    symbols = [[bytes([b]) for b in w.encode()] for w in words]
    freqs = list(words.values())
    pair_count: Counter[tuple[bytes, bytes]] = Counter()
    pair_words: dict[tuple[bytes, bytes], set[int]] = {}

    changed: set[tuple[bytes, bytes]] = set()

    def count(wi: int, sign: int) -> None:
        syms = symbols[wi]
        for pair in zip(syms, syms[1:]):
            pair_count[pair] += sign * freqs[wi]
            pair_words.setdefault(pair, set()).add(wi)
            changed.add(pair)

    for wi in range(len(symbols)):
        count(wi, 1)
    # Max-heap on (count, pair) with lazy deletion: a changed count is pushed again and the stale
    # entry skipped when popped. Ties go to the smallest pair, which keeps the result deterministic.
    heap = [(-c, pair) for pair, c in pair_count.items()]
    heapq.heapify(heap)
    merges: list[bytes] = []
    seen = {bytes([b]) for b in range(256)}
    while heap:
        neg, pair = heapq.heappop(heap)
        if -neg != pair_count[pair] or -neg <= 0:
            continue
        merged = pair[0] + pair[1]
        if merged not in seen:  # one string can arise from two different splits
            seen.add(merged)
            merges.append(merged)
        for wi in sorted(pair_words.pop(pair)):
            count(wi, -1)
            syms, out, i = symbols[wi], [], 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == pair:
                    out.append(merged)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            symbols[wi] = out
            count(wi, 1)
        for p in changed:
            if pair_count[p] > 0:
                heapq.heappush(heap, (-pair_count[p], p))
        changed.clear()
    return tuple(merges)


@functools.lru_cache(maxsize=4)
def build_ranks(n_base: int) -> dict[bytes, int]:
    """`n_base` tokens -> rank, deterministic. Do not mutate the (cached) result."""
    if n_base < 256:
        raise ValueError(f"n_base must be at least 256 (the single bytes), got {n_base}")
    tokens = [bytes([b]) for b in range(256)] + list(_corpus_merges()[: n_base - 256])
    known = set(tokens)
    # Fillers join two printable tokens (so they stay valid UTF-8), walking pairs (i, j) of the
    # pool by increasing i + j: low-ranked, short pieces come first and every filler is new.
    pool = [t for t in tokens if _printable(t)]
    diagonal = 0
    while len(tokens) < n_base:
        size = len(pool)
        for i in range(max(0, diagonal - size + 1), min(diagonal, size - 1) + 1):
            token = pool[i] + pool[diagonal - i]
            if token not in known:
                known.add(token)
                tokens.append(token)
                pool.append(token)
                if len(tokens) == n_base:
                    break
        diagonal += 1
    return {token: rank for rank, token in enumerate(tokens)}


def _printable(token: bytes) -> bool:
    try:
        return token.decode("utf-8").isprintable()
    except UnicodeDecodeError:
        return False


# The official template (reference §6) in Jinja, for tools that read tokenizer_config.json.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>' -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{{- '<|im_system|>' -}}"
    "{%- elif message['role'] == 'user' -%}{{- '<|im_user|>' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- '<|im_assistant|>' -}}"
    "{%- endif -%}"
    "{{- message['role'] -}}{{- '<|im_middle|>' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}"
    "{{- '<|media_start|>image<|media_content|><|media_pad|><|media_end|>' -}}"
    "{%- else -%}{{- content['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_assistant|>assistant<|im_middle|>' -}}{%- endif -%}"
)


def write_tokenizer_files(dst: Path, n_base: int) -> None:
    """Write `tiktoken.model` and `tokenizer_config.json` laid out like the official ones."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    ranks = build_ranks(n_base)
    lines = (f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks.items())
    (dst / "tiktoken.model").write_text("".join(lines), encoding="ascii")

    names = {n_base + k: default_special_name(k, n_base) for k in range(NUM_RESERVED_SPECIAL)}
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    config = {
        "added_tokens_decoder": {
            str(i): {"content": name, **flags, "special": True} for i, name in names.items()
        },
        "additional_special_tokens": [
            name for name in SPECIAL_TOKEN_NAMES.values() if name.startswith("<|")
        ],
        "auto_map": {"AutoTokenizer": ["tokenization_moonshot.TikTokenTokenizer", None]},
        "bos_token": "[BOS]",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "[EOS]",
        "model_max_length": 1048576,
        "pad_token": "[PAD]",
        "tokenizer_class": "TikTokenTokenizer",
        "unk_token": "[UNK]",
    }
    (dst / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
