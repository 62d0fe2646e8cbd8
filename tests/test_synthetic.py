"""Synthetic checkpoints: the official folder layout, determinism, bounded memory for `full`."""

import json
import subprocess
import sys

import pytest

import kimivl_local
from kimivl_local.inputs.tokenizer import Tokenizer
from kimivl_local.synthetic.checkpoint import N_BASE_REAL, write_checkpoint

OFFICIAL_FILES = {"config.json", "generation_config.json", "preprocessor_config.json",
                  "tokenizer_config.json", "tiktoken.model", "model.safetensors.index.json"}


def test_tiny_layout(tiny_checkpoint):
    names = {p.name for p in tiny_checkpoint.iterdir()}
    assert OFFICIAL_FILES <= names
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    assert cfg["architectures"] == ["KimiVLForConditionalGeneration"]
    assert cfg["model_type"] == "kimi_vl" and cfg["text_config"]["model_type"] == "deepseek_v3"
    for field in ("q_lora_rank", "topk_method", "n_group", "topk_group", "routed_scaling_factor",
                  "rope_theta", "rope_scaling", "first_k_dense_replace", "moe_layer_freq"):
        assert field in cfg["text_config"]
    assert cfg["text_config"]["q_lora_rank"] is None


def test_special_tokens_at_real_offsets(tiny_checkpoint):
    tok = Tokenizer.from_dir(tiny_checkpoint)
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    n = tok.n_base
    # Real ids are 163584 + offset; the synthetic vocabulary keeps every offset.
    assert cfg["media_placeholder_token_id"] == tok.media_pad_id == n + (163605 - N_BASE_REAL)
    assert tok.im_end_id == n + (163586 - N_BASE_REAL)
    assert cfg["text_config"]["vocab_size"] == tok.vocab_size == n + 256


def test_deterministic_per_seed(tmp_path):
    a = write_checkpoint(tmp_path / "a", seed=3)
    b = write_checkpoint(tmp_path / "b", seed=3)
    c = write_checkpoint(tmp_path / "c", seed=4)
    shard = "model-00002-of-00006.safetensors"
    assert (a / shard).read_bytes() == (b / shard).read_bytes()
    assert (a / shard).read_bytes() != (c / shard).read_bytes()


def test_overrides_reach_config(tmp_path):
    path = write_checkpoint(tmp_path / "x", text_overrides={"num_hidden_layers": 2},
                            vision_overrides={"num_hidden_layers": 1})
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["text_config"]["num_hidden_layers"] == 2
    assert cfg["vision_config"]["num_hidden_layers"] == 1
    assert kimivl_local.load(path, device="cpu").config.text.num_hidden_layers == 2


@pytest.mark.slow
def test_full_preset_streams_with_bounded_memory(tmp_path):
    # Real widths (vocab 163840, hidden 2048, experts 1408, MoonViT 1152): 1.7 GB on disk with 2
    # layers and 4 experts. The writer generates 16 M values at a time, so its peak RSS must stay
    # far below the largest tensor's fp32 size (embed_tokens: 1.3 GB) and the 2 GB budget.
    dst = tmp_path / "full"
    # Peak RSS read from VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so a
    # large test process would be counted as the child's peak.
    code = ("import re; from kimivl_local.synthetic.checkpoint import write_checkpoint; "
            f"write_checkpoint({str(dst)!r}, preset='full', text_overrides={{'num_hidden_layers': 2,"
            " 'n_routed_experts': 4, 'num_experts_per_tok': 2}, vision_overrides={'num_hidden_layers': 1}); "
            r"print(re.search(r'VmHWM:\s+(\d+)', open('/proc/self/status').read()).group(1))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak_mib = int(out.stdout.strip()) / 1024
    assert peak_mib < 1024, f"peak RSS {peak_mib:.0f} MiB"
    model = kimivl_local.load(dst, device="cpu")
    assert model.config.text.hidden_size == 2048 and model.config.text.vocab_size == 163840
    text = "".join(model.generate([{"role": "user", "content": "hi"}], max_new_tokens=3))
    assert model.last_stats.generated_tokens + (model.last_stats.finish_reason == "stop") >= 1
    assert isinstance(text, str)


def test_thinking_preset_follows_thinking_2506(tmp_path, tiny_checkpoint):
    path = write_checkpoint(tmp_path / "tiny-thinking", preset="tiny-thinking")

    def read(folder, name):
        return json.loads((folder / name).read_text())

    assert read(path, "preprocessor_config.json")["in_token_limit"] == 16384
    assert read(tiny_checkpoint, "preprocessor_config.json")["in_token_limit"] == 4096
    assert read(path, "generation_config.json")["temperature"] == 0.8
    assert "temperature" not in read(tiny_checkpoint, "generation_config.json")
    # same architecture, tensors, tokenizer and chat template as Instruct
    for name in ("config.json", "tokenizer_config.json", "model.safetensors.index.json"):
        assert read(path, name) == read(tiny_checkpoint, name)
    model = kimivl_local.load(path, device="cpu")
    assert model.processor.in_token_limit == 16384
    assert model.generation_config.temperature == 0.8
