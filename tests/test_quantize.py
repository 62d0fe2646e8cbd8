"""`kimivl-local quantize`: rules and recipes, the dry-run plan, and the streaming writer
(chunked RTN equal to whole-tensor RTN, resumable after a kill, atomic, clear failures)."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from quantize_support import REPO, import_quantize
from safetensors import safe_open

from kimivl_local.checkpoint.shards import Checkpoint
from kimivl_local.errors import CheckpointError, InputError
from kimivl_local.quant.packing import PackedWeight, QuantScheme, quantize_rtn
from kimivl_local.synthetic.checkpoint import build_configs, tensor_specs

recipes = import_quantize("recipes")
plan_mod = import_quantize("plan")
writer = import_quantize("writer")
qmain = import_quantize("main")
destination = import_quantize("destination")

INT4, INT8 = QuantScheme(4, 128, True), QuantScheme(8, None, True)


def _full_modules() -> dict[str, int]:
    config, _ = build_configs("full", None, None)
    specs = tensor_specs(config["text_config"], config["vision_config"])
    return {n.removesuffix(".weight"): shape[1] for n, shape, _ in specs
            if n.endswith(".weight") and len(shape) == 2 and "embed_tokens" not in n}


def test_recipes_assign_what_the_issue_defines():
    modules = _full_modules()
    default = recipes.assign(modules, recipes.recipe_rules("default"))
    lm = "language_model.model.layers"
    assert default[f"{lm}.5.mlp.experts.63.down_proj"] == INT4
    for m in (f"{lm}.5.mlp.shared_experts.up_proj", f"{lm}.0.mlp.gate_proj",
              f"{lm}.26.self_attn.kv_b_proj", f"{lm}.3.self_attn.kv_a_proj_with_mqa",
              "language_model.lm_head"):
        assert default[m] == INT8, m
    for m in (f"{lm}.5.mlp.gate", "vision_tower.encoder.blocks.3.mlp.fc1",
              "multi_modal_projector.linear_2"):
        assert default[m] is None, m
    int4 = recipes.assign(modules, recipes.recipe_rules("int4"))
    int8 = recipes.assign(modules, recipes.recipe_rules("int8"))
    experts = recipes.assign(modules, recipes.recipe_rules("experts-int4"))
    lm_linears = [m for m in modules if m.startswith("language_model.") and not m.endswith("mlp.gate")]
    assert len(lm_linears) == 27 * 4 + 3 + 26 * (3 + 64 * 3) + 1
    assert all(int4[m] == INT4 and int8[m] == INT8 for m in lm_linears)
    assert {int4[m] for m in modules if m not in lm_linears} == {None}
    assert {m for m, s in experts.items() if s is not None} == {
        m for m in modules if ".mlp.experts." in m}
    assert experts[f"{lm}.1.mlp.experts.0.gate_proj"] == QuantScheme(4, 32, True)


@pytest.mark.parametrize("text, scheme", [
    ("experts=4", QuantScheme(4, 128, True)),
    ("experts=8", QuantScheme(8, None, True)),
    ("lm_head=4:32", QuantScheme(4, 32, True)),
    ("lm_head=4:channel:asym", QuantScheme(4, None, False)),
    ("(?=x)a=8:64:sym", QuantScheme(8, 64, True)),  # '=' inside the regex
    ("layers\\.0\\.=16", None),
    ("experts=2", QuantScheme(2, 32, True)),
    ("experts=3", QuantScheme(3, 64, True)),
    ("experts=3:128:asym", QuantScheme(3, 128, False)),
    ("experts=5", QuantScheme(5, 128, True)),
    ("experts=6:channel", QuantScheme(6, None, True)),
])
def test_parse_rule(text, scheme):
    rule = recipes.parse_rule(text)
    assert rule.scheme == scheme
    assert recipes.parse_rule(str(rule)) == rule  # str() is the canonical spelling


@pytest.mark.parametrize("text, message", [
    ("experts", "expected REGEX=BITS"),
    ("=4", "expected REGEX=BITS"),
    ("exp(erts=4", "not a valid regex"),
    ("experts=7", "BITS must be 2, 3, 4, 5, 6, 8 or 16"),
    ("experts=1", "BITS must be 2, 3, 4, 5, 6, 8 or 16"),
    ("experts=4:96", "GROUP must be one of 32, 64, 128, channel"),
    ("experts=4:128:sideways", "expected sym or asym"),
    ("experts=4:sym:asym", "unexpected 'asym'"),
    ("experts=16:128", "takes no group"),
])
def test_rule_errors_say_what_is_wrong(text, message):
    with pytest.raises(InputError, match=re.escape(message)):
        recipes.parse_rule(text)


def test_user_rules_come_first_and_must_match_something():
    modules = _full_modules()
    user = [recipes.parse_rule("layers\\.1\\.mlp\\.experts\\.=8"), recipes.parse_rule("lm_head=16")]
    got = recipes.assign(modules, recipes.recipe_rules("default"), user)
    assert got["language_model.model.layers.1.mlp.experts.7.up_proj"] == INT8
    assert got["language_model.model.layers.2.mlp.experts.7.up_proj"] == INT4
    assert got["language_model.lm_head"] is None
    config = recipes.build_qconfig(got, user + list(recipes.recipe_rules("default")))
    assert all(config.scheme_for(m) == s for m, s in got.items())
    assert "language_model.lm_head" in config.ignore
    for typo in ("lm_haed=8", "mlp\\.gate$=8"):  # routers are never quantizable
        with pytest.raises(InputError, match="matches no quantizable linear layer"):
            recipes.assign(modules, [], [recipes.parse_rule(typo)])
    with pytest.raises(InputError, match="unknown recipe 'int3'"):
        recipes.recipe_rules("int3")


def test_group_that_does_not_divide_a_layer_is_refused_before_writing(tiny128_checkpoint):
    with pytest.raises(InputError, match=r"vision_tower\.encoder\.blocks\.0\.mlp\.fc0 \[96, 48\]: "
                                         r"in_features 48 is not a multiple of group_size 32"):
        plan_mod.make_plan(tiny128_checkpoint, [], [recipes.parse_rule("fc0=4:32")])


def _shards(folder):
    return sorted(folder.glob("*.safetensors"))


def test_dry_run_sizes_are_the_written_sizes(tiny128_checkpoint, tmp_path, capsys):
    dst = tmp_path / "q"
    assert qmain.main([str(tiny128_checkpoint), str(dst), "--dry-run", "--shard-size", "400KB",
                       "--context", "1000"]) == 0
    out = capsys.readouterr().out
    assert not dst.exists() and not dst.with_name("q.partial").exists()
    predicted = int(re.search(r"on disk: ([\d,]+) bytes", out)[1].replace(",", ""))
    assert re.search(r"routed experts\s+int4 g128\s+0\.8 M", out)
    assert "GPU memory at 1,000 tokens of context" in out
    plan = plan_mod.make_plan(tiny128_checkpoint, recipes.recipe_rules("default"), (), 400_000)
    assert plan.gpu_bytes(1000)["latent cache"] == 3 * (128 + 8) * 2 * 1000
    assert qmain.main([str(tiny128_checkpoint), str(dst), "--shard-size", "400KB"]) == 0
    assert predicted == sum(s.stat().st_size for s in _shards(dst)) == plan.total_bytes
    assert len(_shards(dst)) == len(plan.shards) > 1
    for shard in plan.shards:  # every tensor's dtype and shape as planned
        with safe_open(str(dst / shard.file), "pt") as f:
            for t in (t for job in shard.jobs for t in job.outputs):
                s = f.get_slice(t.name)
                assert (s.get_dtype(), tuple(s.get_shape())) == (
                    {torch.int32: "I32", torch.int64: "I64", torch.bfloat16: "BF16",
                     torch.float32: "F32"}[t.dtype], t.shape)


def test_chunked_rtn_equals_whole_tensor_rtn(tiny128_checkpoint, tmp_path, monkeypatch):
    # 32-row chunks: lm_head (1280 rows) and every expert span several chunks, and the
    # asymmetric zero points (packed along rows) must join across chunk ends.
    monkeypatch.setattr(writer, "CHUNK_ELEMS", 32 * 128)
    dst = tmp_path / "q"
    qmain.quantize(tiny128_checkpoint, dst, recipe="int4", rules=["lm_head=4:64:asym"])
    src = Checkpoint.open(tiny128_checkpoint)
    out = Checkpoint.open(dst)
    for module, scheme in [("language_model.lm_head", QuantScheme(4, 64, False)),
                           ("language_model.model.layers.2.mlp.experts.5.down_proj", INT4),
                           ("language_model.model.layers.0.mlp.down_proj", INT4)]:
        want = quantize_rtn(src.load(f"{module}.weight"), scheme).state_dict(module + ".")
        got = PackedWeight.from_state_dict({n: out.load(n) for n in want}, scheme, module + ".")
        for name, tensor in got.state_dict(module + ".").items():
            assert torch.equal(tensor, want[name]), name
    for name in ("language_model.model.embed_tokens.weight", "vision_tower.patch_embed.pos_emb.weight",
                 "language_model.model.layers.1.mlp.gate.e_score_correction_bias"):
        assert torch.equal(out.load(name), src.load(name)), name


def test_output_folder_is_complete(quantized, tiny128_checkpoint):
    dst = quantized("default")
    for f in ("tiktoken.model", "tokenizer_config.json", "preprocessor_config.json",
              "generation_config.json"):
        assert (dst / f).read_bytes() == (tiny128_checkpoint / f).read_bytes(), f
    config = json.loads((dst / "config.json").read_text())
    source = json.loads((tiny128_checkpoint / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "quantization_config"} == source
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in _shards(dst)}
    report = json.loads((dst / "quantization_report.json").read_text())
    assert report["output_bytes"] == sum(s.stat().st_size for s in _shards(dst))
    errors = report["linear_errors"]
    assert len(errors) == 3 * 4 + 3 + 2 * 3 + 2 * 8 * 3 + 1
    # RTN's expected error for N(0, σ) weights: INT8 per-channel ~0.5%, INT4 g128 ~8%
    assert all(0.002 < e < 0.012 for m, e in errors.items() if ".experts." not in m)
    assert all(0.04 < e < 0.15 for m, e in errors.items() if ".mlp.experts." in m)
    assert not dst.with_name(dst.name + ".partial").exists()


_KILL_AFTER_TWO = """
import os, signal, sys
from quantize_support import import_quantize
writer = import_quantize("writer")
original, written = writer.write_shard, []
def write_shard(*args):
    if len(written) == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally: a real crash
    written.append(original(*args))
    return written[-1]
