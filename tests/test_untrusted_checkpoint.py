"""A checkpoint folder is untrusted input: every corrupt header entry, index entry and config
value is refused with one error naming the file and the field, before anything is allocated from
it, and a failed load leaves every file of the folder as it was."""

import hashlib
import json
import math
import shutil
import struct

import pytest

import kimivl_local
from kimivl_local.errors import CheckpointError, ConfigError

INDEX = "model.safetensors.index.json"
NAME = "language_model.model.layers.2.self_attn.kv_b_proj.weight"  # bf16 [128, 32]: 8192 bytes


def _shard(folder):
    return folder / json.loads((folder / INDEX).read_text())["weight_map"][NAME]


def _write_header(file, header_json: str):
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    blob = header_json.encode()
    blob += b" " * (-len(blob) % 8)
    file.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])


def _header(file) -> dict:
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n])


def _entry(field, value):
    def corrupt(folder):
        shard = _shard(folder)
        header = _header(shard)
        header[NAME][field] = value
        _write_header(shard, json.dumps(header))
    return corrupt


def _shift(delta):
    """Move NAME's byte range by `delta` (same size): onto its neighbour's bytes."""
    def corrupt(folder):
        shard = _shard(folder)
        header = _header(shard)
        start, end = header[NAME]["data_offsets"]
        header[NAME]["data_offsets"] = [start + delta, end + delta]
        _write_header(shard, json.dumps(header))
    return corrupt


def _duplicate(folder):
    shard = _shard(folder)
    header = _header(shard)
    again = json.dumps({NAME: header[NAME]})[1:-1]
    _write_header(shard, "{" + again + ", " + json.dumps(header)[1:])


def _index_entry(value):
    def corrupt(folder):
        index = json.loads((folder / INDEX).read_text())
        index["weight_map"][NAME] = value
        (folder / INDEX).write_text(json.dumps(index))
    return corrupt


def _symlink_to(target_of):
    def corrupt(folder):
        shard = _shard(folder)
        target = target_of(folder, shard)
        shard.unlink()
        shard.symlink_to(target)
    return corrupt


def _outside_copy(folder, shard):
    outside = folder.parent / f"outside-{shard.name}"
    shutil.copyfile(shard, outside)
    return outside


HEADER_CASES = {
    "overlap": (_shift(-64), ["data_offsets of tensors", "overlap"]),
    "negative offset": (_entry("data_offsets", [-64, 8128]), ["data_offsets", "0 <= begin"]),
    "into the header": (_entry("data_offsets", [-16, 8176]), ["data_offsets", "0 <= begin"]),
    "end before begin": (_entry("data_offsets", [8192, 0]), ["data_offsets", "0 <= begin"]),
    "beyond the file": (_entry("data_offsets", [10**9, 10**9 + 8192]), ["truncated"]),
    "size mismatch": (_entry("shape", [128, 16]), ["data_offsets", "needs 4096"]),
    "float offsets": (_entry("data_offsets", [0.0, 8192.0]), ["data_offsets", "pair of integers"]),
    "one offset": (_entry("data_offsets", [0]), ["data_offsets", "pair of integers"]),
    "float shape": (_entry("shape", [128.0, 32]), ["shape", "non-negative integers"]),
    "string shape": (_entry("shape", ["128", 32]), ["shape", "non-negative integers"]),
    "bool shape": (_entry("shape", [True, 8192]), ["shape", "non-negative integers"]),
    "negative shape": (_entry("shape", [-128, -32]), ["shape", "non-negative integers"]),
    "unknown dtype": (_entry("dtype", "F8_E4M3"), ["dtype", "F8_E4M3"]),
    "entry not an object": (lambda f: _write_header(_shard(f), json.dumps(
        {**_header(_shard(f)), NAME: [1, 2]})), ["header entry", "must be an object"]),
    "missing data_offsets": (lambda f: _write_header(_shard(f), json.dumps(
        {**_header(_shard(f)), NAME: {"dtype": "BF16", "shape": [128, 32]}})),
        ["data_offsets", "missing"]),
    "duplicate name": (_duplicate, ["the key", "twice"]),
}

INDEX_CASES = {
    "parent folder": (_index_entry("../outside.safetensors"), ["weight_map", "../outside"]),
    "nested parent": (_index_entry("sub/../../x.safetensors"), ["weight_map", "inside"]),
    "absolute path": (_index_entry("/etc/passwd"), ["weight_map", "/etc/passwd"]),
    "not a string": (_index_entry(3), ["weight_map", "file name"]),
    "empty name": (_index_entry(""), ["weight_map", "inside"]),
    "symlink out of the folder": (_symlink_to(_outside_copy), ["is a link to", "outside"]),
    "symlink to /etc/passwd": (_symlink_to(lambda f, s: "/etc/passwd"), ["/etc/passwd"]),
}


def _config(file, key, value, section=None):
    def corrupt(folder):
        path = folder / file
        data = json.loads(path.read_text()) if path.exists() else {}
        (data[section] if section else data)[key] = value
        path.write_text(json.dumps(data))
    return corrupt


