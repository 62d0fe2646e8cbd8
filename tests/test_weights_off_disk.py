"""After load, no weight refers to the checkpoint's files: a shard truncated or deleted on disk
(a re-download, a sync tool, a full disk) cannot kill a running model with SIGBUS."""

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

import kimivl_local
from kimivl_local.checkpoint.shards import Checkpoint
from kimivl_local.errors import CheckpointError
from conftest import CLI_CWD

MESSAGES = [{"role": "user", "content": "hello"}]


def _shards(folder):
    return sorted(folder.glob("*.safetensors"))


def _file_backed(tensor: torch.Tensor, mapped: list[tuple[int, int]]) -> bool:
    ptr = tensor.untyped_storage().data_ptr()
    return any(lo <= ptr < hi for lo, hi in mapped)


def _mapped_ranges(folder) -> list[tuple[int, int]]:
    """Address ranges of this process mapping a file of `folder` (from /proc/self/maps)."""
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip().startswith(str(folder)):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                ranges.append((lo, hi))
    return ranges


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_no_tensor_is_file_backed_after_load(tmp_path, tiny_checkpoint):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    model = kimivl_local.load(folder, device="cpu")  # bf16: no dtype conversion to hide a mapping
    assert _mapped_ranges(folder) == []
    tensors = [*model.model.parameters(), *model.model.buffers()]
    assert tensors and not any(_file_backed(t, _mapped_ranges(folder)) for t in tensors)


@pytest.mark.parametrize("source", ["bf16", "int4"])
def test_generation_survives_truncated_and_deleted_shards(tmp_path, tiny_checkpoint, quantized,
                                                          source):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint if source == "bf16" else quantized("int4"), folder)
    model = kimivl_local.load(folder, device="cpu")  # bf16: the dtype the files hold
    assert _mapped_ranges(folder) == []
    before = "".join(model.generate(MESSAGES, max_new_tokens=6))
    for shard in _shards(folder):
        with open(shard, "r+b") as f:
            f.truncate(0)
    assert "".join(model.generate(MESSAGES, max_new_tokens=6)) == before
    for shard in _shards(folder):
        shard.unlink()
    assert "".join(model.generate(MESSAGES, max_new_tokens=6)) == before


def test_shard_cut_while_loading_is_a_clear_error(tmp_path, tiny_checkpoint):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    ckpt = Checkpoint.open(folder)  # headers checked: the file was whole
    name = max(ckpt.tensors.values(), key=lambda t: t.offset + t.nbytes).name
    info = ckpt.tensors[name]
    with open(info.file, "r+b") as f:
        f.truncate(info.offset + info.nbytes // 2)
    with pytest.raises(CheckpointError, match=f"{info.file.name}: tensor {name} is cut off"):
        ckpt.load(name)
    ckpt.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post_chat(url: str) -> tuple[int, dict]:
    body = json.dumps({"model": "kimivl", "messages": MESSAGES, "max_tokens": 4,
                       "temperature": 0}).encode()
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _wait_until_up(proc: subprocess.Popen, url: str, log, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited with {proc.returncode}: {log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError("serve did not start")


@pytest.mark.slow
def test_serve_survives_a_truncated_shard(tmp_path, tiny_checkpoint):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "kimivl_local.cli.main", "serve",
                                 str(folder), "--port", str(port), "--device", "cpu",
                                 "--max-context", "256"],
                                stdout=out, stderr=subprocess.STDOUT, cwd=CLI_CWD)
    try:
        _wait_until_up(proc, url, log)
        status, before = _post_chat(url)
        assert status == 200, before
        for shard in _shards(folder):
            with open(shard, "r+b") as f:
                f.truncate(0)
        status, after = _post_chat(url)
        assert status == 200, after
        assert proc.poll() is None, log.read_text()
        assert after["choices"][0]["message"] == before["choices"][0]["message"]
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
