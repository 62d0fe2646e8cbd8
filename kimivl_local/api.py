"""The public Python API: `load()` and `KimiVL` (acceptance checks use it; keep it stable)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from .checkpoint.config import GenerationConfig, KimiVLConfig, PreprocessorConfig
from .checkpoint.hub import resolve_model_path
from .engine.generate import Engine, GenerationStats
from .engine.loader import load_model
from .engine.memory_plan import plan_memory
from .engine.multimodal import ImageEncoder, build_prompt
from .engine.sampling import SamplingParams
from .errors import InputError, TokenizerError
from .inputs.media import expand_media, image_of
from .inputs.processor import ImageProcessor
from .inputs.thinking import THINK_CLOSE, THINK_OPEN, split_thinking
from .inputs.tokenizer import StreamDecoder, Tokenizer
from .kernels.bridge import set_backend

DEFAULT_MAX_CONTEXT = 8192
log = logging.getLogger("kimivl_local")


class KimiVL:
    """A loaded model with its tokenizer, ready to chat."""

    def __init__(self, path: Path, model, tokenizer: Tokenizer, generation_config: GenerationConfig,
                 processor: ImageProcessor, max_context: int):
        self.path = path
        self.model = model
        self.config: KimiVLConfig = model.config
        self.tokenizer = tokenizer
        self.generation_config = generation_config
        self.processor = processor
        self.images = ImageEncoder(model, processor)
        self.engine = Engine(model, max_context)
        # encode_chat expands each image item to its placeholder count.
        tokenizer.image_token_counter = lambda item: processor.num_tokens(image_of(item))
        tokenizer.media_expander = lambda messages: expand_media(messages, processor)

    @property
    def device(self) -> torch.device:
        return self.model.language_model.device

    @property
    def dtype(self) -> torch.dtype:
        # The embeddings are never quantized (lm_head may be).
        return self.model.language_model.model.embed_tokens.weight.dtype

    @property
    def stop_ids(self) -> set[int]:
        return {self.tokenizer.im_end_id, self.tokenizer.eos_id, *self.generation_config.eos_ids}

    @property
    def last_stats(self) -> GenerationStats:
        """Token counts and timings of the latest generate() call."""
        return self.engine.stats

    @torch.inference_mode()
    def image_features(self, images: list) -> list[torch.Tensor]:
        """Projector outputs, one [tokens_i, hidden] tensor per image (PIL images or paths)."""
        return self.images.features(self.images.preprocess(list(images)))

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, images=None) -> torch.Tensor:
        """One full cache-free forward: input_ids LongTensor [T] -> fp32 logits [T, vocab].

        images (PIL images or paths), when given, fill the placeholder runs in order.
        """
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)
        if ids.dim() != 1:
            raise InputError(f"input_ids must be 1-D [T], got shape {list(ids.shape)}")
        vocab = self.config.text.vocab_size
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise InputError(f"input_ids must be non-empty ids in [0, {vocab})")
        features = self.image_features(images) if images else None
        lm = self.model.language_model
        return lm.logits(lm.hidden_states(self.model.embed(ids, features)))

    def generate(self, messages: list[dict], *, max_new_tokens: int = 512, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None) -> Iterator[str]:
        """Stream the assistant's reply to `messages` as text pieces.

        Content items: text, image, {"type": "pdf", "pdf": path, "pages": "1-3", "text_layer":
        bool} and {"type": "video", "video": path, "fps": 1.0, "max_frames": 16} (see
        `kimivl_local.inputs.media`); a document that does not fit the context raises
        ContextLengthError saying how many pages or frames would.

        Thinking models' `◁think▷...◁/think▷` text is part of the stream (see
        `kimivl_local.inputs.thinking` to separate it); it is removed from earlier assistant turns
        before templating, as the official demo does (a block cut short is removed whole).
        """
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
        sampling = SamplingParams(temperature, top_p, top_k, seed)
        messages = expand_media(_drop_old_thinking(messages), self.processor, self.tokenizer,
                                self.engine.max_context)
        prompt = build_prompt(self.model, self.tokenizer, self.images, messages)
        decoder = StreamDecoder(self.tokenizer, skip_special=True)
        for token in self.engine.generate(prompt, max_new_tokens=max_new_tokens, sampling=sampling,
                                          stop_ids=self.stop_ids):
            text = decoder.push(token)
            if text:
                yield text
        tail = decoder.flush()
        if tail:
            yield tail


def _drop_old_thinking(messages: list[dict]) -> list[dict]:
    out = []
    for m in messages:
        if m.get("role") == "assistant" and isinstance(m.get("content"), str) \
                and (THINK_CLOSE in m["content"] or m["content"].lstrip().startswith(THINK_OPEN)):
            m = {**m, "content": split_thinking(m["content"])[1]}
        out.append(m)
    return out


def load(path: str | os.PathLike, device=None, dtype: torch.dtype | None = None,
         max_context: int | None = None, max_image_tokens: int | None = None, *,
         gpu_memory: float | None = None, cpu_experts: int | None = None,
         backend: str = "auto") -> KimiVL:
    """Load a Kimi-VL checkpoint folder (or a repo id from the local HF cache).

    device: "auto" (default: CUDA when available, else CPU), "cpu", "cuda" or "cuda:N".
    dtype: default the checkpoint's (bf16).
    max_context: tokens the preallocated cache holds (default min(8192, the model's limit)).
    max_image_tokens: raw 14x14 patches per image before down-scaling (default: the
    preprocessor config's in_token_limit; lower it on slow machines).
    gpu_memory: GB of GPU memory to plan for (default: what is free). cpu_experts: keep the
    routed experts of that many MoE layers in host memory (GPU runs; auto picks as many as needed).
    backend: "auto", "kernels" or "reference" (torch only: the debugging baseline); process-wide.
    Memory is planned before any weight is read (kimivl_local.engine.memory_plan); a plan that
    cannot fit raises MemoryPlanError saying what to change. The plan is kept as `.memory_plan`.
    """
    set_backend(backend)
    folder = resolve_model_path(path)
    tokenizer = Tokenizer.from_dir(folder)
    processor = ImageProcessor(PreprocessorConfig.from_dir(folder), in_token_limit=max_image_tokens)
    plans = []

    def planner(model, config: KimiVLConfig, dtype: torch.dtype):
        context = max_context or min(DEFAULT_MAX_CONTEXT, config.text.max_position_embeddings)
        plan = plan_memory(model, config, dtype, device=str(device or "auto"),
                           max_context=context, prefill_chunk=Engine.prefill_chunk,
                           image_patches=processor.in_token_limit, gpu_memory_gb=gpu_memory,
                           cpu_experts=cpu_experts)
        log.info("memory plan: %s", plan.summary())
        plans.append(plan)
        return plan.placement

    model = load_model(folder, dtype=dtype, planner=planner)
    if tokenizer.vocab_size > model.config.text.vocab_size:
        raise TokenizerError(f"{folder}: tokenizer has {tokenizer.vocab_size} tokens but the model's "
                         f"vocab_size is {model.config.text.vocab_size}")
    limit = model.config.text.max_position_embeddings
    kimi = KimiVL(folder, model, tokenizer, GenerationConfig.from_dir(folder), processor,
                  max_context or min(DEFAULT_MAX_CONTEXT, limit))
    kimi.memory_plan = plans[0]
    return kimi
