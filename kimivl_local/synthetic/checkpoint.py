"""Synthetic checkpoints in the exact official Kimi-VL folder layout, with random weights.

Same file names, JSON fields, tensor names and dtypes as moonshotai/Kimi-VL-A3B-Instruct (and,
for the `full` preset, the real shapes), so the loading code that reads the real checkpoint is
the code under test. The `*-thinking` presets follow Kimi-VL-A3B-Thinking-2506 instead (see
THINKING_2506). The tensor table below is written from the architecture reference (§2),
independently of the model code; a test checks the two agree.

Shards are written by hand (safetensors header, then each tensor's bytes in row chunks), so
peak memory stays at a chunk, whatever the checkpoint's size.
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import torch

from ..checkpoint.config import KimiVLConfig
from .vocab import write_tokenizer_files

N_BASE_REAL = 163584  # BPE tokens of the real tiktoken.model; 256 specials follow

TEXT_FULL = dict(
    vocab_size=163840, hidden_size=2048, intermediate_size=11264, moe_intermediate_size=1408,
    num_hidden_layers=27, num_nextn_predict_layers=0, num_attention_heads=16,
    num_key_value_heads=16, n_shared_experts=2, n_routed_experts=64, ep_size=1,
    routed_scaling_factor=2.446, kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64,
    v_head_dim=128, qk_nope_head_dim=128, topk_method="noaux_tc", n_group=1, topk_group=1,
    num_experts_per_tok=6, moe_layer_freq=1, first_k_dense_replace=1, norm_topk_prob=True,
    scoring_func="sigmoid", aux_loss_alpha=0.001, seq_aux=True, hidden_act="silu",
    max_position_embeddings=131072, initializer_range=0.02, rms_norm_eps=1e-5, use_cache=True,
    pad_token_id=163839, bos_token_id=163584, eos_token_id=163585, tie_word_embeddings=False,
    rope_theta=800000.0, rope_scaling=None, attention_bias=False, attention_dropout=0.0,
    model_type="deepseek_v3", torch_dtype="bfloat16",
)
VISION_FULL = dict(
    model_type="moonvit", patch_size=14, init_pos_emb_height=64, init_pos_emb_width=64,
    num_attention_heads=16, num_hidden_layers=27, hidden_size=1152, intermediate_size=4304,
    merge_kernel_size=[2, 2], torch_dtype="bfloat16",
)
# Where Kimi-VL-A3B-Thinking-2506 differs from Instruct, as far as the architecture reference
# (§1.5, §4.1, §7) documents it: the same architecture, tensors, tokenizer and chat template (no
# difference is documented for the template, so the Instruct one is kept), a preprocessor that
# takes up to 16384 raw patches before down-scaling, and the publisher's recommended sampling
# temperature 0.8 (the card's; whether the real generation_config.json carries it is not
# documented, and writing it here keeps the preset self-describing for default_settings).
THINKING_2506 = dict(in_token_limit=16384, temperature=0.8)
_TINY = dict(
        n_base=1024,
        text=dict(hidden_size=64, intermediate_size=160, moe_intermediate_size=32,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                  kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                  n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2,
                  max_position_embeddings=8192),
        vision=dict(hidden_size=48, num_attention_heads=4, intermediate_size=96,
                    num_hidden_layers=2, init_pos_emb_height=8, init_pos_emb_width=8),
        shard_bytes=200_000,  # several shards even when tiny, so the index is exercised
)
_FULL = dict(n_base=N_BASE_REAL, text={}, vision={}, shard_bytes=5_000_000_000)
PRESETS = {
    "full": _FULL,
    "tiny": _TINY,
    "full-thinking": {**_FULL, "thinking": True},
    "tiny-thinking": {**_TINY, "thinking": True},
}


def tensor_specs(text: dict, vision: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, safetensors dtype) of every tensor of the official checkpoint, in order."""
    h, v = text["hidden_size"], text["vocab_size"]
    nh, rank, rope = text["num_attention_heads"], text["kv_lora_rank"], text["qk_rope_head_dim"]
    qk, vd, nope = text["qk_nope_head_dim"] + rope, text["v_head_dim"], text["qk_nope_head_dim"]
    mi, e = text["moe_intermediate_size"], text["n_routed_experts"]
    lm = "language_model.model"
    specs = [(f"{lm}.embed_tokens.weight", (v, h), "BF16")]
    for i in range(text["num_hidden_layers"]):
        p = f"{lm}.layers.{i}"
        specs += [
            (f"{p}.input_layernorm.weight", (h,), "BF16"),
            (f"{p}.post_attention_layernorm.weight", (h,), "BF16"),
            (f"{p}.self_attn.q_proj.weight", (nh * qk, h), "BF16"),
            (f"{p}.self_attn.kv_a_proj_with_mqa.weight", (rank + rope, h), "BF16"),
            (f"{p}.self_attn.kv_a_layernorm.weight", (rank,), "BF16"),
            (f"{p}.self_attn.kv_b_proj.weight", (nh * (nope + vd), rank), "BF16"),
            (f"{p}.self_attn.o_proj.weight", (h, nh * vd), "BF16"),
        ]
        if i < text["first_k_dense_replace"]:
            di = text["intermediate_size"]
            specs += [(f"{p}.mlp.gate_proj.weight", (di, h), "BF16"),
                      (f"{p}.mlp.up_proj.weight", (di, h), "BF16"),
                      (f"{p}.mlp.down_proj.weight", (h, di), "BF16")]
            continue
        si = mi * text["n_shared_experts"]
        specs += [(f"{p}.mlp.gate.weight", (e, h), "BF16"),
                  (f"{p}.mlp.gate.e_score_correction_bias", (e,), "F32"),
                  (f"{p}.mlp.shared_experts.gate_proj.weight", (si, h), "BF16"),
                  (f"{p}.mlp.shared_experts.up_proj.weight", (si, h), "BF16"),
                  (f"{p}.mlp.shared_experts.down_proj.weight", (h, si), "BF16")]
        for x in range(e):
            specs += [(f"{p}.mlp.experts.{x}.gate_proj.weight", (mi, h), "BF16"),
                      (f"{p}.mlp.experts.{x}.up_proj.weight", (mi, h), "BF16"),
                      (f"{p}.mlp.experts.{x}.down_proj.weight", (h, mi), "BF16")]
    specs += [(f"{lm}.norm.weight", (h,), "BF16"), ("language_model.lm_head.weight", (v, h), "BF16")]

    vh, vi, ps = vision["hidden_size"], vision["intermediate_size"], vision["patch_size"]
    vt = "vision_tower"
    specs += [(f"{vt}.patch_embed.proj.weight", (vh, 3, ps, ps), "BF16"),
              (f"{vt}.patch_embed.proj.bias", (vh,), "BF16"),
              (f"{vt}.patch_embed.pos_emb.weight",
               (vision["init_pos_emb_height"], vision["init_pos_emb_width"], vh), "BF16")]
    for b in range(vision["num_hidden_layers"]):
        p = f"{vt}.encoder.blocks.{b}"
        for name, shape in [("norm0", (vh,)), ("norm1", (vh,))]:
            specs += [(f"{p}.{name}.weight", shape, "BF16"), (f"{p}.{name}.bias", shape, "BF16")]
        for name, out, inp in [("wqkv", 3 * vh, vh), ("wo", vh, vh), ("mlp.fc0", vi, vh),
                               ("mlp.fc1", vh, vi)]:
            specs += [(f"{p}.{name}.weight", (out, inp), "BF16"), (f"{p}.{name}.bias", (out,), "BF16")]
    specs += [(f"{vt}.encoder.final_layernorm.weight", (vh,), "BF16"),
              (f"{vt}.encoder.final_layernorm.bias", (vh,), "BF16")]
    merged = vh * vision["merge_kernel_size"][0] * vision["merge_kernel_size"][1]
    mp = "multi_modal_projector"
    specs += [(f"{mp}.pre_norm.weight", (vh,), "BF16"), (f"{mp}.pre_norm.bias", (vh,), "BF16"),
              (f"{mp}.linear_1.weight", (merged, merged), "BF16"),
              (f"{mp}.linear_1.bias", (merged,), "BF16"),
              (f"{mp}.linear_2.weight", (h, merged), "BF16"), (f"{mp}.linear_2.bias", (h,), "BF16")]
    return specs