def _text(key, value):
    return _config("config.json", key, value, "text_config")


def _vision(key, value):
    return _config("config.json", key, value, "vision_config")


def _preprocessor(key, value):
    return _config("preprocessor_config.json", key, value)


CONFIG_CASES = {
    "hidden_size string": (_text("hidden_size", "64"), "hidden_size"),
    "hidden_size bool": (_text("hidden_size", True), "hidden_size"),
    "hidden_size float": (_text("hidden_size", 64.0), "hidden_size"),
    "hidden_size fraction": (_text("hidden_size", 63.5), "hidden_size"),
    "hidden_size negative": (_text("hidden_size", -64), "hidden_size"),
    "hidden_size zero": (_text("hidden_size", 0), "hidden_size"),
    "num_hidden_layers zero": (_text("num_hidden_layers", 0), "num_hidden_layers"),
    "n_routed_experts null": (_text("n_routed_experts", None), "n_routed_experts"),
    "vocab_size 10**12": (_text("vocab_size", 10**12), "vocab_size"),
    "max_position_embeddings 10**15": (_text("max_position_embeddings", 10**15),
                                       "max_position_embeddings"),
    "rms_norm_eps string": (_text("rms_norm_eps", "1e-5"), "rms_norm_eps"),
    "rms_norm_eps zero": (_text("rms_norm_eps", 0), "rms_norm_eps"),
    "rope_theta NaN": (_text("rope_theta", math.nan), "rope_theta"),
    "norm_topk_prob int": (_text("norm_topk_prob", 1), "norm_topk_prob"),
    "eos_token_id negative": (_text("eos_token_id", [163585, -1]), "eos_token_id[1]"),
    "media_placeholder_token_id string": (_config("config.json", "media_placeholder_token_id",
                                                  "163605"), "media_placeholder_token_id"),
    "vision patch_size zero": (_vision("patch_size", 0), "patch_size"),
    "vision merge_kernel_size zero": (_vision("merge_kernel_size", [0, 0]), "merge_kernel_size[0]"),
    "preprocessor patch_size zero": (_preprocessor("patch_size", 0), "patch_size"),
    "preprocessor merge_kernel_size zero": (_preprocessor("merge_kernel_size", [2, 0]),
                                            "merge_kernel_size[1]"),
    "preprocessor merge_kernel_size int": (_preprocessor("merge_kernel_size", 2),
                                           "merge_kernel_size"),
    "preprocessor image_std zero": (_preprocessor("image_std", [0.5, 0, 0.5]), "image_std[1]"),
    "preprocessor image_std negative": (_preprocessor("image_std", [-0.5, 0.5, 0.5]),
                                        "image_std[0]"),
    "preprocessor image_std NaN": (_preprocessor("image_std", [0.5, 0.5, math.nan]),
                                   "image_std[2]"),
    "preprocessor in_token_limit string": (_preprocessor("in_token_limit", "4096"),
                                           "in_token_limit"),
    "generation_config max_length float": (_config("generation_config.json", "max_length", 1e3),
                                           "max_length"),
}


def _snapshot(folder) -> dict:
    """Every entry of the folder: link target or (size, mtime, sha256)."""
    state = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            state[path.name] = ("link", str(path.readlink()))
        elif path.is_file():
            stat = path.stat()
            state[path.name] = (stat.st_size, stat.st_mtime_ns,
                                hashlib.sha256(path.read_bytes()).hexdigest())
    return state


def _refused(folder, error, fragments) -> str:
    before = _snapshot(folder)
    with pytest.raises(error) as info:
        kimivl_local.load(folder, device="cpu")
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    assert _snapshot(folder) == before  # a failed load changes nothing in the user's folder
    return message


@pytest.mark.parametrize("case", HEADER_CASES)
def test_corrupt_header_entry(fresh_checkpoint, case):
    folder = fresh_checkpoint()
    corrupt, fragments = HEADER_CASES[case]
    corrupt(folder)
    message = _refused(folder, CheckpointError, fragments)
    assert _shard(folder).name in message and NAME in message


@pytest.mark.parametrize("case", INDEX_CASES)
def test_index_entry_outside_the_folder(fresh_checkpoint, case):
    folder = fresh_checkpoint()
    corrupt, fragments = INDEX_CASES[case]
    corrupt(folder)
    _refused(folder, CheckpointError, [INDEX, *fragments])


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_config_value(fresh_checkpoint, case):
    folder = fresh_checkpoint()
    corrupt, field = CONFIG_CASES[case]
    corrupt(folder)
    message = _refused(folder, ConfigError, [field])
    assert ".json" in message


def test_hf_cache_snapshot_links_into_blobs_load(tmp_path, tiny_checkpoint):
    # A hub snapshot's files are symlinks into the repo's blobs/: inside the boundary.
    repo = tmp_path / "models--moonshotai--Kimi-VL-A3B-Instruct"
    snap = repo / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in tiny_checkpoint.iterdir():
        shutil.copyfile(f, repo / "blobs" / f.name)
        (snap / f.name).symlink_to(f"../../blobs/{f.name}")
    assert kimivl_local.load(snap, device="cpu").path == snap
