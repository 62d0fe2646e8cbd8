"""transformers' DeepseekV3ForCausalLM on the language-model weights of a checkpoint folder:
the independent oracle for our language model (nobody here wrote it)."""

import json
from pathlib import Path

import torch
from safetensors import safe_open


def hf_language_model(folder: Path, dtype: torch.dtype):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    text = json.loads((folder / "config.json").read_text())["text_config"]
    cfg = DeepseekV3Config(**{k: v for k, v in text.items() if k not in ("model_type", "torch_dtype")},
                           rope_interleave=True)  # DeepSeek's interleaved-pair RoPE
    cfg._attn_implementation = "eager"
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(cfg)
    weights = {}
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    for file in sorted(set(index.values())):
        with safe_open(str(folder / file), framework="pt") as f:
            for name in f.keys():
                if name.startswith("language_model."):
                    weights[name[len("language_model."):]] = f.get_tensor(name)
    state = {}
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}.mlp.experts"
        if f"{p}.0.gate_proj.weight" not in weights:
            continue
        e = cfg.n_routed_experts
        gate = [weights.pop(f"{p}.{i}.gate_proj.weight") for i in range(e)]
        up = [weights.pop(f"{p}.{i}.up_proj.weight") for i in range(e)]
        down = [weights.pop(f"{p}.{i}.down_proj.weight") for i in range(e)]
        state[f"{p}.gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u in zip(gate, up)])
        state[f"{p}.down_proj"] = torch.stack(down)
    state.update(weights)
    state = {k: (v.float() if k.endswith("e_score_correction_bias") else v.to(dtype))
             for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if "rotary_emb" not in m]
    assert not missing and not unexpected, (missing, unexpected)
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg)  # rebuild the meta buffers
    return model.eval()
