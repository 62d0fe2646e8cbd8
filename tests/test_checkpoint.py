"""Loading: the official layout round-trips, and every malformed checkpoint gets one clear error
naming the file and tensor."""

import json
import struct

import pytest
import torch

import kimivl_local
from kimivl_local.checkpoint.config import KimiVLConfig
from kimivl_local.checkpoint.hub import resolve_model_path
from kimivl_local.checkpoint.shards import Checkpoint
from kimivl_local.errors import CheckpointError, ConfigError, ModelNotFoundError
from kimivl_local.model.kimivl import KimiVLForConditionalGeneration
from kimivl_local.synthetic.checkpoint import build_configs, tensor_specs


def _index(folder):
    return json.loads((folder / "model.safetensors.index.json").read_text())


def _shard_of(folder, name):
    return folder / _index(folder)["weight_map"][name]


def test_full_preset_table_is_the_reference_layout():
    # The real checkpoint's counts (architecture reference §2.4): 5,652 tensors, 16.41 B params.
    config, _ = build_configs("full", None, None)
    specs = tensor_specs(config["text_config"], config["vision_config"])
    assert len(specs) == 5652
    params = sum(torch.Size(shape).numel() for _, shape, _ in specs)
    assert params == 16_407_656_048
    assert sum(1 for n, _, _ in specs if n.startswith("language_model.")) == 5317


def test_model_expects_exactly_the_synthetic_language_tensors():
    config, _ = build_configs("full", None, None)
    with torch.device("meta"):
        model = KimiVLForConditionalGeneration(KimiVLConfig.from_dict(config))
    expected = model.expected_checkpoint()
    written = {n: tuple(s) for n, s, _ in tensor_specs(config["text_config"], config["vision_config"])
               if n.startswith("language_model.")}
    assert {n: s for n, (s, _) in expected.items() if n.startswith("language_model.")} == written


def test_bias_is_fp32_on_disk(tiny_checkpoint):
    ckpt = Checkpoint.open(tiny_checkpoint)
    info = ckpt.tensors["language_model.model.layers.1.mlp.gate.e_score_correction_bias"]
    assert info.dtype == torch.float32
    assert ckpt.tensors["language_model.lm_head.weight"].dtype == torch.bfloat16


def _expect_error(folder, *fragments):
    with pytest.raises((CheckpointError, ConfigError)) as info:
        kimivl_local.load(folder, device="cpu")
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    return str(info.value)


NAME = "language_model.model.layers.2.self_attn.kv_b_proj.weight"


def _rewrite_shard(file, edit_header, append=b""):
    """Rewrite one shard's header through `edit_header(dict)`; tensor data untouched, `append`
    added after it."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit_header(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    file.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:] + append)


def _data_size(file):
    raw = file.read_bytes()
    return len(raw) - 8 - struct.unpack("<Q", raw[:8])[0]


def test_missing_tensor(fresh_checkpoint):
    folder = fresh_checkpoint()
    shard = _shard_of(folder, NAME)
    # Drop the tensor from its shard and from the index: "missing tensor".
    _rewrite_shard(shard, lambda h: h.pop(NAME))
    index = _index(folder)
    del index["weight_map"][NAME]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    _expect_error(folder, "missing tensor", NAME)


def test_unexpected_tensor(fresh_checkpoint):
    folder = fresh_checkpoint()
    extra = "language_model.model.layers.0.self_attn.q_a_proj.weight"
    shard = _shard_of(folder, NAME)
    end = _data_size(shard)
    nbytes = 0

    def add(header):
        nonlocal nbytes
        start, stop = header[NAME]["data_offsets"]
        nbytes = stop - start
        header[extra] = dict(header[NAME], data_offsets=[end, end + nbytes])
    _rewrite_shard(shard, add)
    _rewrite_shard(shard, lambda h: None, append=bytes(nbytes))
    index = _index(folder)
    index["weight_map"][extra] = shard.name
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    _expect_error(folder, "unexpected tensor", extra, shard.name)


def test_wrong_shape(fresh_checkpoint):
    folder = fresh_checkpoint()

    def reshape(header):
        rows, cols = header[NAME]["shape"]
        header[NAME]["shape"] = [cols, rows]
    _rewrite_shard(_shard_of(folder, NAME), reshape)
    _expect_error(folder, NAME, "has shape", _shard_of(folder, NAME).name)


def test_wrong_dtype(fresh_checkpoint):
    folder = fresh_checkpoint()

    def to_f16(header):
        header[NAME]["dtype"] = "F16"
    _rewrite_shard(_shard_of(folder, NAME), to_f16)
    _expect_error(folder, NAME, "is F16, expected BF16")


def test_truncated_shard(fresh_checkpoint):
    folder = fresh_checkpoint()
    shard = _shard_of(folder, NAME)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    _expect_error(folder, shard.name, "truncated")


def test_missing_shard_file(fresh_checkpoint):
    folder = fresh_checkpoint()
    shard = _shard_of(folder, NAME)
    shard.unlink()
    _expect_error(folder, shard.name, "missing", "incomplete")


def test_missing_index_entry(fresh_checkpoint):
    folder = fresh_checkpoint()
    index = _index(folder)
    del index["weight_map"][NAME]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    _expect_error(folder, NAME, "no matching entry", "model.safetensors.index.json")


def test_index_points_to_wrong_shard(fresh_checkpoint):
    folder = fresh_checkpoint()
    index = _index(folder)
    shards = sorted(set(index["weight_map"].values()))
    other = next(s for s in shards if s != index["weight_map"][NAME])
    index["weight_map"][NAME] = other
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    _expect_error(folder, NAME, other)


def test_corrupt_header(fresh_checkpoint):
    folder = fresh_checkpoint()
    shard = _shard_of(folder, NAME)
    data = bytearray(shard.read_bytes())
    data[8:16] = b"\xff" * 8
    shard.write_bytes(bytes(data))
    _expect_error(folder, shard.name, "corrupt")


def test_corrupt_config(fresh_checkpoint):
    folder = fresh_checkpoint()
    (folder / "config.json").write_text("{not json")
    _expect_error(folder, "config.json", "not valid JSON")


def test_unsupported_config(fresh_checkpoint):
    folder = fresh_checkpoint()
    cfg = json.loads((folder / "config.json").read_text())
    cfg["text_config"]["q_lora_rank"] = 1536
    (folder / "config.json").write_text(json.dumps(cfg))
    _expect_error(folder, "q_lora_rank=1536")


def test_model_path_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        resolve_model_path(tmp_path / "nope")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model_path(tmp_path)


def test_every_parameter_holds_its_file_bytes(tiny_checkpoint):
    # Stacked experts are read straight into their slices, the rest tensor by tensor.
    from safetensors import safe_open

    from kimivl_local.model.kimivl import checkpoint_names

    model = kimivl_local.load(tiny_checkpoint, device="cpu").model
    files, stacked = {}, 0
    for name, param in model.named_parameters():
        names = checkpoint_names(name, param.shape)
        stacked += len(names) > 1
        for i, on_disk in enumerate(names):
            file = _shard_of(tiny_checkpoint, on_disk)
            if file not in files:
                files[file] = safe_open(str(file), framework="pt")
            expected = files[file].get_tensor(on_disk)
            got = param[i] if len(names) > 1 else param
            assert torch.equal(got, expected.to(got.dtype)), name
    assert stacked
