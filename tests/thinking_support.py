"""A test hook for Thinking-model replies: random weights never write `◁think▷` by themselves.

`scripted_replies` replaces the engine's sampler (kimivl_local.engine.generate.Sampler) so that the
next generations emit scripted token ids: the real prompt is prefilled and each forced token is
decoded by the real engine, detokenizer and stop handling. A script that ends before the
generation does falls back to ordinary sampling. Nothing here is in the production path.
"""

from __future__ import annotations

from collections import deque

import kimivl_local.engine.generate as generate_mod
from kimivl_local.engine.sampling import Sampler
from kimivl_local.inputs.thinking import THINK_CLOSE, THINK_OPEN

LONG_REASONING = " ".join(f"step {i} checks the colour again." for i in range(200))


def thinking_reply(reasoning: str, answer: str | None) -> str:
    """The text a Thinking model writes; answer None = the reasoning never closes."""
    if answer is None:
        return f"{THINK_OPEN}{reasoning}"
    return f"{THINK_OPEN}{reasoning}{THINK_CLOSE}{answer}"


def scripted_replies(monkeypatch, model, *replies: str, stop: bool = True) -> deque:
    """Force the next generations (one per reply, in order) to write `replies`, each followed by
    <|im_end|> when stop is set. Returns the queue of scripts not yet used."""
    scripts = deque(model.tokenizer.encode(text) + ([model.tokenizer.im_end_id] if stop else [])
                    for text in replies)

    class ScriptedSampler:
        def __init__(self, params, device="cpu"):
            self._real = Sampler(params, device)
            self._script = iter(scripts.popleft() if scripts else ())

        def __call__(self, logits):
            forced = next(self._script, None)
            return self._real(logits) if forced is None else forced

    monkeypatch.setattr(generate_mod, "Sampler", ScriptedSampler)
    return scripts
