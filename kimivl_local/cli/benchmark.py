"""`kimivl-local bench`: load time, time to first token (text, and with an image), prefill and
decode speed, peak memory, and decode's achieved bandwidth against the measured ceiling."""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

from ..engine.generate import Prompt
from ..engine.multimodal import build_prompt
from ..model.quantized import QuantExperts, QuantLinear
from .perf import measure_bandwidth_gbps, peak_rss_bytes

QUANT_MODULES = (QuantExperts, QuantLinear)

_TEXT = ("The quick brown fox jumps over the lazy dog while a curious robot reads a long report "
         "about memory bandwidth, mixture-of-experts routing and latent attention caches. ")


@dataclass
class BenchResult:
    model: str
    device: str
    dtype: str
    load_seconds: float
    prompt_tokens: int
    gen_tokens: int
    ttft_text_seconds: float
    prefill_tokens_per_second: float
    decode_tokens_per_second: float
    ttft_image_seconds: float | None
    image_tokens: int | None
    decode_bytes_per_token: int
    decode_gbps: float
    ceiling_gbps: float
    peak_rss_bytes: int
    peak_gpu_bytes: int | None


def decode_bytes_per_token(model, context: int) -> int:
    """Bytes one decode step reads: every language-model weight (quantized ones as loaded)
    except the routed experts, of which top-k of E per layer, one embedding row, and the latent
    cache up to `context`."""
    lm = model.language_model
    cfg = lm.config
    share = cfg.num_experts_per_tok / cfg.n_routed_experts
    total = 0
    quantized = {name: m for name, m in lm.named_modules() if isinstance(m, QUANT_MODULES)}
    for name, m in quantized.items():
        total += m.nbytes() * (share if name.endswith(".mlp.experts") else 1)
    for name, t in itertools.chain(lm.named_parameters(), lm.named_buffers()):
        if any(name.startswith(q + ".") for q in quantized):
            continue  # counted above (their bias included)
        if "embed_tokens" in name:
            total += t.shape[-1] * t.element_size()
        elif ".mlp.experts." in name:
            total += t.numel() * t.element_size() * share
        else:
            total += t.numel() * t.element_size()
    latent = model.language_model.model.embed_tokens.weight.element_size()
    return int(total) + cfg.num_hidden_layers * context * cfg.latent_dim * latent


def _text_ids(tokenizer, n: int) -> list[int]:
    ids = tokenizer.encode(_TEXT)
    return (ids * (n // len(ids) + 1))[:n]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_bandwidth_gbps(device: torch.device) -> float:
    if device.type != "cuda":
        return measure_bandwidth_gbps()
    src = torch.ones(256 << 20, device=device)  # 1 GiB device-to-device copy
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    return 2 * src.numel() * 4 * 10 / (time.perf_counter() - start) / 1e9


def run_bench(spec: str, *, prompt_tokens: int = 512, gen_tokens: int = 64,
              image_size: tuple[int, int] | None = (1024, 1024), max_context: int | None = None,
              **load_options) -> BenchResult:
    """load_options: passed to kimivl_local.load (device, dtype, max_image_tokens, gpu_memory,
    cpu_experts, backend)."""
    from .. import load

    from ..checkpoint.config import KimiVLConfig
    from ..checkpoint.hub import resolve_model_path

    limit = KimiVLConfig.from_dir(resolve_model_path(spec)).text.max_position_embeddings
    # Room for the text run and for an image of up to 16384 tokens (Thinking-2506's budget).
    context = max_context or min(limit, max(prompt_tokens + gen_tokens + 1,
                                            16384 if image_size else 0))
    t0 = time.perf_counter()
    model = load(spec, max_context=context, **load_options)
    load_seconds = time.perf_counter() - t0
    dev, engine = model.device, model.engine
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    ids = _text_ids(model.tokenizer, prompt_tokens)
    engine.cache.reset()
    _sync(dev)
    t0 = time.perf_counter()
    logits, _ = engine.prefill(Prompt.from_ids(model.model, ids))
    token = int(logits.argmax())
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(gen_tokens):
        token = int(engine.decode_step(token).argmax())
    decode_s = time.perf_counter() - t0

    ttft_image = image_tokens = None
    if image_size:
        rng = np.random.default_rng(0)
        w, h = image_size
        image = Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))
        messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                                 {"type": "text", "text": "Describe it."}]}]
        engine.cache.reset()
        model.images.memo.clear()
        _sync(dev)
        t0 = time.perf_counter()
        prompt = build_prompt(model.model, model.tokenizer, model.images, messages)
        int(engine.prefill(prompt)[0].argmax())
        ttft_image = time.perf_counter() - t0
        image_tokens = model.processor.num_tokens(image)

    per_token = decode_bytes_per_token(model.model, prompt_tokens + gen_tokens // 2)
    decode_tps = gen_tokens / decode_s
    return BenchResult(
        model=str(model.path), device=str(dev), dtype=str(model.dtype).removeprefix("torch."),
        load_seconds=load_seconds, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens,
        ttft_text_seconds=ttft, prefill_tokens_per_second=prompt_tokens / ttft,
        decode_tokens_per_second=decode_tps, ttft_image_seconds=ttft_image,
        image_tokens=image_tokens, decode_bytes_per_token=per_token,
        decode_gbps=per_token * decode_tps / 1e9, ceiling_gbps=_device_bandwidth_gbps(dev),
        peak_rss_bytes=peak_rss_bytes(),
        peak_gpu_bytes=torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None)


def format_result(r: BenchResult) -> str:
    lines = [f"model {r.model} on {r.device} ({r.dtype}), loaded in {r.load_seconds:.1f}s",
             f"prefill  {r.prompt_tokens} tokens: time to first token {r.ttft_text_seconds * 1e3:.0f} ms,"
             f" {r.prefill_tokens_per_second:.1f} tok/s",
             f"decode   {r.gen_tokens} tokens: {r.decode_tokens_per_second:.2f} tok/s, "
             f"{r.decode_bytes_per_token / 2**20:.1f} MiB read per token -> {r.decode_gbps:.2f} GB/s"
             f" = {100 * r.decode_gbps / r.ceiling_gbps:.0f}% of measured {r.ceiling_gbps:.1f} GB/s"]
    if r.ttft_image_seconds is not None:
        lines.append(f"image    {r.image_tokens} image tokens + prompt: time to first token "
                     f"{r.ttft_image_seconds * 1e3:.0f} ms")
    mem = f"peak RSS {r.peak_rss_bytes / 2**30:.2f} GiB"
    if r.peak_gpu_bytes is not None:
        mem += f", peak GPU {r.peak_gpu_bytes / 2**30:.2f} GiB"
    return "\n".join(lines + [mem])


def main_bench(args) -> int:
    image = None
    if args.image != "none":
        try:
            w, h = (int(v) for v in args.image.lower().split("x"))
        except ValueError:
            from ..errors import InputError

            raise InputError(f"--image must be WxH (e.g. 1024x1024) or none, got {args.image!r}") from None
        image = (w, h)
    from .options import load_options

    result = run_bench(args.model or args.model_pos, prompt_tokens=args.prompt_tokens,
                       gen_tokens=args.gen_tokens, image_size=image,
                       max_context=args.max_context, **load_options(args))
    print(format_result(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(asdict(result), f, indent=2)
    return 0