def _init_kind(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) of a tensor's random values: norms near 1, biases and the router's correction
    bias small, embeddings O(1), weights scaled by fan-in so activations stay O(1)."""
    if name.endswith("e_score_correction_bias"):
        return 0.0, 0.02
    if "norm" in name and name.endswith("weight"):
        return 1.0, 0.05
    if name.endswith("bias"):
        return 0.0, 0.02
    if "embed_tokens" in name or "pos_emb" in name:
        return 0.0, 1.0
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    return 0.0, 1.0 / fan_in ** 0.5


_TORCH = {"BF16": torch.bfloat16, "F32": torch.float32}
_CHUNK_ELEMS = 1 << 24  # 16 M values (64 MB in fp32) generated at a time


def _write_tensor(f, name: str, shape: tuple[int, ...], dtype: str, seed: int) -> None:
    mean, std = _init_kind(name, shape)
    gen = torch.Generator().manual_seed(seed ^ zlib.crc32(name.encode()))
    numel = 1
    for d in shape:
        numel *= d
    for begin in range(0, numel, _CHUNK_ELEMS):
        n = min(_CHUNK_ELEMS, numel - begin)
        chunk = (torch.randn(n, generator=gen) * std + mean).to(_TORCH[dtype])
        raw = chunk.view(torch.int16) if dtype == "BF16" else chunk
        f.write(raw.numpy().tobytes())


def _write_shard(file: Path, specs, seed: int) -> None:
    header, offset = {}, 0
    for name, shape, dtype in specs:
        nbytes = _TORCH[dtype].itemsize
        for d in shape:
            nbytes *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # 8-byte alignment of the data, as safetensors does
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in specs:
            _write_tensor(f, name, shape, dtype, seed)


def _shards(specs, shard_bytes: int) -> list[list]:
    shards, current, size = [], [], 0
    for spec in specs:
        nbytes = _TORCH[spec[2]].itemsize
        for d in spec[1]:
            nbytes *= d
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += nbytes
    return shards + [current]


def build_configs(preset: str, text_overrides: dict | None, vision_overrides: dict | None):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    n_base = p["n_base"]
    text = {**TEXT_FULL, **p["text"], **(text_overrides or {})}
    # Special tokens keep their real offsets relative to the base vocabulary.
    text.update(vocab_size=n_base + 256, bos_token_id=n_base, eos_token_id=n_base + 1,
                pad_token_id=n_base + 255)
    vision = {**VISION_FULL, **p["vision"], **(vision_overrides or {})}
    config = {
        "architectures": ["KimiVLForConditionalGeneration"],
        "auto_map": {"AutoConfig": "configuration_kimi_vl.KimiVLConfig",
                     "AutoModel": "modeling_kimi_vl.KimiVLForConditionalGeneration",
                     "AutoModelForCausalLM": "modeling_kimi_vl.KimiVLForConditionalGeneration"},
        "model_type": "kimi_vl",
        "ignore_index": -100,
        "media_placeholder_token_id": n_base + 21,
        "pad_token_id": 0,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.50.3",
        "text_config": text,
        "vision_config": vision,
    }
    return config, n_base


def write_checkpoint(path, preset: str = "tiny", seed: int = 0, text_overrides: dict | None = None,
                     vision_overrides: dict | None = None) -> Path:
    """Write a synthetic checkpoint folder at `path` (created; must not already hold one)."""
    path = Path(path)
    config, n_base = build_configs(preset, text_overrides, vision_overrides)
    KimiVLConfig.from_dict(config)  # refuse a config the runtime could not load, before writing
    if (path / "config.json").exists():
        raise FileExistsError(f"{path} already holds a checkpoint; remove it first")
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    specs = tensor_specs(config["text_config"], config["vision_config"])
    shards = _shards(specs, PRESETS[preset]["shard_bytes"])
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(tmp / file, shard, seed)
        for name, shape, dtype in shard:
            weight_map[name] = file
            n = _TORCH[dtype].itemsize
            for d in shape:
                n *= d
            total += n
    _dump(tmp / "model.safetensors.index.json",
          {"metadata": {"total_size": total}, "weight_map": weight_map})
    _dump(tmp / "config.json", config)
    thinking = PRESETS[preset].get("thinking", False)
    sampling = {"temperature": THINKING_2506["temperature"]} if thinking else {}
    _dump(tmp / "generation_config.json", {
        "bos_token_id": n_base, "eos_token_id": [n_base + 1, n_base + 2],
        "pad_token_id": n_base + 255, "max_length": config["text_config"]["max_position_embeddings"],
        **sampling, "transformers_version": "4.50.3"})
    _dump(tmp / "preprocessor_config.json", {
        "auto_map": {"AutoImageProcessor": "image_processing_kimi_vl.KimiVLImageProcessor",
                     "AutoProcessor": "processing_kimi_vl.KimiVLProcessor"},
        "image_processor_type": "KimiVLImageProcessor", "processor_class": "KimiVLProcessor",
        "patch_size": config["vision_config"]["patch_size"],
        "merge_kernel_size": config["vision_config"]["merge_kernel_size"],
        "in_token_limit": THINKING_2506["in_token_limit"] if thinking else 4096, "pad_input": True, "num_pooled_tokens": 1024,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]})
    write_tokenizer_files(tmp, n_base)
    if path.exists():
        for child in tmp.iterdir():
            child.rename(path / child.name)
        tmp.rmdir()
    else:
        tmp.rename(path)
    return path


def _dump(file: Path, data: dict) -> None:
    file.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