writer.write_shard = write_shard
import_quantize("main").main(sys.argv[1:])
"""


def test_killed_run_resumes_to_the_same_bytes(tiny128_checkpoint, tmp_path, monkeypatch):
    args = [str(tiny128_checkpoint), "--shard-size", "300KB", "--recipe", "int4"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    killed = subprocess.run([sys.executable, "-c", _KILL_AFTER_TWO, args[0], str(tmp_path / "q"),
                             *args[1:]], env=env, capture_output=True, timeout=300)
    assert killed.returncode == -9
    partial = tmp_path / "q.partial"
    assert not (tmp_path / "q").exists()
    manifest = json.loads((partial / writer.MANIFEST).read_text())
    assert len(manifest["shards"]) == 2

    calls = []
    original = writer.write_shard
    monkeypatch.setattr(writer, "write_shard", lambda *a: calls.append(a[0].file) or original(*a))
    assert qmain.main([args[0], str(tmp_path / "q"), *args[1:]]) == 0
    total = len(list((tmp_path / "q").glob("*.safetensors")))
    assert len(calls) == total - 2 and not set(calls) & set(manifest["shards"])
    assert not partial.exists()

    assert qmain.main([args[0], str(tmp_path / "fresh"), *args[1:]]) == 0
    files = sorted(p.name for p in (tmp_path / "fresh").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "q").iterdir())
    for name in files:
        assert (tmp_path / "q" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name


def test_a_partial_run_with_other_settings_starts_over(tiny128_checkpoint, tmp_path, monkeypatch):
    dst = tmp_path / "q"
    monkeypatch.setattr(destination.Destination, "publish", lambda self, force: None)  # no rename
    qmain.quantize(tiny128_checkpoint, dst, recipe="int8", shard_size=300_000)
    stale = json.loads((tmp_path / "q.partial" / writer.MANIFEST).read_text())
    monkeypatch.undo()
    report = qmain.quantize(tiny128_checkpoint, dst, recipe="int4", shard_size=300_000)
    assert json.loads((dst / "config.json").read_text())["quantization_config"]["config_groups"][
        "group_0"]["weights"]["num_bits"] == 4
    assert stale["fingerprint"] and report["rules"] == [str(r) for r in recipes.recipe_rules("int4")]
    (tmp_path / "other.partial").mkdir()
    (tmp_path / "other.partial" / "notes.txt").write_text("someone else's folder")
    with pytest.raises(InputError, match="is not an interrupted"):
        qmain.quantize(tiny128_checkpoint, tmp_path / "other", recipe="int4")
    assert (tmp_path / "other.partial" / "notes.txt").exists()


def _copy_checkpoint(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_truncated_source_fails_clearly_and_leaves_nothing(tiny128_checkpoint, tmp_path, capsys):
    src = _copy_checkpoint(tiny128_checkpoint, tmp_path / "src")
    shard = _shards(src)[-1]
    shard.write_bytes(shard.read_bytes()[:-1000])
    assert qmain.main([str(src), str(tmp_path / "q")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {shard.name} is truncated")
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()


def test_nan_in_a_source_weight_fails_clearly_and_leaves_nothing(tiny128_checkpoint, tmp_path):
    src = _copy_checkpoint(tiny128_checkpoint, tmp_path / "src")
    name = "language_model.model.layers.2.mlp.experts.6.up_proj.weight"
    info = Checkpoint.open(src).tensors[name]
    with open(info.file, "r+b") as f:  # one bf16 NaN in row 7, mid-file: the header stays valid
        f.seek(info.offset + (7 * 128 + 3) * 2)
        f.write(torch.tensor([float("nan")], dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes())
    with pytest.raises(CheckpointError, match=f"tensor {re.escape(name)} has NaN or Inf values "
                                              r"\(rows 0\.\.127\)"):
        qmain.quantize(src, tmp_path / "q", shard_size=300_000)
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()


def test_existing_dst_needs_force_and_dst_must_not_overlap_src(tiny128_checkpoint, tmp_path, capsys):
    dst = tmp_path / "q"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    assert qmain.main([str(tiny128_checkpoint), str(dst)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    # --force replaces only an earlier quantize output, never another folder
    assert qmain.main([str(tiny128_checkpoint), str(dst), "--force", "--recipe", "int8"]) == 2
    assert "is not a `kimivl-local quantize` output" in capsys.readouterr().err
    assert [p.name for p in dst.iterdir()] == ["old.txt"] and (dst / "old.txt").read_text() == "old"
    assert not list(tmp_path.glob("q.*"))  # no partial, no lock file
    (dst / "old.txt").unlink()  # an empty folder holds nothing to lose: no --force needed
    assert qmain.main([str(tiny128_checkpoint), str(dst), "--recipe", "int8"]) == 0
    assert qmain.main([str(tiny128_checkpoint), str(dst), "--force", "--recipe", "int4"]) == 0
    config = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]
    for bad in (tiny128_checkpoint, tiny128_checkpoint / "sub"):
        assert qmain.main([str(tiny128_checkpoint), str(bad), "--force"]) == 2
        assert "must be outside SRC" in capsys.readouterr().err
    assert qmain.main([str(dst), str(tmp_path / "again")]) == 2
    assert "already quantized" in capsys.readouterr().err


def test_cli_entry_point_delegates_to_quantize(tiny128_checkpoint, tmp_path, capsys):
    from kimivl_local.cli.main import main

    assert main(["quantize", str(tiny128_checkpoint), str(tmp_path / "q"), "--dry-run",
                 "--recipe", "experts-int4"]) == 0
    assert re.search(r"routed experts\s+int4 g32", capsys.readouterr().out)
    assert main(["quantize", str(tiny128_checkpoint), str(tmp_path / "q"), "--rule", "x=7"]) == 2
    assert "error: --rule 'x=7': BITS must be 2, 3, 4, 5, 6, 8 or 16" in capsys.readouterr().err
