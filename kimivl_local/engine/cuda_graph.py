"""The decode step as one CUDA graph: at batch 1 a step is ~27 layers x a dozen small kernels,
and launching them one by one from Python costs more than they take on a fast GPU. The step
(`LanguageModel.decode_hidden` + lm_head) is captured once, on static input buffers (the token's
embedding and its position as a device tensor), and replayed for every later token; the latent
cache is written in place at the position read on the device, so one graph serves all positions.

Capture needs every op on the step to stay on the GPU without host syncs or allocations
outside the graph pool: the compiled CUDA kernels for the quantized layers, the MoE block and
MLA decode, and no routed experts in host memory (--cpu-experts). When the model does not
qualify, or capture fails, decoding runs eagerly (same results). KIMIVL_CUDA_GRAPHS=0 turns it off.
"""

from __future__ import annotations

import logging
import os

import torch

from ..kernels.bridge import kernel

log = logging.getLogger("kimivl_local")

# The CUDA ops whose torch fallbacks sync with the host (and so cannot be captured).
_REQUIRED_KERNELS = ("cuda_mla_decode", "cuda_quant_matmul", "cuda_moe_block")


def graph_blocker(lm, cache: torch.Tensor) -> str | None:
    """Why the decode step of `lm` cannot be captured, or None when it can."""
    from ..model.moe import StackedExperts
    from ..model.quantized import QuantExperts

    if os.environ.get("KIMIVL_CUDA_GRAPHS", "1") == "0":
        return "KIMIVL_CUDA_GRAPHS=0"
    missing = [k for k in _REQUIRED_KERNELS if kernel(k) is None]
    if missing:
        return f"the extension lacks {', '.join(missing)}"
    for name, m in lm.named_modules():
        if isinstance(m, StackedExperts):
            return f"{name} holds dense experts (their routing reads counts on the host)"
        if isinstance(m, QuantExperts) and (not m.on_kernel or m.device != cache.device):
            return f"{name} runs off the GPU kernels (--cpu-experts or an unsupported scheme)"
    return None


class DecodeGraph:
    def __init__(self, graph: torch.cuda.CUDAGraph, embeds: torch.Tensor, position: torch.Tensor,
                 logits: torch.Tensor):
        self.graph, self.embeds, self.position, self.logits = graph, embeds, position, logits

    @classmethod
    def capture(cls, lm, cache: torch.Tensor, position: int) -> "DecodeGraph | None":
        """Capture the step; None (and a log line saying why) when it cannot be captured.

        Warm-up and capture run a real step at `position`, the row the caller is about to
        write: it is overwritten by the replay that follows, so the cache stays correct."""
        reason = graph_blocker(lm, cache)
        if reason is not None:
            log.info("decoding without a CUDA graph: %s", reason)
            return None
        device = cache.device
        lm.rope.ensure(cache.shape[1], device)  # every position the cache can hold
        embeds = torch.zeros(1, lm.config.hidden_size, dtype=lm.dtype, device=device)
        where = torch.full((1,), position, dtype=torch.int64, device=device)
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # lazy initialisation (cuBLAS handles) before capture
                for _ in range(2):
                    lm.logits(lm.decode_hidden(embeds, where, cache))
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = lm.logits(lm.decode_hidden(embeds, where, cache))
        except Exception as exc:  # noqa: BLE001 - any capture failure means: run eagerly
            log.warning("CUDA graph capture failed, decoding eagerly: %s", exc)
            return None
        return cls(graph, embeds, where, logits)

    def run(self, embeds: torch.Tensor, position: int) -> torch.Tensor:
        """Logits [1, vocab] of one token at `position` (a copy: the graph's buffer is reused)."""
        self.embeds.copy_(embeds)
        self.position.fill_(position)
        self.graph.replay()
        return self.logits.clone()
