"""Generation: prefill, one decode step, and a token iterator over a preallocated latent cache.

The cache is reused across calls: a new prompt that starts with what is already cached (the
earlier turns of a chat, images included) only prefills its new suffix.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field

import torch

from ..errors import ContextLengthError
from ..kernels.bridge import torch_single_threaded
from ..model.kimivl import KimiVLForConditionalGeneration
from .cache import LatentCache
from .cuda_graph import DecodeGraph
from .sampling import Sampler, SamplingParams


@dataclass
class Prompt:
    """What prefill needs: token ids, a cache key per position (the id, or for an image
    placeholder the image's digest and index, so an equal id never stands for another image),
    and a function giving the input embeddings of positions start..T-1."""

    ids: list[int]
    keys: list[Hashable]
    embed: Callable[[int], torch.Tensor]

    @classmethod
    def from_ids(cls, model: KimiVLForConditionalGeneration, ids: list[int]) -> "Prompt":
        lm = model.language_model
        device = lm.model.embed_tokens.weight.device
        return cls(list(ids), list(ids), lambda start: lm.embed(torch.tensor(ids[start:], device=device)))


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
    prefill_chunk: int = 2048  # tokens per prefill forward
    # How the reader of a context-length error can raise the limit (a CLI flag), or None when
    # they cannot: a server's clients get the server's limit instead.
    context_setting: str | None = "--max-context"
    stats: GenerationStats = field(default_factory=GenerationStats)

    def __post_init__(self):
        cfg = self.model.config.text
        limit = cfg.max_position_embeddings
        if not 0 < self.max_context <= limit:
            raise ContextLengthError(f"max context must be in 1..{limit} (got {self.max_context})")
        lm = self.model.language_model
        self.cache = LatentCache(cfg.num_hidden_layers, self.max_context, cfg.latent_dim,
                                 lm.dtype, lm.device)
        self.graph: DecodeGraph | bool | None = None  # None: not tried yet; False: not usable

    def check_fits(self, n_tokens: int) -> None:
        if n_tokens >= self.max_context:
            raise ContextLengthError(self.overflow_message(n_tokens))

    def overflow_message(self, n_tokens: int) -> str:
        limit = self.model.config.text.max_position_embeddings
        holds = (f"the context holds {self.max_context}" if self.context_setting
                 else f"this server's context holds {self.max_context} tokens")
        if self.max_context >= limit:
            advice = f"shorten it ({self.max_context} is the model's maximum)"
        elif self.context_setting:
            advice = f"shorten it or raise {self.context_setting} (up to {limit})"
        else:
            advice = "shorten the prompt or the conversation"
        return (f"the prompt is {n_tokens} tokens but {holds} (including at least one token to "
                f"generate); {advice}")

    def reusable(self, prompt: Prompt) -> int:
        """How many leading prompt positions prefill will serve from the cache."""
        # Always recompute the last position: its logits pick the first new token.
        return min(self.cache.common_prefix(prompt.keys), len(prompt.ids) - 1)

    @torch.inference_mode()
    def prefill(self, prompt: Prompt | list[int]) -> tuple[torch.Tensor, int]:
        """Fill the cache with the prompt; return (last position's fp32 logits [vocab], number
        of leading prompt positions served from the cache)."""
        if not isinstance(prompt, Prompt):
            prompt = Prompt.from_ids(self.model, prompt)
        self.check_fits(len(prompt.ids))
        lm = self.model.language_model
        start = self.reusable(prompt)
        embeds = prompt.embed(start)  # the vision tower keeps torch's threads
        # On the CPU the heavy work is in our kernels, which keep their threads; torch's glue
        # between them (norms, RoPE, residuals, dtype casts) goes on one thread, as in a decode
        # step: on 2 shared cores its OpenMP barriers made a 512-token prefill 1.37x slower.
        on_cpu = self.cache.device.type == "cpu"
        with torch_single_threaded() if on_cpu else contextlib.nullcontext():
            # Chunks bound the activations (expanded K/V, MLP intermediates) of a long document;
            # later chunks attend to the earlier ones through the cache.
            for begin in range(0, embeds.shape[0], self.prefill_chunk):
                chunk = embeds[begin:begin + self.prefill_chunk]
                hidden = lm.hidden_states(chunk, self.cache.kv, start + begin)
            logits = lm.logits(hidden[-1:])[0]
        self.cache.set_tokens(prompt.keys)
        return logits, start

    @torch.inference_mode()
    def decode_step(self, token: int) -> torch.Tensor:
        """Append one token and return the next position's fp32 logits [vocab]. On a GPU the
        step is a CUDA graph, captured at the first call (cuda_graph.py) when the model allows."""
        lm = self.model.language_model
        position = len(self.cache.tokens)
        embeds = lm.embed(torch.tensor([token], device=self.cache.device))
        if self.graph is None and self.cache.device.type == "cuda":
            self.graph = DecodeGraph.capture(lm, self.cache.kv, position) or False
        if self.graph:
            logits = self.graph.run(embeds, position)
        else:
            lm.rope.ensure(position + 1, self.cache.device)
            where = torch.tensor([position], dtype=torch.int64, device=self.cache.device)
            on_cpu = self.cache.device.type == "cpu"
            with torch_single_threaded() if on_cpu else contextlib.nullcontext():
                logits = lm.logits(lm.decode_hidden(embeds, where, self.cache.kv))
        self.cache.append(token)
        return logits[0]

    def generate(self, prompt: Prompt | list[int], *, max_new_tokens: int,
                 sampling: SamplingParams, stop_ids: set[int]) -> Iterator[int]:
        """Yield generated token ids (stop tokens are not yielded); stats land in self.stats."""
        if not isinstance(prompt, Prompt):
            prompt = Prompt.from_ids(self.model, prompt)
        self.stats = stats = GenerationStats(prompt_tokens=len(prompt.ids))
        sampler = Sampler(sampling, self.cache.device)
        t0 = time.perf_counter()
        logits, stats.reused_tokens = self.prefill(prompt)
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
