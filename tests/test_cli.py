"""The CLI as a user drives it: the installed `kimivl-local` script, in a pseudo-terminal for chat."""

import shutil
import subprocess
import sys

import pytest

from kimivl_local.cli import main

EXE = shutil.which("kimivl-local")


def _run(*args, input_text=None):
    cmd = [EXE] if EXE else [sys.executable, "-m", "kimivl_local.cli"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, input=input_text,
                          timeout=300)


def test_chat_streams_in_a_terminal(tiny_checkpoint, tmp_path):
    from PIL import Image

    image = tmp_path / "photo.png"
    Image.new("RGB", (150, 100), (10, 120, 200)).save(image)  # 24 image tokens
    pexpect = pytest.importorskip("pexpect")
    cmd = EXE or sys.executable
    args = ["chat", str(tiny_checkpoint), "--max-new-tokens", "12"]
    child = pexpect.spawn(cmd, args if EXE else ["-m", "kimivl_local.cli", *args],
                          encoding="utf-8", timeout=120, dimensions=(40, 120))
    try:
        child.expect(">>> ")
        child.sendline("Hello, who are you?")
        # The answer streams, then the per-answer speed line, then the next prompt.
        child.expect(r"\[(\d+) tokens, [\d.]+ tok/s; prompt (\d+) tokens")
        assert int(child.match.group(1)) >= 1
        first_prompt_tokens = int(child.match.group(2))
        child.expect(">>> ")
        child.sendline("/help")
        child.expect("/image PATH")
        child.sendline("/image /no/such/file.png")
        child.expect("image not found")
        child.sendline(f"/image {image}")
        child.expect("attached")
        child.sendline("And this picture?")  # second turn: history + image lengthen the prompt
        child.expect(r"prompt (\d+) tokens")
        assert int(child.match.group(1)) > first_prompt_tokens + 20
        child.sendline("/reset")
        child.expect("conversation cleared")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_generate_prints_text_and_stats(tiny_checkpoint):
    result = _run("generate", str(tiny_checkpoint), "-p", "Hi", "--max-new-tokens", "8",
                  "--temperature", "0.7", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "8 generated" in result.stderr
    again = _run("generate", str(tiny_checkpoint), "-p", "Hi", "--max-new-tokens", "8",
                 "--temperature", "0.7", "--seed", "1")
    assert again.stdout == result.stdout  # seeded sampling is reproducible


def test_missing_weights_give_one_clear_line(tmp_path):
    result = _run("chat", "--model", "moonshotai/Kimi-VL-A3B-Instruct")
    assert result.returncode == 2
    assert "not in the local Hugging Face cache" in result.stderr
    assert "Traceback" not in result.stderr
    result = _run("generate", str(tmp_path / "missing"), "-p", "x")
    assert result.returncode == 2 and "no such folder" in result.stderr


def test_prompt_too_long_for_context(tiny_checkpoint):
    result = _run("generate", str(tiny_checkpoint), "--max-context", "16", "-p", "word " * 50)
    assert result.returncode == 2
    assert "context holds 16" in result.stderr and "Traceback" not in result.stderr


def test_info_reports_build_and_model(tiny_checkpoint, capsys):
    assert main(["info", str(tiny_checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "extension:" in out and "3 layers, hidden 64, 8 experts top-3" in out


def test_synthetic_command(tmp_path, capsys):
    assert main(["synthetic", str(tmp_path / "ck"), "--layers", "2", "--experts", "4"]) == 0
    import json

    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())["text_config"]
    assert (cfg["num_hidden_layers"], cfg["n_routed_experts"]) == (2, 4)
    assert main(["synthetic", str(tmp_path / "ck")]) == 2  # refuses to overwrite
    assert "already holds a checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["--temperature", "-1"], ["--top-p", "0"], ["--max-new-tokens", "0"]])
def test_bad_sampling_options(tiny_checkpoint, bad):
    result = _run("generate", str(tiny_checkpoint), "-p", "x", *bad)
    assert result.returncode == 2 and "error:" in result.stderr and "Traceback" not in result.stderr


def test_generate_with_images(tiny_checkpoint, tmp_path):
    from PIL import Image

    good = tmp_path / "photo.png"
    Image.new("RGB", (90, 50), (200, 30, 30)).save(good)
    result = _run("generate", str(tiny_checkpoint), "--image", str(good), "-p", "What color?",
                  "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    result = _run("generate", str(tiny_checkpoint), "--image", str(bad), "-p", "x")
    assert result.returncode == 2 and "notes.png" in result.stderr
    assert "Traceback" not in result.stderr
