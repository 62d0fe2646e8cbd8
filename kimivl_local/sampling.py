"""Next-token choice: greedy, temperature, top-k, top-p, with an explicit seeded generator."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InputError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0 (got {self.temperature})")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0 (got {self.top_k})")


class Sampler:
    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu"):
        self.params = params
        self.generator = torch.Generator(device=device)
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        """logits [vocab] fp32 -> token id."""
        p = self.params
        if p.temperature == 0.0:
            return int(logits.argmax())
        logits = logits.float() / p.temperature
        if 0 < p.top_k < logits.numel():
            kth = logits.topk(p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, -torch.inf)
        if p.top_p < 1.0:
            sorted_logits, order = logits.sort(descending=True)
            probs = sorted_logits.softmax(-1)
            # Drop a token when the tokens ranked above it already reach top_p (keeps >= 1).
            drop = (probs.cumsum(-1) - probs) >= p.top_p
            logits = logits.scatter(0, order[drop], -torch.inf)
        probs = logits.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
