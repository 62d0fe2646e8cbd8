"""Next-token choice: greedy, temperature, top-k, top-p, with an explicit seeded generator."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import InputError, NonFiniteLogitsError

# Below these, sampling is greedy: the limit of both parameters. Smaller ones would only
# approximate it (a top_p that rounds to 0 in fp32 would even drop every token).
MIN_TEMPERATURE = 1e-4
MIN_TOP_P = 1e-6

@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # below MIN_TEMPERATURE (0 included) = greedy
    top_p: float = 1.0  # below MIN_TOP_P (0 included) = greedy
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None

    def __post_init__(self):
        if not 0 <= self.temperature < math.inf:
            raise InputError(f"temperature must be a finite number >= 0 (got {self.temperature})")
        if not 0.0 <= self.top_p <= 1.0:
            raise InputError(f"top_p must be in [0, 1] (got {self.top_p})")
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
        """logits [vocab] fp32 -> token id; NonFiniteLogitsError when they hold NaN or +inf
        (or are all -inf). The check rides on the token's own read-back: no extra sync."""
        p = self.params
        if p.temperature < MIN_TEMPERATURE or p.top_p < MIN_TOP_P:
            token = logits.argmax()
            # argmax picks a NaN or +inf when there is one; gather keeps this on the device
            ok = logits.gather(0, token.view(1))[0].isfinite()
        else:
            top = logits.max()  # NaN when any logit is NaN
            ok = top.isfinite()
            # Shifted so the largest is 0: a tiny temperature gives -inf, never inf - inf = NaN.
            logits = (logits.float() - top) / p.temperature
            if 0 < p.top_k < logits.numel():
                kth = logits.topk(p.top_k).values[-1]
                logits = logits.masked_fill(logits < kth, -torch.inf)
            if p.top_p < 1.0:
                sorted_logits, order = logits.sort(descending=True)
                probs = sorted_logits.softmax(-1)
                # Drop a token when the tokens ranked above it already reach top_p (keeps >= 1).
                drop = (probs.cumsum(-1) - probs) >= p.top_p
                logits = logits.scatter(0, order[drop], -torch.inf)
            # Broken logits: draw from valid weights anyway (multinomial rejects NaN, on CUDA
            # with a device assert); the flag read back with the token reports them.
            probs = torch.where(ok, logits.softmax(-1), 1.0)
            token = torch.multinomial(probs, 1, generator=self.generator)[0]
        token, ok = torch.stack((token, ok.long())).tolist()
        if not ok:
            raise NonFiniteLogitsError("the model produced NaN or infinite logits, so generation "
                                       "stopped; its weights or inputs are broken (check the "
                                       "checkpoint, e.g. re-download or re-quantize it)")
        return token
