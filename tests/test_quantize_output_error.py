"""The quantize report's output error on calibration data per module group (RTN and GPTQ)."""

import json

import pytest
from quantize_support import import_quantize

from kimivl_local.errors import InputError

output_error = import_quantize("output_error")
plan_mod = import_quantize("plan")
recipes = import_quantize("recipes")
qmain = import_quantize("main")


def _measure(src, *rules, samples=1):
    plan = plan_mod.make_plan(src, recipes.recipe_rules("default"),
                              [recipes.parse_rule(r) for r in rules], 2 << 30)
    return output_error.measure(plan, None, samples, "cpu")


def test_report_gives_output_error_per_group_for_rtn(quantized):
    report = json.loads((quantized("default") / "quantization_report.json").read_text())
    section = report["calibration_errors"]
    assert section["samples"] == output_error.SAMPLES and section["tokens"] > 0
    groups = section["groups"]
    assert {"attention", "dense MLP", "shared experts", "routed experts", "lm_head"} <= set(groups)
    assert all(0 < e < 1 for e in groups.values()), groups
    assert set(section["layers"]) == {"0", "1", "2"}
    assert "routed experts" not in section["layers"]["0"]  # layer 0 is dense
    assert 0 < section["final_hidden_states"] < 1


def test_narrower_experts_raise_only_their_own_error(tiny128_checkpoint):
    low = _measure(tiny128_checkpoint, r"mlp\.experts=2")
    high = _measure(tiny128_checkpoint, r"mlp\.experts=8")
    for group in ("attention", "dense MLP", "shared experts", "lm_head"):
        assert low["groups"][group] == high["groups"][group], group  # same inputs, same weights
    assert low["groups"]["routed experts"] > 4 * high["groups"]["routed experts"]
    assert low["final_hidden_states"] > high["final_hidden_states"]


def test_only_quantized_groups_are_measured(tiny128_checkpoint):
    only = _measure(tiny128_checkpoint, r"layers\.0\.self_attn=4", r"language_model=16")
    assert set(only["groups"]) == {"attention"}
    assert set(only["layers"]) == {"0"}
    assert only["final_hidden_states"] > 0  # layer 0's error reaches the last layer
    assert _measure(tiny128_checkpoint, samples=0) is None
    with pytest.raises(InputError, match="--eval-samples must be 0 or more"):
        qmain.quantize(tiny128_checkpoint, "/nonexistent/never-written", eval_samples=-1)


def test_missing_calibration_data_fails_before_writing(tiny128_checkpoint, tmp_path):
    with pytest.raises(InputError, match="--calib-data .*nowhere: no such file or folder"):
        qmain.quantize(tiny128_checkpoint, tmp_path / "q", calib_data=tmp_path / "nowhere")
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()


def test_cli_prints_the_table_and_eval_samples_0_skips_it(tiny128_checkpoint, tmp_path, capsys):
    assert qmain.main([str(tiny128_checkpoint), str(tmp_path / "one"), "--eval-samples", "1"]) == 0
    out = capsys.readouterr().out
    assert "output error on calibration data (1 sample," in out and "final hidden states" in out
    report = json.loads((tmp_path / "one" / "quantization_report.json").read_text())
    assert report["calibration_errors"]["samples"] == 1
    assert qmain.main([str(tiny128_checkpoint), str(tmp_path / "none"), "--eval-samples", "0"]) == 0
    assert "output error on calibration data" not in capsys.readouterr().out
    report = json.loads((tmp_path / "none" / "quantization_report.json").read_text())
    assert "calibration_errors" not in report
