"""`kimivl-local bench` runs end to end and counts decode bytes correctly."""

import json

from kimivl_local.cli.benchmark import decode_bytes_per_token
from kimivl_local.cli.main import main


def test_bench_command_writes_json(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", str(tiny_checkpoint), "--prompt-tokens", "32", "--gen-tokens", "4",
                 "--image", "56x84", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["prompt_tokens"] == 32 and result["gen_tokens"] == 4
    assert result["image_tokens"] == 6  # 56x84 -> 2x3 merged tokens
    for key in ("ttft_text_seconds", "decode_tokens_per_second", "ceiling_gbps", "peak_rss_bytes"):
        assert result[key] > 0
    assert "% of measured" in capsys.readouterr().out


def test_bad_image_size(tiny_checkpoint, capsys):
    assert main(["bench", str(tiny_checkpoint), "--image", "big"]) == 2
    assert "--image must be WxH" in capsys.readouterr().err


def test_decode_bytes_count_top_k_experts(tiny_model_fp32):
    model = tiny_model_fp32.model
    cfg = model.config.text
    lm = model.language_model
    per_param = {n: p.numel() * 4 for n, p in lm.named_parameters()}
    experts = sum(v for n, v in per_param.items() if ".mlp.experts." in n)
    embed = per_param["model.embed_tokens.weight"]
    rest = sum(per_param.values()) - experts - embed
    expected = (rest + experts * cfg.num_experts_per_tok // cfg.n_routed_experts
                + cfg.hidden_size * 4 + cfg.num_hidden_layers * 100 * cfg.latent_dim * 4)
    assert decode_bytes_per_token(model, 100) == expected
