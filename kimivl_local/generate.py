"""Generation: prefill, one decode step, and a token iterator over a preallocated latent cache.

The cache is reused across calls: a new prompt that starts with the tokens already cached (the
earlier turns of a chat) only prefills its new suffix.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .cache import LatentCache
from .errors import ContextLengthError
from .model.kimivl import KimiVLForConditionalGeneration
from .sampling import Sampler, SamplingParams


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens served from the cache of an earlier call
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    finish_reason: str = ""  # "stop", "length" (max_new_tokens) or "context" (cache full)

    @property
    def prefill_tokens_per_second(self) -> float:
        new = self.prompt_tokens - self.reused_tokens
        return new / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        # The first generated token comes from the prefill; the rest are decode steps.
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds else 0.0


@dataclass
class Engine:
    model: KimiVLForConditionalGeneration
    max_context: int
    stats: GenerationStats = field(default_factory=GenerationStats)

    def __post_init__(self):
        cfg = self.model.config.text
        limit = cfg.max_position_embeddings
        if not 0 < self.max_context <= limit:
            raise ContextLengthError(f"max context must be in 1..{limit} (got {self.max_context})")
        lm = self.model.language_model
        weight = lm.lm_head.weight
        self.cache = LatentCache(cfg.num_hidden_layers, self.max_context, cfg.latent_dim,
                                 weight.dtype, weight.device)

    @torch.inference_mode()
    def prefill(self, input_ids: list[int], embeds: torch.Tensor | None = None,
                reusable: int | None = None) -> tuple[torch.Tensor, int]:
        """Fill the cache with the prompt; return (last position's fp32 logits [vocab], number
        of leading prompt tokens served from the cache).

        embeds: the prompt's input embeddings [T, hidden] when some are not token embeddings
        (images); reusable: how many leading tokens may be served from the cache (default all
        that match; image embeddings pass the index of their first placeholder).
        """
        lm = self.model.language_model
        if len(input_ids) >= self.max_context:
            raise ContextLengthError(
                f"the prompt is {len(input_ids)} tokens but the context holds {self.max_context} "
                f"(including at least one token to generate); shorten it or raise --max-context "
                f"(up to {self.model.config.text.max_position_embeddings})")
        start = self.cache.common_prefix(input_ids, limit=reusable)
        start = min(start, len(input_ids) - 1)  # always run the last token to get its logits
        if embeds is None:
            ids = torch.tensor(input_ids[start:], device=self.cache.device)
            new = lm.embed(ids)
        else:
            new = embeds[start:]
        hidden = lm.hidden_states(new, self.cache.kv, start)
        self.cache.set_tokens(input_ids)
        return lm.logits(hidden[-1:])[0], start

    @torch.inference_mode()
    def decode_step(self, token: int) -> torch.Tensor:
        """Append one token and return the next position's fp32 logits [vocab]."""
        lm = self.model.language_model
        start = len(self.cache.tokens)
        hidden = lm.hidden_states(lm.embed(torch.tensor([token], device=self.cache.device)),
                                  self.cache.kv, start)
        self.cache.append(token)
        return lm.logits(hidden)[0]

    def generate(self, input_ids: list[int], *, max_new_tokens: int, sampling: SamplingParams,
                 stop_ids: set[int], embeds: torch.Tensor | None = None,
                 reusable: int | None = None) -> Iterator[int]:
        """Yield generated token ids (stop tokens are not yielded); stats land in self.stats."""
        self.stats = stats = GenerationStats(prompt_tokens=len(input_ids))
        sampler = Sampler(sampling, self.cache.device)
        t0 = time.perf_counter()
        logits, stats.reused_tokens = self.prefill(input_ids, embeds, reusable)
        stats.prefill_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        stats.finish_reason = "length"
        for i in range(max_new_tokens):
            token = sampler(logits)
            if token in stop_ids:
                stats.finish_reason = "stop"
                break
            stats.generated_tokens += 1
            yield token
            if i + 1 == max_new_tokens:
                break
            if len(self.cache.tokens) >= self.max_context:
                stats.finish_reason = "context"
                break
            logits = self.decode_step(token)
            stats.decode_seconds = time.perf_counter() - t0
